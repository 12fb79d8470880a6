"""Estimators of the testbed, fitted for R replicates at once with ``vrpo.losses``.

Primary models (both linear in their parameters theta, so one fitting code serves both):

- ``LinearReward`` (two-stage): a Bradley-Terry reward r(x, a) = theta' phi(x, a), theta [R, d].
- ``TabularPolicy`` (one-stage): a tabular softmax policy pi_theta(a|x) ∝ pi_ref(a|x)
  exp(theta_xa) trained with the DPO objective at beta = 1; its implicit reward
  beta * log(pi_theta / pi_ref) = theta_xa - log Z_x, so every margin is theta_xa - theta_xb.

Objectives (``OBJECTIVES``) are the per-example losses of ``vrpo.losses`` averaged over the
dataset, regrouped by cell (``simulate.data``): the labelled cells (x, y+, y-) carry their
share of examples, the reference pairs of context x their share of reference pairs. VRPO:

    mean_i L_vrpo,i = sum_cells w_c [f(z_c) - c l(z_c, g_c)] + c sum_x v_x ref_x + c ties * f(0)

where ref_x = ``vrpo_loss_terms(...).reference`` over the response set of context x with
``ref_pair_weights`` = the pair counts (sampled K) or 2 pi_ref(a) pi_ref(b) (exact limit).

A small ridge ``ridge / 2 * |theta|^2`` makes every fit (and the population target, which
carries the same ridge) well defined; without it the sigmoid control variate's linear
observed-pair term can make the objective unbounded below (METHOD.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from vrpo.losses import cdpo_loss, get_base_loss, preference_loss, rdpo_loss, soft_label_loss, vrpo_loss_terms


# ------------------------------------------------------------------------- primary models
class LinearReward:
    """Two-stage primary model: r(x, a) = theta' phi(x, a)."""

    name = "linear_bt"
    ridge = 1e-3  # 4 parameters, n >= 100 pairs: a numerical safeguard only

    def __init__(self, features: Tensor):
        self.features = features  # [X, A, d]

    @property
    def dim(self) -> int:
        return self.features.shape[-1]

    def rewards(self, theta: Tensor) -> Tensor:
        """theta [R, d] -> rewards [R, X, A]."""
        return torch.einsum("xad,rd->rxa", self.features, theta)

    def grad(self, grad_u: Tensor) -> Tensor:
        """Chain rule from d loss / d rewards [R, X, A] to d loss / d theta [R, d]."""
        return torch.einsum("xad,rxa->rd", self.features, grad_u)

    def newton_direction(self, grad_u: Tensor, hess_u: Tensor, theta: Tensor, ridge: float) -> Tensor:
        """Solve (Phi' H_u Phi + ridge I) step = Phi' g_u + ridge theta. hess_u [R, X, A, A]."""
        h = torch.einsum("xad,rxab,xbe->rde", self.features, hess_u, self.features)
        h = h + ridge * torch.eye(self.dim, dtype=h.dtype)
        return torch.linalg.solve(h, (self.grad(grad_u) + ridge * theta).unsqueeze(-1)).squeeze(-1)

    def per_example_grad(self, context: Tensor, responses: Tensor, d_rewards: Tensor) -> Tensor:
        """sum_m d_rewards[..., m] * phi(x, responses[..., m]): [R, n, d] from [R, n, M]."""
        phi = self.features[context[..., None], responses]  # [R, n, M, d]
        return torch.einsum("rnmd,rnm->rnd", phi, d_rewards)


class TabularPolicy:
    """One-stage primary model: a tabular softmax policy trained with DPO (beta = 1).
    theta [R, X * A]; margins theta_xa - theta_xb (the log-partition cancels)."""

    name = "tabular_dpo"
    # 5 free rewards per prompt from ~n/20 comparisons: pairs seen once or never are
    # separable, and with a tiny ridge their margins run to log(1/ridge). 1e-2 acts like a
    # N(0, 1 / (n * 1e-2)) prior, the role DPO's KL to pi_ref plays in a language model.
    ridge = 1e-2

    def __init__(self, features: Tensor):
        self.num_contexts, self.num_responses = features.shape[:2]

    @property
    def dim(self) -> int:
        return self.num_contexts * self.num_responses

    def rewards(self, theta: Tensor) -> Tensor:
        return theta.view(theta.shape[0], self.num_contexts, self.num_responses)

    def grad(self, grad_u: Tensor) -> Tensor:
        return grad_u.reshape(grad_u.shape[0], -1)

    def newton_direction(self, grad_u, hess_u, theta, ridge):
        """The Hessian is block diagonal (one A x A block per context): solve per block."""
        A = self.num_responses
        h = hess_u + ridge * torch.eye(A, dtype=hess_u.dtype)
        g = grad_u + ridge * self.rewards(theta)
        return torch.linalg.solve(h, g.unsqueeze(-1)).squeeze(-1).reshape(theta.shape)

    def per_example_grad(self, context, responses, d_rewards):
        R, n, M = responses.shape
        out = torch.zeros(R, n, self.dim, dtype=d_rewards.dtype)
        return out.scatter_add_(2, context[..., None] * self.num_responses + responses, d_rewards)


