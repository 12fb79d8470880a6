"""Auxiliary preference models g(x, a, b) for the testbed, as tables [R or 1, X, A, A].

- ``oracle``: g = p*.
- ``wrong``: g = 1 - p*, a judge that prefers the opposite (deliberately wrong; with pi_ref
  correct the target is unchanged, only the variance can grow).
- ``fitted``: a flexible, non-Bradley-Terry preference model trained on the labelled pairs:
  ridge logistic regression on antisymmetric pair features u(a, b) = [e(a) - e(b),
  phi_a - phi_b, quadratic terms phi_a phi_a' - phi_b phi_b', skew terms phi_a phi_b' -
  phi_b phi_a'], where e = ``RANDOM_FEATURES`` random Fourier features of phi (a Gaussian
  kernel's, bandwidth 1 = the features' scale: a smooth reward of any shape, not a guess of
  the truth's). g(a, b) = sigmoid(w' u(a, b)) is antisymmetric by construction and can express
  nonlinear rewards and intransitive (cyclic) preferences, like a general preference model
  (GPM) on embeddings. The ridge is chosen per dataset from ``RIDGES`` by the out-of-fold
  log-loss of the labels (no truth used). Fitted on all labelled pairs and used for observed
  and reference pairs alike (leaks the label), or cross-fitted with
  ``vrpo.aux.crossfit.fold_ids``: out-of-fold predictions for the observed pairs, the fold
  average for the reference pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vrpo.aux.crossfit import fold_ids
from vrpo.simulate.data import Dataset, cell_weights
from vrpo.simulate.world import World


RANDOM_FEATURES = 50  # random Fourier features of phi in the auxiliary model
RIDGES = (1e-1, 1e-2, 1e-3)  # candidate ridges (per unit of the mean log-likelihood), each fit warm-starts the next


def random_features(features: Tensor, num: int = RANDOM_FEATURES, seed: int = 0) -> Tensor:
    """sqrt(2 / D) cos(W' phi + b), W ~ N(0, I), b ~ U(0, 2 pi): [X, A, D]. Fixed by ``seed``
    (part of the model's definition, shared by every dataset)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(features.shape[-1], num, generator=gen, dtype=features.dtype)
    b = torch.rand(num, generator=gen, dtype=features.dtype) * 2 * torch.pi
    return (2.0 / num) ** 0.5 * torch.cos(features @ w + b)


def pair_features(features: Tensor) -> Tensor:
    """Antisymmetric pair features u(x, a, b), u(b, a) = -u(a, b): [X, A, A, q]."""
    X, A, d = features.shape
    pa, pb = features[:, :, None, :], features[:, None, :, :]
    iu = torch.triu_indices(d, d)
    quad = pa[..., :, None] * pa[..., None, :] - pb[..., :, None] * pb[..., None, :]
    quad = quad[..., iu[0], iu[1]].expand(X, A, A, -1)
    ju = torch.triu_indices(d, d, offset=1)
    skew = pa[..., :, None] * pb[..., None, :] - pb[..., :, None] * pa[..., None, :]
    e = random_features(features)
    parts = [e[:, :, None, :] - e[:, None, :, :], (pa - pb).expand(X, A, A, d), quad, skew[..., ju[0], ju[1]]]
    return torch.cat(parts, -1)


def fit_logistic(u: Tensor, wins: Tensor, losses: Tensor, ridge: float | Tensor = 1e-2, iters: int = 25,
                 init: Tensor | None = None) -> Tensor:
    """Weighted ridge logistic regression by Newton, batched: maximise
    sum_c [wins_c log sigmoid(w' u_c) + losses_c log sigmoid(-w' u_c)] - ridge/2 |w|^2.
    u [C, q] (one row per unordered pair); wins, losses [B, C] (shares of examples where the
    first / second response of the pair won); ridge a float or [B]; ``init`` [B, q] a warm
    start (the objective is strictly concave: it changes the steps, not the answer).
    Returns w [B, q]."""
    B, q = wins.shape[0], u.shape[-1]
    w = torch.zeros(B, q, dtype=u.dtype) if init is None else init.clone()
    ridge = torch.as_tensor(ridge, dtype=u.dtype).expand(B)[:, None]
    eye = torch.eye(q, dtype=u.dtype)
    total = wins + losses
    for _ in range(iters):
        s = torch.sigmoid(w @ u.T)  # [B, C]
        grad = -((wins - total * s) @ u) + ridge * w
        hess = ((total * s * (1 - s))[:, :, None] * u).transpose(1, 2) @ u + ridge[..., None] * eye
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        w = w - step
        if float(step.abs().max()) < 1e-7:
            break
    return w


def _pairs(num_responses: int) -> tuple[Tensor, Tensor]:
    return tuple(torch.triu_indices(num_responses, num_responses, offset=1))


def _fit_on_cells(u_pairs: Tensor, cells: Tensor, ridge: float | Tensor, init: Tensor | None = None) -> Tensor:
    """cells [B, X, A, A] (share with a chosen over b) -> w [B, q] on unordered pairs a < b."""
    a, b = _pairs(cells.shape[-1])
    wins, losses = cells[..., a, b], cells[..., b, a]  # [B, X, P]
    return fit_logistic(u_pairs, wins.reshape(cells.shape[0], -1), losses.reshape(cells.shape[0], -1), ridge,
                        init=init)


def _predict(features: Tensor, w: Tensor) -> Tensor:
    """g(x, a, b) = sigmoid(w' u(x, a, b)) for every ordered pair: [B, X, A, A]."""
    u = pair_features(features)  # [X, A, A, q]
    return torch.sigmoid(torch.einsum("xabq,rq->rxab", u, w))


def _u_pairs(features: Tensor) -> Tensor:
    a, b = _pairs(features.shape[1])
    return pair_features(features)[:, a, b].reshape(-1, pair_features(features).shape[-1])


def oracle_aux(world: World) -> Tensor:
    return world.pref[None]


def wrong_aux(world: World) -> Tensor:
    return 1.0 - world.pref[None]


def fitted_aux(world: World, data: Dataset, ridge: float | Tensor | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fit on all labelled pairs, with ``ridge`` (a float, or [R] per dataset) or (None) the
    one ``crossfit_tables`` selects for each dataset. Returns (g for observed cells, g for reference pairs), both
    [R, X, A, A] (the same table)."""
    r = crossfit_tables(world, data, 5, seed, RIDGES)[2] if ridge is None else ridge
    w = _fit_on_cells(_u_pairs(world.features), cell_weights(data), r)
    g = _predict(world.features, w)
    return g, g


def crossfit_aux(world: World, data: Dataset, folds: int = 5, seed: int = 0,
                 ridge: float | None = None) -> tuple[Tensor, Tensor]:
    """Cross-fitted: g for an observed example comes from the model fitted without its
    fold. ``ridge``: fixed, or (None) chosen per dataset from ``RIDGES`` by the out-of-fold
    log-loss of the labels. Returns (mean out-of-fold g per observed cell [R, X, A, A] (0.5
    where empty), fold-average g for reference pairs [R, X, A, A]); no prediction sees its
    own label."""
    out_of_fold, fold_avg, _ = crossfit_tables(world, data, folds, seed, RIDGES if ridge is None else (ridge,))
    return out_of_fold, fold_avg


def crossfit_tables(world: World, data: Dataset, folds: int, seed: int, ridges) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-fitted tables for each ridge; per dataset, those of the ridge with the lowest
    out-of-fold log-loss, -sum over examples of log g_oof(x, y+, y-). Returns (out-of-fold
    [R, X, A, A], fold average [R, X, A, A], chosen ridge [R])."""
    R, n, X, A = data.replicates, data.n, world.num_contexts, world.num_responses
    fold = torch.as_tensor(fold_ids(n, folds, random_state=seed))  # [n], shared by replicates
    idx = fold[None, :].expand(R, n) * (X * A * A) + data.cell_index()
    per_fold = torch.zeros(R, folds * X * A * A, dtype=torch.float64)
    per_fold.scatter_add_(1, idx, torch.full((R, n), 1.0 / n, dtype=torch.float64))
    per_fold = per_fold.view(R, folds, X, A, A)
    train = per_fold.sum(1, keepdim=True) - per_fold  # all but fold f
    u = _u_pairs(world.features)
    total = per_fold.sum(1)
    oofs, avgs, losses = [], [], []
    w = None
    for ridge in ridges:
        w = _fit_on_cells(u, train.reshape(R * folds, X, A, A), ridge, init=w)
        g_fold = _predict(world.features, w).view(R, folds, X, A, A)
        oof = (per_fold * g_fold).sum(1) / total.clamp_min(1e-300)
        oofs.append(torch.where(total > 0, oof, torch.full_like(oof, 0.5)))
        avgs.append(g_fold.mean(1))
        losses.append(-(per_fold * torch.log(g_fold.clamp_min(1e-300))).sum((1, 2, 3, 4)))
    best = torch.stack(losses).argmin(0)  # [R]
    pick = lambda tables: torch.stack(tables)[best, torch.arange(R)]  # noqa: E731
    return pick(oofs), pick(avgs), torch.as_tensor(ridges, dtype=torch.float64)[best]
