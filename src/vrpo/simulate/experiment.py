"""One testbed run: simulate R datasets in a world, fit every method on the SAME datasets,
and compare with the exact population target.

Methods (``METHODS``) name an objective, a base loss, the number K of reference samples
(``None`` = the exact expectation over pi_ref, the limit K -> infinity), the auxiliary
model and the control-variate coefficient ("paper": c = 1; "optimal": c estimated from the
data as in optimal control variates, see ``optimal_coef``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vrpo.losses import vrpo_loss_terms
from vrpo.simulate import aux_models
from vrpo.simulate.data import (Dataset, cell_weights, exact_ref_pair_weights, population_cell_weights,
                                ref_pair_weights)
from vrpo.simulate.estimators import OBJECTIVES, PRIMARY_MODELS, WARM_STARTABLE, Fit, Problem, fit
from vrpo.simulate.world import World


@dataclass(frozen=True)
class Method:
    objective: str  # key of estimators.OBJECTIVES
    base: str = "sigmoid"
    k: int | None = 8  # reference samples per example; None = exact expectation
    aux: str | None = "oracle"  # key of AUX_TABLES
    coef: str = "paper"  # "paper" (c = 1) or "optimal"


METHODS: dict[str, Method] = {
    "base": Method("base", aux=None, k=None),
    "cdpo": Method("cdpo", aux=None, k=None),
    "rdpo": Method("rdpo", aux=None, k=None),
    "vrpo_oracle_k2": Method("vrpo", k=2),
    "vrpo_oracle_k4": Method("vrpo", k=4),
    "vrpo_oracle": Method("vrpo", k=8),
    "vrpo_oracle_k16": Method("vrpo", k=16),
    "vrpo_oracle_exact": Method("vrpo", k=None),
    "vrpo_oracle_optc": Method("vrpo", k=8, coef="optimal"),
    "vrpo_oracle_k2_optc": Method("vrpo", k=2, coef="optimal"),
    "vrpo_fitted": Method("vrpo", k=8, aux="fitted"),
    "vrpo_crossfit": Method("vrpo", k=8, aux="crossfit"),
    "vrpo_crossfit_exact": Method("vrpo", k=None, aux="crossfit"),
    "vrpo_wrong_aux": Method("vrpo", k=8, aux="wrong"),
    "ramp_dpo": Method("base", base="ramp", aux=None, k=None),
    "vrpo_ramp_oracle_k2": Method("vrpo", base="ramp", k=2),
    "vrpo_ramp_oracle": Method("vrpo", base="ramp", k=8),
    "vrpo_ramp_oracle_exact": Method("vrpo", base="ramp", k=None),
}
ORACLE_K = 8  # the K of `vrpo_oracle`, `vrpo_fitted`, `vrpo_crossfit`, `vrpo_wrong_aux`


def aux_tables(world: World, data: Dataset, names: set[str], seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """(g for observed cells, g for reference pairs) of each auxiliary model needed."""
    out = {}
    ridge = None  # the cross-fitted model's choice, shared by the fitted one
    if names & {"fitted", "crossfit"}:
        oof, fold_avg, ridge = aux_models.crossfit_tables(world, data, 5, seed, aux_models.RIDGES)
    for name in names:
        if name == "oracle":
            out[name] = (aux_models.oracle_aux(world),) * 2
        elif name == "wrong":
            out[name] = (aux_models.wrong_aux(world),) * 2
        elif name == "fitted":
            out[name] = aux_models.fitted_aux(world, data, ridge=ridge)
        elif name == "crossfit":
            out[name] = (oof, fold_avg)
        else:
            raise ValueError(f"aux: unknown auxiliary model {name!r}; expected oracle, wrong, fitted or crossfit")
    return out


def context_shares(data: Dataset) -> Tensor:
    """Share of labelled examples in each context: [R, X]."""
    out = torch.zeros(data.replicates, data.num_contexts, dtype=torch.float64)
    return out.scatter_add_(1, data.context, torch.full(data.context.shape, 1.0 / data.n, dtype=torch.float64))


def build_problem(method: Method, world: World, data: Dataset, cell_w: Tensor, aux: dict,
                  ref_cache: dict, coef: Tensor | float = 1.0) -> Problem:
    if method.objective != "vrpo":
        return Problem(method.objective, method.base, cell_w)
    g_obs, g_ref = aux[method.aux]
    key = method.k
    if key not in ref_cache:
        ref_cache[key] = (exact_ref_pair_weights(context_shares(data), world.ref_probs) if key is None
                          else ref_pair_weights(data, key))
    ref_w, ties = ref_cache[key]
    return Problem("vrpo", method.base, cell_w, g_obs.expand_as(cell_w), ref_w, ties, g_ref, coef)


def population_target(world: World, model, base: str, ridge: float) -> Tensor:
    """The exact population target of the base estimator with base loss ``base``:
    argmin_theta sum_{x,a,b} rho(x) pi(a|x) pi(b|x) p*(x,a,b) f(z_ab) + ridge/2 |theta|^2,
    with pi the policy of the labelled pairs. No simulation. Fitted like the estimators, to
    convergence (``estimators.fit``); raises if it did not converge. Returns [d]."""
    problem = Problem("base", base, population_cell_weights(world)[None])
    result = fit(model, problem, 1, ridge)
    if not bool(result.converged[0]):
        raise RuntimeError(f"population target of {world.name!r} ({base}) did not converge")
    return result.theta[0]


def target_objective(world: World, model, base: str, ridge: float, theta: Tensor) -> float:
    """The exact population objective (base loss + ridge) at theta [d]."""
    problem = Problem("base", base, population_cell_weights(world)[None])
    return float(OBJECTIVES["base"](model.rewards(theta[None]), problem)[0] + 0.5 * ridge * (theta ** 2).sum())


def optimal_coef(model, world: World, data: Dataset, theta: Tensor, g_table: Tensor, k: int,
                 base: str) -> Tensor:
    """The control-variate coefficient that minimises the sample variance of the per-example
    score psi_i + c h_i at a pilot fit theta (the base estimate):
    c* = -sum_i <psi_i - mean psi, h_i - mean h> / sum_i |h_i - mean h|^2, clipped to [0, 1]
    (for c in [0, 1] the sigmoid objective stays convex). psi_i = grad f(z_i) (base score),
    h_i = grad [mean_jk l(z~_jk, g~_jk) - l(z_i, g_i)] (the control variate). Returns [R, 1]."""
    psi, h = per_example_scores(model, data, theta, g_table, k, base)[:2]
    psi_c, h_c = psi - psi.mean(1, keepdim=True), h - h.mean(1, keepdim=True)
    c = -(psi_c * h_c).sum((1, 2)) / (h_c ** 2).sum((1, 2)).clamp_min(1e-300)
    return c.clamp(0.0, 1.0)[:, None]


def per_example_scores(model, data: Dataset, theta: Tensor, g_table: Tensor, k: int, base: str,
                       ref_g_table: Tensor | None = None):
    """Per-example gradients at theta [R, d] with the first k reference samples:
    (psi [R, n, d] = grad f(z+-), h [R, n, d] = grad of the control variate,
    psi_aux [R, n, d] = grad l(z+-, g+-), ref_mean [R, n, d] = grad mean_jk l(z~_jk, g~_jk)).
    ``ref_g_table`` (default ``g_table``): g of the reference pairs (a cross-fitted g differs)."""
    R = data.replicates
    u = model.rewards(theta)  # [R, X, A]
    r = torch.arange(R)[:, None]
    x, c, rj = data.context, data.chosen, data.rejected
    s = data.ref_samples[..., :k]
    chosen = u[r, x, c].detach().requires_grad_(True)
    rejected = u[r, x, rj].detach().requires_grad_(True)
    ref = u[r[..., None], x[..., None], s].detach().requires_grad_(True)
    g = g_table.expand(R, *g_table.shape[1:])
    g_ref = g if ref_g_table is None else ref_g_table.expand(R, *ref_g_table.shape[1:])
    aux = g[r, x, c, rj]
    ref_aux = g_ref[r[..., None, None], x[..., None, None], s[..., :, None], s[..., None, :]]
    terms = vrpo_loss_terms(chosen, rejected, aux, ref, ref_aux, base=base, validate=False)
    d_c, d_r = torch.autograd.grad(terms.observed.sum(), [chosen, rejected], retain_graph=True)
    psi = model.per_example_grad(x, torch.stack([c, rj], -1), torch.stack([d_c, d_r], -1))
    a_c, a_r = torch.autograd.grad(terms.observed_aux.sum(), [chosen, rejected], retain_graph=True)
    psi_aux = model.per_example_grad(x, torch.stack([c, rj], -1), torch.stack([a_c, a_r], -1))
    (d_ref,) = torch.autograd.grad(terms.reference.sum(), [ref])
    ref_mean = model.per_example_grad(x, s, d_ref)
    return psi, ref_mean - psi_aux, psi_aux, ref_mean


def greedy_regret(world: World, model, theta: Tensor) -> Tensor:
    """Regret of the induced policy (greedy in the fitted reward, the beta -> 0 limit of the
    KL-regularised optimum) in true win rate against pi_ref:
    sum_x rho(x) [max_a s*(x, a) - s*(x, argmax_a r_theta(x, a))]. [R]"""
    s = world.win_rate_vs_ref()  # [X, A]
    best = s.max(-1).values
    pick = model.rewards(theta).argmax(-1)  # [R, X]
    chosen = s[torch.arange(s.shape[0]), pick]
    return ((best - chosen) * world.context_probs).sum(-1)


def greedy_disagreement(world: World, model, theta: Tensor, target: Tensor) -> Tensor:
    """Share of prompts (weighted by rho) where the greedy response of theta [R, d] is not the
    target's: sum_x rho(x) 1[argmax_a r_theta(x, a) != argmax_a r_target(x, a)]. [R]"""
    pick, best = model.rewards(theta).argmax(-1), model.rewards(target[None]).argmax(-1)
    return ((pick != best).to(world.context_probs.dtype) * world.context_probs).sum(-1)


