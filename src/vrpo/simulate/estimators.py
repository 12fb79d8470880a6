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
observed-pair term can make the objective unbounded below (docs/testbed.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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

    def newton_direction(self, grad_u: Tensor, hess_u: Tensor, theta: Tensor, ridge: float,
                         saddle_free: bool = False) -> Tensor:
        """Solve (Phi' H_u Phi + ridge I) step = Phi' g_u + ridge theta. hess_u [R, X, A, A].
        ``saddle_free``: a non-convex objective's Hessian with |eigenvalues| (``_solve``)."""
        return _solve(self.hessian(hess_u, ridge), self.grad(grad_u) + ridge * theta, ridge, saddle_free)

    def hessian(self, hess_u: Tensor, ridge: float) -> Tensor:
        """Hessian in theta, Phi' H_u Phi + ridge I, from the Hessian in the rewards. [R, d, d]"""
        h = torch.einsum("xad,rxab,xbe->rde", self.features, hess_u, self.features)
        return h + ridge * torch.eye(self.dim, dtype=h.dtype)

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

    def newton_direction(self, grad_u, hess_u, theta, ridge, saddle_free: bool = False):
        """The Hessian is block diagonal (one A x A block per context): solve per block."""
        A = self.num_responses
        h = hess_u + ridge * torch.eye(A, dtype=hess_u.dtype)
        g = grad_u + ridge * self.rewards(theta)
        return _solve(h, g, ridge, saddle_free).reshape(theta.shape)

    def per_example_grad(self, context, responses, d_rewards):
        R, n, M = responses.shape
        out = torch.zeros(R, n, self.dim, dtype=d_rewards.dtype)
        return out.scatter_add_(2, context[..., None] * self.num_responses + responses, d_rewards)


PRIMARY_MODELS: dict[str, type] = {"linear_bt": LinearReward, "tabular_dpo": TabularPolicy}


def _solve(h: Tensor, g: Tensor, ridge: float, saddle_free: bool) -> Tensor:
    """h^-1 g for symmetric h [..., m, m], g [..., m]. ``saddle_free`` replaces each
    eigenvalue lambda by max(|lambda|, ridge) (a descent direction where h is indefinite,
    the exact Newton step where h is positive definite)."""
    if not saddle_free:
        return torch.linalg.solve(h, g.unsqueeze(-1)).squeeze(-1)
    lam, vec = torch.linalg.eigh(h)
    coords = (vec.transpose(-1, -2) @ g.unsqueeze(-1)).squeeze(-1) / lam.abs().clamp_min(ridge)
    return (vec @ coords.unsqueeze(-1)).squeeze(-1)


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


# ------------------------------------------------------------------------- one weight per cell
# Every objective above is a weighted sum of f over the ordered cells of the world plus a
# constant: a term f(-z_ab) is f(z_ba), so it lands in cell (b, a). Fitting uses this form
# (W is fixed during a fit; f', f'' are elementwise), tests/test_simulate_targets.py checks it
# equals OBJECTIVES. Cells (a, a) carry ties: z = 0, no gradient.
def _t(w: Tensor) -> Tensor:
    return w.transpose(-1, -2)


def _coef(p: Problem) -> Tensor | float:
    return p.coef if isinstance(p.coef, float) else p.coef.view(-1, 1, 1, 1)


def _vrpo_cell_weights(p: Problem) -> Tensor:
    """f(z+-) - c l(z+-, g+-) + c sum_{a<b} ref_w l(z~_ab, g~_ab), with l(z, g) = g f(z) + (1 - g) f(z_ba)."""
    w, g = p.cell_w, p.cell_g
    ref = torch.triu(p.ref_w * p.ref_g, diagonal=1) + _t(torch.triu(p.ref_w * (1.0 - p.ref_g), diagonal=1))
    return w + _coef(p) * (ref - w * g - _t(w * (1.0 - g)))


CELL_WEIGHTS: dict[str, Callable[[Problem], Tensor]] = {
    "base": lambda p: p.cell_w,
    "cdpo": lambda p: (1.0 - p.noise_rate) * p.cell_w + p.noise_rate * _t(p.cell_w),
    "rdpo": lambda p: ((1.0 - p.noise_rate) * p.cell_w - p.noise_rate * _t(p.cell_w)) / (1.0 - 2.0 * p.noise_rate),
    "vrpo": _vrpo_cell_weights,
}


def cell_objective(rewards: Tensor, weights: Tensor, base) -> Tensor:
    """sum_{x,a,b} W_xab f(u_xa - u_xb): the objective up to its constant. [R]"""
    return (weights * get_base_loss(base)(rewards[..., :, None] - rewards[..., None, :])).sum((-3, -2, -1))


def cell_grad_hessian(rewards: Tensor, weights: Tensor, base) -> tuple[Tensor, Tensor]:
    """Gradient [R, X, A] and Hessian [R, X, A, A] of ``cell_objective`` in the rewards:
    with s = W f'(z), q = W f''(z) and Q = q + q' (both orientations of a pair),
    grad_a = sum_b (s_ab - s_ba), H = diag(sum_b Q_ab) - Q (off the diagonal)."""
    z = (rewards[..., :, None] - rewards[..., None, :]).detach().requires_grad_(True)
    (d1,) = torch.autograd.grad(get_base_loss(base)(z).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)  # f is elementwise: the diagonal of the Hessian in z
    s, q = weights * d1.detach(), weights * d2
    big_q = q + _t(q)
    big_q = big_q - torch.diag_embed(torch.diagonal(big_q, dim1=-2, dim2=-1))
    return s.sum(-1) - s.sum(-2), torch.diag_embed(big_q.sum(-1)) - big_q


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


NEWTON_TOL = 1e-10  # a fit has converged when its Newton decrement is below this


def fit_newton(model, problem: Problem, replicates: int, ridge: float, init: Tensor | None = None,
               max_iter: int = 30, tol: float = NEWTON_TOL, saddle_free: bool = False) -> Fit:
    """Damped Newton for smooth objectives, batched over replicates. The Hessian in the
    rewards is block diagonal per context, so A backward passes give it exactly. A replicate
    has converged when its Newton decrement < tol, and is then left alone. ``saddle_free``
    (non-convex objectives): the Hessian's eigenvalues are replaced by their absolute
    values, so every step descends."""
    theta = _start(model, replicates, init)
    weights = CELL_WEIGHTS[problem.objective](problem)
    weights = weights.expand(replicates, *weights.shape[-3:])
    done = torch.zeros(replicates, dtype=torch.bool)
    for _ in range(max_iter):
        active = torch.nonzero(~done).flatten()
        if active.numel() == 0:
            break
        w, th = weights[active], theta[active]
        step, decrement = _newton_step(model, w, problem.base, th, ridge, saddle_free)
        t = _armijo(model, w, problem.base, th, step, decrement, ridge)
        theta[active] = (th - t * step).detach()
        done[active] = decrement.abs() < tol  # this last (tiny) step was taken; stop here
    return Fit(theta, done & torch.isfinite(theta).all(-1))


def _newton_step(model, weights: Tensor, base, theta: Tensor, ridge: float, saddle_free: bool) -> tuple[Tensor, Tensor]:
    """(Newton step [R, d], Newton decrement grad' step [R]) at theta."""
    g_u, h_u = cell_grad_hessian(model.rewards(theta), weights, base)
    step = model.newton_direction(g_u, h_u, theta, ridge, saddle_free)
    grad = model.grad(g_u) + ridge * theta
    return step, (grad * step).sum(-1)


def _armijo(model, weights: Tensor, base, theta: Tensor, step: Tensor, decrement: Tensor, ridge: float) -> Tensor:
    """Backtracking step sizes t [R, 1]: halve until F(theta - t step) <= F(theta) - t decrement / 4."""
    total = lambda th: cell_objective(model.rewards(th), weights, base) + 0.5 * ridge * (th ** 2).sum(-1)  # noqa: E731
    with torch.no_grad():
        f0 = total(theta)
        t = torch.ones(theta.shape[0], 1, dtype=theta.dtype)
        for _ in range(40):
            ok = total(theta - t * step) <= f0 - 0.25 * t.view(-1) * decrement
            if bool(ok.all()):
                break
            t = torch.where(ok[:, None], t, 0.5 * t)
    return t


def smooth_relu(u: Tensor, tau: float) -> Tensor:
    """tau * softplus(u / tau): a smooth relu, within tau * log 2 of it everywhere."""
    return tau * torch.nn.functional.softplus(u / tau)


# The piecewise-linear base losses of vrpo.losses with every relu(u) smoothed at width tau.
SMOOTHED_BASES: dict[str, Callable[[float], Callable[[Tensor], Tensor]]] = {
    "ramp": lambda tau: lambda z: smooth_relu(1.0 - z, tau) - smooth_relu(-0.5 - z, tau),
    "hinge": lambda tau: lambda z: smooth_relu(1.0 - z, tau),
}
# Smoothing widths of the continuation, coarse to fine. At tau = 1e-4 the smoothed loss is
# within 1.4e-4 of the exact one; each stage starts from the previous stage's minimiser.
SMOOTHING_PATH = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
STAGE_TOL = 1e-6  # intermediate stages only locate the next start; the last one meets NEWTON_TOL


def fit_smoothed(model, problem: Problem, replicates: int, ridge: float, init: Tensor | None = None,
                 path: tuple[float, ...] = SMOOTHING_PATH, max_iter: int = 50) -> Fit:
    """Minimiser of a piecewise-linear base loss (ramp, hinge) + ridge by continuation: the
    relus are smoothed at width tau (``SMOOTHED_BASES``), each smoothed objective is minimised
    to a Newton decrement < ``NEWTON_TOL`` by saddle-free Newton (the ramp objective is not
    convex), and tau shrinks along ``path``, warm-starting each stage. A replicate has
    converged when the last stage (tau = 1e-4) reached the tolerance. In the population
    problems of the testbed, 30 random starts found no lower objective than this path from 0
    (tests/test_simulate_targets.py)."""
    theta = _start(model, replicates, init)
    result = None
    for i, tau in enumerate(path):
        smoothed = replace(problem, base=SMOOTHED_BASES[problem.base](tau))
        tol = NEWTON_TOL if i == len(path) - 1 else STAGE_TOL
        result = fit_newton(model, smoothed, replicates, ridge, init=theta, max_iter=max_iter, tol=tol,
                            saddle_free=True)
        theta = result.theta
    return result


# smooth base losses get Newton; piecewise-linear ones Newton along a smoothing path
FITTERS: dict[str, Callable] = {"sigmoid": fit_newton, "ramp": fit_smoothed, "hinge": fit_smoothed}
# Objectives with these base losses are strictly convex (with the ridge): a warm start
# cannot change the minimiser, only save steps. The ramp objective is not convex, so every
# ramp fit starts at 0 and follows the same smoothing path as its population target.
WARM_STARTABLE = {"sigmoid"}


def fit(model, problem: Problem, replicates: int, ridge: float, init: Tensor | None = None) -> Fit:
    """Minimise the problem's objective + ridge for every replicate; ``init`` [R or 1, d]
    warm-starts (the base fit for VRPO: same minimiser family, fewer steps)."""
    try:
        fitter = FITTERS[problem.base]
    except KeyError:
        raise ValueError(f"base: {problem.base!r} has no fitter in the testbed; expected one of {sorted(FITTERS)}") from None
    return fitter(model, problem, replicates, ridge, init)
