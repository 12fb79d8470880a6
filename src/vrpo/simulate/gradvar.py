"""Does the variance diagnostic predict what VRPO does? Measured against predicted.

Measured: the variance, across R simulated datasets, of the mean loss gradient at the
population target theta*, for the base loss and for oracle VRPO with K reference samples
(``measured_ratio``); the estimators' own MSE ratios come from ``experiment.run_setting``.

Predicted: ``vrpo.diagnostics.variance_decomposition`` from ONE dataset (repeated on 20
datasets to show the mean and spread of that one-dataset prediction), fed the per-example
gradients of the actual loss at a parameter theta. Where theta is matters
(docs/variance.md, "Where to evaluate"): the pair variance of the score is a property of the
margins at theta, so the diagnostic is evaluated at three points:

- ``reference``: theta = 0, every margin 0 (the policy is pi_ref). The start of training.
- ``fitted``: the base (DPO / Bradley-Terry) fit on that same dataset: what a user can compute
  (a DPO run's checkpoint), close to the target.
- ``target``: theta* itself (known only in the testbed).

Two predictions at each point: in gradient space, Var(VRPO score) / Var(base score)
(``predicted_ratio``), and in parameter space (``predicted_mse_ratio``), the same with every
per-example score mapped through its objective's inverse Hessian on that dataset (the
first-order, sandwich variance of the fitted parameter):
tr(A_v^-1 V_v A_v^-1) / tr(A_b^-1 V_b A_b^-1), the quantity the MSE ratio measures.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from vrpo.diagnostics import variance_decomposition
from vrpo.losses import soft_label_loss
from vrpo.simulate import aux_models
from vrpo.simulate.data import Dataset, cell_weights, ref_pair_weights, simulate
from vrpo.simulate.estimators import CELL_WEIGHTS, LinearReward, Problem, cell_grad_hessian, fit
from vrpo.simulate.experiment import per_example_scores, population_target
from vrpo.simulate.world import World

KS = (2, 4, 8, 16)
EVAL_POINTS = ("reference", "fitted", "target")
SPREAD_DATASETS = 20  # datasets over which the spread of the one-dataset prediction is shown


def ref_pair_scores(model: LinearReward, data: Dataset, theta: torch.Tensor, g_table: torch.Tensor,
                    replicate: int = 0, base: str = "sigmoid") -> torch.Tensor:
    """grad l(z~_jk, g~_jk) for all pairs of one replicate's reference samples: [n, K0, K0, d].
    theta [d]; g_table [X, A, A] (or [1, X, A, A]): g of the reference pairs."""
    g_table = g_table.reshape(g_table.shape[-3:])
    u = model.rewards(theta[None])[0]  # [X, A]
    x, s = data.context[replicate], data.ref_samples[replicate]  # [n], [n, K0]
    r = u[x[:, None], s]  # [n, K0]
    z = (r[:, :, None] - r[:, None, :]).detach().requires_grad_(True)
    g = g_table[x[:, None, None], s[:, :, None], s[:, None, :]]
    (dz,) = torch.autograd.grad(soft_label_loss(z, g, base).sum(), z)
    phi = model.features[x[:, None], s]  # [n, K0, d]
    return dz[..., None] * (phi[:, :, None, :] - phi[:, None, :, :])


def one_replicate(data: Dataset, r: int) -> Dataset:
    """Replicate r of ``data`` as a dataset of its own."""
    keep = slice(r, r + 1)
    return replace(data, context=data.context[keep], chosen=data.chosen[keep], rejected=data.rejected[keep],
                   ref_samples=data.ref_samples[keep])


def _inverse_hessian(model: LinearReward, problem: Problem, theta: torch.Tensor, ridge: float) -> np.ndarray:
    """A^-1 of the objective + ridge at theta [d] on one dataset: [d, d]."""
    _, h_u = cell_grad_hessian(model.rewards(theta[None]), CELL_WEIGHTS[problem.objective](problem), problem.base)
    return torch.linalg.inv(model.hessian(h_u, ridge)[0]).numpy()


def diagnose_at(model: LinearReward, data: Dataset, theta: torch.Tensor, g_obs: torch.Tensor, g_ref: torch.Tensor,
                ridge: float, base: str = "sigmoid", ks=KS) -> dict:
    """The diagnostic on ONE dataset (``data`` with one replicate) at theta [d], with the
    auxiliary model's g of the observed cells ``g_obs`` and of the reference pairs ``g_ref``
    ([1, X, A, A] each). Gradient-space and parameter-space (MSE) predictions."""
    psi, _, psi_aux, _ = per_example_scores(model, data, theta[None], g_obs, 2, base, ref_g_table=g_ref)
    psi, psi_aux = psi[0].numpy(), psi_aux[0].numpy()
    ref = ref_pair_scores(model, data, theta, g_ref, 0, base).numpy()
    grad = variance_decomposition(psi, psi_aux, ref, ks)
    cell_w = cell_weights(data)
    ref_w, ties = ref_pair_weights(data, data.ref_samples.shape[-1])
    inv_b = _inverse_hessian(model, Problem("base", base, cell_w), theta, ridge)
    inv_v = _inverse_hessian(model, Problem("vrpo", base, cell_w, g_obs, ref_w, ties, g_ref), theta, ridge)
    base_p = variance_decomposition(psi @ inv_b, psi_aux @ inv_b, ref @ inv_b, ks)
    vrpo_p = variance_decomposition(psi @ inv_v, psi_aux @ inv_v, ref @ inv_v, ks)
    mse = {k: vrpo_p["total"] * vrpo_p["predicted_ratio"][k] / base_p["total"] for k in vrpo_p["predicted_ratio"]}
    return {"predicted_ratio": grad["predicted_ratio"], "predicted_mse_ratio": mse,
            "one_dataset_measured_ratio": grad["measured_ratio"],
            **{k: grad[k] for k in ("label_noise_share", "pair_share", "between_share")}}


def _points(fitted: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"reference": torch.zeros_like(target), "fitted": fitted, "target": target}


SHARES = ("label_noise_share", "pair_share", "between_share")


def _average(preds: list[dict]) -> dict:
    """Mean and sd over datasets of each one-dataset prediction (per K) and share."""
    out = {}
    for key in ("predicted_ratio", "predicted_mse_ratio"):
        ks = preds[0][key]
        out[key] = {k: float(np.mean([p[key][k] for p in preds])) for k in ks}
        out[key + "_sd"] = {k: float(np.std([p[key][k] for p in preds], ddof=1)) if len(preds) > 1 else 0.0 for k in ks}
    out.update({k: float(np.mean([p[k] for p in preds])) for k in SHARES})
    out["datasets"] = len(preds)
    return out


def gradient_variance(world: World, replicates: int, n: int, seed: int = 0, ridge: float = 1e-3,
                      base: str = "sigmoid", spread: int = SPREAD_DATASETS) -> dict:
    """``measured_ratio`` {K: Var(VRPO_K) / Var(base)} of the mean gradient at the target
    across replicates (oracle g); ``diagnostic`` {point: the one-dataset prediction with the
    oracle g, averaged over the first ``spread`` datasets, with its sd over them};
    ``diagnostic_crossfit`` the same at the DPO fit with the cross-fitted g (what a user
    has); ``first_dataset`` the predictions from dataset 0 alone. The target point's values
    are repeated at the top level (``predicted_ratio``, ``label_noise_share``, ...)."""
    model = LinearReward(world.features)
    theta = population_target(world, model, base, ridge)
    data = simulate(world, replicates, n, max_k=max(KS), seed=seed + 104729)
    g = world.pref[None]
    theta_r = theta[None].expand(replicates, -1)
    measured, base_var = {}, None
    for k in KS:
        psi, h, _, _ = per_example_scores(model, data, theta_r, g, k, base)
        if base_var is None:
            base_var = float(psi.mean(1).var(0, unbiased=True).sum())
        measured[str(k)] = float((psi + h).mean(1).var(0, unbiased=True).sum()) / base_var
    m = min(spread, replicates)
    first = Dataset(data.context[:m], data.chosen[:m], data.rejected[:m], data.ref_samples[:m],
                    data.num_contexts, data.num_responses)
    fitted = fit(model, Problem("base", base, cell_weights(first)), m, ridge).theta  # [m, d]
    g_obs_cf, g_ref_cf = aux_models.crossfit_aux(world, first, seed=seed)
    per_point = {p: [diagnose_at(model, one_replicate(first, r), th, g, g, ridge, base)
                     for r, th in enumerate(ths)]
                 for p, ths in _points(fitted, theta[None].expand(m, -1)).items()}
    crossfit = [diagnose_at(model, one_replicate(first, r), fitted[r], g_obs_cf[r:r + 1], g_ref_cf[r:r + 1], ridge, base)
                for r in range(m)]
    diag = {p: _average(v) for p, v in per_point.items()}
    return {"measured_ratio": measured, "replicates": replicates, "n": n,
            "predicted_ratio": diag["target"]["predicted_ratio"],
            "one_dataset_measured_ratio": per_point["target"][0]["one_dataset_measured_ratio"],
            **{k: diag["target"][k] for k in SHARES},
            "diagnostic": diag, "diagnostic_crossfit": {"fitted": _average(crossfit)},
            "first_dataset": {p: v[0] for p, v in per_point.items()}}
