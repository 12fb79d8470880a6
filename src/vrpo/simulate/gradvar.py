"""Issue 8's measurement: the variance, across datasets, of the loss gradient at a fixed
parameter (the population target), for the base loss and for oracle VRPO with K reference
samples; and the prediction of ``vrpo.diagnostics.variance_decomposition`` from ONE
dataset, to check that the diagnostic a user runs on their own data tells the truth."""
from __future__ import annotations

import torch

from vrpo.diagnostics import variance_decomposition
from vrpo.losses import soft_label_loss
from vrpo.simulate.data import simulate
from vrpo.simulate.estimators import LinearReward
from vrpo.simulate.experiment import per_example_scores, population_target
from vrpo.simulate.world import World

KS = (2, 4, 8, 16)


def ref_pair_scores(model: LinearReward, world: World, data, theta: torch.Tensor, g_table,
                    replicate: int = 0, base: str = "sigmoid") -> torch.Tensor:
    """grad l(z~_jk, g~_jk) for all pairs of one replicate's reference samples: [n, K, K, d]."""
    u = model.rewards(theta[None])[0]  # [X, A]
    x, s = data.context[replicate], data.ref_samples[replicate]  # [n], [n, K]
    r = u[x[:, None], s]  # [n, K]
    z = (r[:, :, None] - r[:, None, :]).detach().requires_grad_(True)
    g = g_table[0][x[:, None, None], s[:, :, None], s[:, None, :]]
    (dz,) = torch.autograd.grad(soft_label_loss(z, g, base).sum(), z)
    phi = model.features[x[:, None], s]  # [n, K, d]
    return dz[..., None] * (phi[:, :, None, :] - phi[:, None, :, :])


def gradient_variance(world: World, replicates: int, n: int, seed: int = 0, ridge: float = 1e-3,
                      base: str = "sigmoid") -> dict:
    """Across-replicate trace variance of the mean gradient at the population target:
    ``measured`` {K: Var(VRPO_K) / Var(base)} with the oracle g, and the diagnostic's
    ``predicted`` / ``label_noise_share`` / ``pair_share`` from replicate 0 alone."""
    model = LinearReward(world.features)
    theta = population_target(world, model, base, ridge)
    data = simulate(world, replicates, n, max_k=max(KS), seed=seed + 104729)
    g = world.pref[None]
    theta_r = theta[None].expand(replicates, -1)
    measured = {}
    base_var = None
    for k in KS:
        psi, h, psi_aux, _ = per_example_scores(model, data, theta_r, g, k, base)
        if base_var is None:
            base_var = float(psi.mean(1).var(0, unbiased=True).sum())
        measured[str(k)] = float((psi + h).mean(1).var(0, unbiased=True).sum()) / base_var
    diag = variance_decomposition(psi[0].numpy(), psi_aux[0].numpy(),
                                  ref_pair_scores(model, world, data, theta, g, 0, base).numpy(), KS)
    return {"measured_ratio": measured, "predicted_ratio": diag["predicted_ratio"],
            "one_dataset_measured_ratio": diag["measured_ratio"],
            "label_noise_share": diag["label_noise_share"], "pair_share": diag["pair_share"],
            "between_share": diag["between_share"], "replicates": replicates, "n": n}