def summarize(theta: Tensor, target: Tensor, ok: Tensor, regret: Tensor, rng: np.random.Generator,
              boot: int = 1000, target_regret: float = 0.0, disagreement: Tensor | None = None) -> dict:
    """bias^2, variance (trace, over replicates), MSE = bias^2 + variance, a bootstrap 95% CI
    of the MSE over replicates, mean regret and excess regret over the target's own
    (``target_regret``) with CIs, the greedy policy's disagreement with the target's, failed
    fits. Failed fits count in the MSE (the estimator as used) and are also excluded in
    ``mse_converged``."""
    err = (theta - target).numpy()
    sq = (err ** 2).sum(-1)
    bias = err.mean(0)
    bias2, mse = float((bias ** 2).sum()), float(sq.mean())
    idx = rng.integers(0, len(sq), size=(boot, len(sq)))
    ci = lambda v: [float(x) for x in np.percentile(v[idx].mean(1), [2.5, 97.5])]  # noqa: E731
    okn = ok.numpy()
    reg = regret.numpy()
    out = {
        "bias2": bias2, "variance": mse - bias2, "mse": mse, "mse_ci": ci(sq),
        "mse_converged": float(sq[okn].mean()) if okn.any() else float("nan"),
        "regret": float(reg.mean()), "regret_ci": ci(reg),
        "excess_regret": float(reg.mean()) - target_regret, "excess_regret_ci": [x - target_regret for x in ci(reg)],
        "failed_fits": int((~okn).sum()),
        "_sq_err": sq, "_regret": reg,
    }
    if disagreement is not None:
        out["disagreement"] = float(disagreement.mean())
    return out