PRIMARY_MODELS: dict[str, type] = {"linear_bt": LinearReward, "tabular_dpo": TabularPolicy}


# ------------------------------------------------------------------------- objectives
@dataclass
class Problem:
    """Sufficient statistics of one estimator on R datasets (leading dim R or 1).

    cell_w [.., X, A, A]: share of examples with (x, y+ = a, y- = b).
    cell_g [.., X, A, A]: mean auxiliary probability g(x, y+, y-) of those examples.
    ref_w [.., X, A, A]: reference pair weights (symmetric; read for a < b), ref_ties [.., X].
    ref_g [.., X, A, A]: g(x, a, b) for the reference pairs.
    coef [R, 1] or float: the control-variate coefficient c.
    """

    objective: str
    base: str
    cell_w: Tensor
    cell_g: Tensor | None = None
    ref_w: Tensor | None = None
    ref_ties: Tensor | None = None
    ref_g: Tensor | None = None
    coef: Tensor | float = 1.0
    noise_rate: float = 0.1  # cDPO label smoothing / rDPO flip rate


def _cells(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Chosen and rejected rewards of every ordered cell: [R, X, A, A] each."""
    A = rewards.shape[-1]
    shape = rewards.shape + (A,)
    return rewards[..., :, None].expand(shape), rewards[..., None, :].expand(shape)


def _weighted(loss: Tensor, w: Tensor) -> Tensor:
    return (loss * w).sum((-3, -2, -1))


def objective_base(rewards: Tensor, p: Problem) -> Tensor:
    """DPO / Bradley-Terry: mean f(z+-)."""
    chosen, rejected = _cells(rewards)
    return _weighted(preference_loss(chosen, rejected, p.base), p.cell_w)


def objective_cdpo(rewards: Tensor, p: Problem) -> Tensor:
    chosen, rejected = _cells(rewards)
    return _weighted(cdpo_loss(chosen, rejected, p.noise_rate, p.base), p.cell_w)


def objective_rdpo(rewards: Tensor, p: Problem) -> Tensor:
    chosen, rejected = _cells(rewards)
    return _weighted(rdpo_loss(chosen, rejected, p.noise_rate, p.base), p.cell_w)


def reference_term(rewards: Tensor, p: Problem) -> Tensor:
    """sum_x v_x * (weighted mean over reference pairs of l(z~, g~)) + ties * f(0). [R]"""
    R, X = rewards.shape[:2]
    w = p.ref_w.expand(R, *p.ref_w.shape[-3:])
    v = torch.triu(w, diagonal=1).sum((-2, -1))  # [R, X] total weight of context x
    safe_w = torch.where(v[..., None, None] > 0, w, torch.ones_like(w))  # empty rows: dummy
    zeros = rewards.new_zeros(R, X)
    ref_g = p.ref_g.expand(R, *p.ref_g.shape[-3:])
    terms = vrpo_loss_terms(zeros, zeros, zeros + 0.5, rewards, ref_g, base=p.base,
                            ref_pair_weights=safe_w, validate=False)
    f0 = get_base_loss(p.base)(rewards.new_zeros(()))
    return (v * terms.reference).sum(-1) + p.ref_ties.expand(R, X).sum(-1) * f0


def objective_vrpo(rewards: Tensor, p: Problem) -> Tensor:
    """VRPO: base - c * mean l(z+-, g+-) + c * mean over reference pairs l(z~, g~)."""
    chosen, rejected = _cells(rewards)
    coef = p.coef if isinstance(p.coef, float) else p.coef.view(-1)
    base = _weighted(preference_loss(chosen, rejected, p.base), p.cell_w)
    observed_aux = _weighted(soft_label_loss(chosen - rejected, p.cell_g, p.base), p.cell_w)
    return base + coef * (reference_term(rewards, p) - observed_aux)


OBJECTIVES: dict[str, Callable[[Tensor, Problem], Tensor]] = {
    "base": objective_base,
    "cdpo": objective_cdpo,
    "rdpo": objective_rdpo,
    "vrpo": objective_vrpo,
}


# ------------------------------------------------------------------------- fitting
@dataclass
class Fit:
    theta: Tensor  # [R, d]
    converged: Tensor  # [R] bool


def _total(model, theta: Tensor, problem: Problem, ridge: float) -> Tensor:
    return OBJECTIVES[problem.objective](model.rewards(theta), problem) + 0.5 * ridge * (theta ** 2).sum(-1)


def _start(model, replicates: int, init: Tensor | None) -> Tensor:
    if init is None:
        return torch.zeros(replicates, model.dim, dtype=torch.float64)
    return init.detach().clone().expand(replicates, model.dim).contiguous()


def fit_newton(model, problem: Problem, replicates: int, ridge: float, init: Tensor | None = None,
               max_iter: int = 30, tol: float = 1e-10) -> Fit:
    """Damped Newton for smooth convex objectives (sigmoid base loss), batched over
    replicates. The Hessian in the rewards is block diagonal per context, so A backward
    passes give it exactly. A replicate has converged when its Newton decrement < tol."""
    fn = OBJECTIVES[problem.objective]
    theta = _start(model, replicates, init)
    done = torch.zeros(replicates, dtype=torch.bool)
    A = model.rewards(theta).shape[-1]
    for _ in range(max_iter):
        u = model.rewards(theta).detach().requires_grad_(True)
        (g_u,) = torch.autograd.grad(fn(u, problem).sum(), u, create_graph=True)
        h_u = torch.stack([torch.autograd.grad(g_u[..., a].sum(), u, retain_graph=a < A - 1)[0]
                           for a in range(A)], dim=-2)  # [R, X, A(row a), A]
        step = model.newton_direction(g_u.detach(), h_u.detach(), theta, ridge)
        grad = model.grad(g_u.detach()) + ridge * theta
        decrement = (grad * step).sum(-1)
        if bool(done.all()):
            break
        newly_done = decrement.abs() < tol  # take this last (tiny) step, then stop
        with torch.no_grad():
            f0 = _total(model, theta, problem, ridge)
            t = torch.ones(replicates, 1, dtype=theta.dtype)
            for _ in range(30):  # backtracking (Armijo) per replicate
                ok = _total(model, theta - t * step, problem, ridge) <= f0 - 0.25 * t.view(-1) * decrement
                if bool(ok.all()):
                    break
                t = torch.where(ok[:, None], t, 0.5 * t)
        theta = torch.where(done[:, None], theta, theta - t * step).detach()
        done = done | newly_done
    return Fit(theta, done & torch.isfinite(theta).all(-1))


def fit_adam(model, problem: Problem, replicates: int, ridge: float, init: Tensor | None = None,
             steps: int = 150, lr: float = 0.03, final_lr: float = 3e-4) -> Fit:
    """Full-batch Adam with a geometric learning-rate decay, for the piecewise-linear
    (non-smooth, non-convex) ramp loss."""
    theta = _start(model, replicates, init).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    decay = (final_lr / lr) ** (1.0 / steps)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    for _ in range(steps):
        opt.zero_grad()
        _total(model, theta, problem, ridge).sum().backward()
        opt.step()
        sched.step()
    theta = theta.detach()
    return Fit(theta, torch.isfinite(theta).all(-1))


# smooth base losses get Newton; piecewise-linear ones first-order steps
FITTERS: dict[str, Callable] = {"sigmoid": fit_newton, "ramp": fit_adam, "hinge": fit_adam}
# Objectives with these base losses are strictly convex (with the ridge): a warm start
# cannot change the minimiser, only save steps. The ramp objective is non-convex and fitted
# by a fixed budget of Adam steps, so every ramp fit starts at 0, like its target (the same
# procedure run on the exact population loss).
WARM_STARTABLE = {"sigmoid"}


def fit(model, problem: Problem, replicates: int, ridge: float, init: Tensor | None = None) -> Fit:
    """Minimise the problem's objective + ridge for every replicate; ``init`` [R or 1, d]
    warm-starts (the base fit for VRPO: same minimiser family, fewer steps)."""
    try:
        fitter = FITTERS[problem.base]
    except KeyError:
        raise ValueError(f"base: {problem.base!r} has no fitter in the testbed; expected one of {sorted(FITTERS)}") from None
    return fitter(model, problem, replicates, ridge, init)
