"""Simulated labelled datasets, R replicates at once, and their sufficient statistics.

Per replicate: n labelled examples (x, y+, y-) with x ~ rho, the pair drawn iid from the
labelled pairs' policy (pi_ref when the reference policy is correct; a tie a == b is a
comparison of a response with itself, labelled by a fair coin) and the label from p*; and
``max_k`` fresh reference samples per example from pi_ref. The first K of them are VRPO's
K reference samples, so K = 2, 4, 8, 16 share one dataset (nested, as in a real run that
drew 16 and used a prefix).

Because the world is finite, every loss in this testbed is a sum over the cells (x, a, b);
``cell_weights`` and ``ref_pair_weights`` turn the n examples into counts per cell. This is
an exact regrouping of the per-example average (the loss is linear in the counts and in g),
checked against a per-example loop in tests/test_simulate.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vrpo.losses import pair_indices
from vrpo.simulate.world import World


@dataclass
class Dataset:
    """R replicated datasets. Integer index tensors, responses indexed within the context."""

    context: Tensor  # [R, n] x_i
    chosen: Tensor  # [R, n] y+_i
    rejected: Tensor  # [R, n] y-_i
    ref_samples: Tensor  # [R, n, max_k] y~_i1 .. y~_iK from pi_ref(. | x_i)
    num_contexts: int
    num_responses: int

    @property
    def replicates(self) -> int:
        return self.context.shape[0]

    @property
    def n(self) -> int:
        return self.context.shape[1]

    def cell_index(self) -> Tensor:
        """Flat index of the ordered cell (x, y+, y-) in an [X, A, A] table. [R, n]"""
        A = self.num_responses
        return (self.context * A + self.chosen) * A + self.rejected


def _draw(probs: Tensor, context: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Responses from probs[x] for each context in ``context`` [R, n]: [R, n, size]."""
    cdf = probs.cumsum(-1)[context]  # [R, n, A]
    u = torch.rand(*context.shape, size, generator=gen, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_max(probs.shape[-1] - 1)


def simulate(world: World, replicates: int, n: int, max_k: int = 16, seed: int = 0) -> Dataset:
    """Draw ``replicates`` independent datasets of n labelled pairs from ``world``."""
    if replicates < 1 or n < 1:
        raise ValueError(f"simulate: replicates={replicates}, n={n}; expected both >= 1")
    if max_k < 2:
        raise ValueError(f"simulate: max_k={max_k}; expected at least 2 reference samples")
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(world.context_probs, replicates * n, replacement=True, generator=gen).view(replicates, n)
    pair = _draw(world.data_probs, x, 2, gen)
    a, b = pair[..., 0], pair[..., 1]
    p_ab = world.pref[x, a, b]
    a_wins = torch.rand(p_ab.shape, generator=gen, dtype=p_ab.dtype) < p_ab
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    ref = _draw(world.ref_probs, x, max_k, gen)
    return Dataset(x, chosen, rejected, ref, world.num_contexts, world.num_responses)


def cell_weights(data: Dataset, values: Tensor | None = None) -> Tensor:
    """Sum over examples of ``values`` (default 1) per ordered cell (x, y+, y-), divided by n.

    Shape [R, X, A, A]; with values = 1 it is the empirical distribution of labelled cells."""
    R, n, X, A = data.replicates, data.n, data.num_contexts, data.num_responses
    v = torch.ones(R, n, dtype=torch.float64) if values is None else values
    out = torch.zeros(R, X * A * A, dtype=v.dtype).scatter_add_(1, data.cell_index(), v)
    return (out / n).view(R, X, A, A)


def ref_pair_weights(data: Dataset, k: int) -> tuple[Tensor, Tensor]:
    """Weights of the reference pairs for VRPO with K = k samples per example.

    Every example contributes its k(k-1)/2 pairs j < k with weight 1 / (n * pairs): the
    per-example mean over pairs, averaged over examples. Returns (pair weights [R, X, A, A],
    symmetric in (a, b), zero diagonal; tie weights [R, X] of pairs with y~_j == y~_k, whose
    loss l(0, 1/2) = f(0) is a constant)."""
    if not 2 <= k <= data.ref_samples.shape[-1]:
        raise ValueError(f"k: {k}; expected 2 <= k <= {data.ref_samples.shape[-1]} (the samples drawn)")
    R, n, X, A = data.replicates, data.n, data.num_contexts, data.num_responses
    j, l = pair_indices(k)
    sj, sl = data.ref_samples[..., j], data.ref_samples[..., l]  # [R, n, P]
    idx = (data.context[..., None] * A + sj) * A + sl
    w = torch.zeros(R, X * A * A, dtype=torch.float64)
    w.scatter_add_(1, idx.reshape(R, -1), torch.full(idx.shape, 1.0 / (n * j.numel()), dtype=torch.float64).reshape(R, -1))
    w = w.view(R, X, A, A)
    ties = torch.diagonal(w, dim1=-2, dim2=-1).sum(-1)
    w = w + w.transpose(-1, -2)
    w = w - torch.diag_embed(torch.diagonal(w, dim1=-2, dim2=-1))
    return w, ties


def exact_ref_pair_weights(context_weights: Tensor, ref_probs: Tensor) -> tuple[Tensor, Tensor]:
    """The exact expectation over reference pairs (the limit K -> infinity): each example in
    context x carries the pair weights pi_ref(a|x) pi_ref(b|x). ``context_weights`` [..., X]
    is the share of examples in each context. Returns ([..., X, A, A], ties [..., X]); the
    unordered pair {a, b} carries 2 pi_ref(a) pi_ref(b) (both orders), like ``ref_pair_weights``."""
    outer = ref_probs[:, :, None] * ref_probs[:, None, :]
    ties = torch.diagonal(outer, dim1=-2, dim2=-1).sum(-1)
    offdiag = outer - torch.diag_embed(torch.diagonal(outer, dim1=-2, dim2=-1))
    return context_weights[..., None, None] * 2.0 * offdiag, context_weights * ties


def population_cell_weights(world: World) -> Tensor:
    """Expected ``cell_weights``: 2 rho(x) pi_data(a|x) pi_data(b|x) p*(x, a, b) for a != b
    (the pair is drawn as (a, b) or (b, a)); a tie a == b lands in cell (a, a) whichever way
    the coin falls (weight rho pi(a)^2). Sums to 1. [X, A, A]"""
    pi = world.data_probs
    wins = 2.0 * world.pref  # diagonal: 2 * 1/2 = 1
    return world.context_probs[:, None, None] * pi[:, :, None] * pi[:, None, :] * wins