def failed(theta: Tensor, converged: Tensor, target: Tensor) -> Tensor:
    """A fit failed: not converged, not finite, or diverged (|theta - target| > 10 max(1, |target|))."""
    far = (theta - target).norm(dim=-1) > 10 * max(1.0, float(target.norm()))
    return ~converged | far | ~torch.isfinite(theta).all(-1)


def run_setting(world: World, replicates: int, n: int, methods: list[str], *, primary: str = "linear_bt",
                ridge: float | None = None, seed: int = 0, max_k: int = 16, progress=None) -> dict:
    """Fit ``methods`` on the same R datasets of ``world``; return per-method summaries.
    ``ridge`` defaults to the primary model's own (``LinearReward.ridge``, ``TabularPolicy.ridge``)."""
    model = PRIMARY_MODELS[primary](world.features)
    ridge = model.ridge if ridge is None else ridge
    data = simulate_for(world, replicates, n, max_k, seed)
    specs = {m: METHODS[m] for m in methods}
    aux = aux_tables(world, data, {s.aux for s in specs.values() if s.aux}, seed)
    cell_w = cell_weights(data)
    targets = {b: population_target(world, model, b, ridge) for b in {s.base for s in specs.values()}}
    ref_cache: dict = {}
    pilots: dict = {}  # base-loss fits: warm start of every fit, pilot of the optimal c
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in specs.items():
        warm = spec.base in WARM_STARTABLE
        if (warm or spec.coef == "optimal") and spec.base not in pilots:
            pilots[spec.base] = fit(model, Problem("base", spec.base, cell_w), replicates, ridge).theta
        coef: Tensor | float = 1.0
        if spec.coef == "optimal":
            coef = optimal_coef(model, world, data, pilots[spec.base], aux[spec.aux][0], spec.k, spec.base)
        problem = build_problem(spec, world, data, cell_w, aux, ref_cache, coef)
        result: Fit = fit(model, problem, replicates, ridge, init=pilots[spec.base] if warm else None)
        target = targets[spec.base]
        bad = failed(result.theta, result.converged, target)
        out[name] = summarize(result.theta, target, ~bad, greedy_regret(world, model, result.theta), rng,
                              target_regret=float(greedy_regret(world, model, target[None])[0]),
                              disagreement=greedy_disagreement(world, model, result.theta, target))
        if spec.coef == "optimal":
            out[name]["coef_mean"] = float(coef.mean())
        if progress is not None:
            progress.update(1)
    out["_target"] = {b: {"theta": t.tolist(), "regret": float(greedy_regret(world, model, t[None])[0]),
                          "objective": target_objective(world, model, b, ridge, t)}
                      for b, t in targets.items()}
    return out


AUX_LABEL_FACTORS = (1, 4, 16)  # the auxiliary model's own labels, as multiples of n


def aux_learning_curve(world: World, replicates: int, n: int, *, seed: int = 0, ridge: float = 1e-3,
                       factors=AUX_LABEL_FACTORS, k: int = ORACLE_K) -> dict:
    """What it takes for a fitted g to match the oracle: VRPO (K = k, sigmoid) with g = the
    flexible model of ``aux_models`` trained on m = factor * n labels of its own (a separate
    preference set drawn from the same world, as a judge or a GPM is trained; no cross-fitting
    needed), beside the cross-fitted g on the n labels themselves and the oracle. Per entry:
    MSE ratio to the base and the fraction of the oracle's MSE cut; and the rms of g - p*
    over reference pairs (weights pi_ref(a) pi_ref(b))."""
    res = run_setting(world, replicates, n, ["base", "vrpo_oracle", "vrpo_crossfit"], ridge=ridge, seed=seed)
    model = PRIMARY_MODELS["linear_bt"](world.features)
    data = simulate_for(world, replicates, n, 16, seed)
    cell_w, target = cell_weights(data), population_target(world, model, "sigmoid", ridge)
    ref_w, ties = ref_pair_weights(data, k)
    base_theta = fit(model, Problem("base", "sigmoid", cell_w), replicates, ridge).theta
    b, o = res["base"]["mse"], res["vrpo_oracle"]["mse"]
    out = {"n": n, "k": k, "oracle_mse_ratio": o / b,
           "crossfit": {"labels": n, "mse_ratio": res["vrpo_crossfit"]["mse"] / b,
                        "fraction_of_oracle": (b - res["vrpo_crossfit"]["mse"]) / (b - o)}, "own_labels": {}}
    for factor in factors:
        m = factor * n
        extra = simulate_for(world, replicates, m, 2, seed + 7_919 * factor)
        g = aux_models.fitted_aux(world, extra, seed=seed)[0]
        theta = fit(model, Problem("vrpo", "sigmoid", cell_w, g, ref_w, ties, g), replicates, ridge, init=base_theta).theta
        mse = float(((theta - target) ** 2).sum(-1).mean())
        out["own_labels"][str(m)] = {"labels": m, "mse_ratio": mse / b, "fraction_of_oracle": (b - mse) / (b - o),
                                     "g_rms_error": _g_error(world, g)}
    return out


def _g_error(world: World, g: Tensor) -> float:
    """Root mean square of g - p* over reference pairs, averaged over datasets."""
    pair = world.ref_probs[:, :, None] * world.ref_probs[:, None, :] * world.context_probs[:, None, None]
    return float((((g - world.pref) ** 2) * pair).sum((-3, -2, -1)).mean().sqrt())


def simulate_for(world: World, replicates: int, n: int, max_k: int, seed: int) -> Dataset:
    from vrpo.simulate.data import simulate

    return simulate(world, replicates, n, max_k=max_k, seed=seed)
