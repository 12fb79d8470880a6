"""A finite contextual bandit with exact truth: contexts x, a finite response set per
context with features phi(x, a), a reference policy pi_ref, and a true preference
p*(x, a, b). Everything the estimators target is a finite sum over this world, so the
population target and the regret are computed exactly, never by simulation.

The features are named after the scheduling scenario (a clinic's scheduling assistant,
docs/scheduling.md): each response has
``brevity``, ``booking`` (books an appointment), ``escalation`` (cautious, sends the user
to urgent care) and ``politeness``. The preference kinds in ``PREFERENCE_KINDS`` are the
settings of the testbed (docs/testbed.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

FEATURE_NAMES = ("brevity", "booking", "escalation", "politeness")


@dataclass(frozen=True)
class World:
    """One simulated bandit. Shapes: X contexts, A responses per context, d features."""

    name: str
    features: Tensor  # [X, A, d] phi(x, a)
    context_probs: Tensor  # [X] distribution of prompts
    ref_probs: Tensor  # [X, A] pi_ref(a | x): the policy reference samples come from
    data_probs: Tensor  # [X, A] the policy the labelled pairs came from (= ref_probs if correct)
    pref: Tensor  # [X, A, A] p*(x, a, b) = P(a preferred to b); p + p^T = 1, diagonal 1/2
    misspecified: bool  # True when p* is not Bradley-Terry in theta' phi
    reference_policy: str  # "correct" | "misspecified"

    @property
    def num_contexts(self) -> int:
        return self.features.shape[0]

    @property
    def num_responses(self) -> int:
        return self.features.shape[1]

    def win_rate_vs_ref(self) -> Tensor:
        """s*(x, a) = sum_b pi_ref(b|x) p*(x, a, b): the true win rate of response a against a
        reference response. Well defined for intransitive p*. Shape [X, A]."""
        return torch.einsum("xab,xb->xa", self.pref, self.ref_probs)


def _bt(reward: Tensor, scale: float = 1.0) -> Tensor:
    """Bradley-Terry p(a, b) = sigmoid(scale * (r(a) - r(b))) from a reward [X, A]."""
    return torch.sigmoid(scale * (reward[:, :, None] - reward[:, None, :]))


def pref_bt(phi: Tensor, gen: torch.Generator) -> tuple[Tensor, bool]:
    """Correctly specified: BT on a reward the linear primary model can express."""
    theta = torch.tensor([1.0, 0.6, -0.6, 0.4], dtype=phi.dtype)
    return _bt(phi @ theta), False


def pref_bt_flip(phi: Tensor, gen: torch.Generator, flip_rate: float = 0.2) -> tuple[Tensor, bool]:
    """BT labels flipped at random with probability 0.2: p = eps + (1 - 2 eps) p_BT (not BT)."""
    p, _ = pref_bt(phi, gen)
    return flip_rate + (1 - 2 * flip_rate) * p, True


def pref_mixture(phi: Tensor, gen: torch.Generator) -> tuple[Tensor, bool]:
    """Two reviewer groups, half the labels each: one prefers short booking answers, the
    other cautious escalation. Each group is a sharp BT; their mixture is not BT."""
    brevity, booking, escalation = phi[..., 0], phi[..., 1], phi[..., 2]
    short_booking = 3.0 * (brevity + booking)
    cautious = 3.0 * (escalation - 0.5 * booking - 0.5 * brevity)
    return 0.5 * _bt(short_booking) + 0.5 * _bt(cautious), True


def pref_nonlinear(phi: Tensor, gen: torch.Generator) -> tuple[Tensor, bool]:
    """A sharp BT on a reward outside the linear class: sin and an interaction term."""
    reward = torch.sin(2.0 * phi[..., 0]) + phi[..., 1] * phi[..., 2] + 0.3 * phi[..., 3]
    return _bt(reward, scale=4.0), True


def pref_cyclic(phi: Tensor, gen: torch.Generator) -> tuple[Tensor, bool]:
    """Intransitive: a BT part plus a skew-symmetric bilinear part phi_a' M phi_b (M = -M'),
    which makes rock-paper-scissors cycles among responses."""
    d = phi.shape[-1]
    m = torch.zeros(d, d, dtype=phi.dtype)
    for i in range(d - 1):
        m[i, i + 1], m[i + 1, i] = 1.0, -1.0
    theta = torch.tensor([0.5, 0.3, -0.3, 0.2], dtype=phi.dtype)
    bt_part = (phi @ theta)[:, :, None] - (phi @ theta)[:, None, :]
    cyc = torch.einsum("xad,de,xbe->xab", phi, m, phi)
    return torch.sigmoid(bt_part + 2.5 * cyc), True


# name -> (true preference maker, reference policy correct?)
PREFERENCE_KINDS: dict[str, tuple[Callable, bool]] = {
    "bt": (pref_bt, True),
    "bt_flip": (pref_bt_flip, True),
    "mixture": (pref_mixture, True),
    "nonlinear": (pref_nonlinear, True),
    "cyclic": (pref_cyclic, True),
    "mixture_wrong_ref": (pref_mixture, False),
    "bt_wrong_ref": (pref_bt, False),  # double robustness: BT correct, pi_ref not the labelled pairs' policy
}


def make_world(kind: str, seed: int = 0, num_contexts: int = 20, num_responses: int = 6,
               ref_temperature: float = 1.0, dtype=torch.float64) -> World:
    """Build the world of a setting. Features, pi_ref and (when misspecified) the labelled
    pairs' policy are drawn with ``seed``; p* comes from ``PREFERENCE_KINDS[kind]``."""
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"setting: unknown preference kind {kind!r}; expected one of {sorted(PREFERENCE_KINDS)}")
    if num_contexts < 1 or num_responses < 2:
        raise ValueError(f"world: {num_contexts} contexts x {num_responses} responses; expected >= 1 x >= 2")
    gen = torch.Generator().manual_seed(seed)
    d = len(FEATURE_NAMES)
    phi = torch.randn(num_contexts, num_responses, d, generator=gen, dtype=dtype)
    ref_logits = torch.randn(num_contexts, num_responses, generator=gen, dtype=dtype) * ref_temperature
    ref_probs = torch.softmax(ref_logits, -1)
    # the policy that produced the labelled pairs when pi_ref is misspecified: another
    # checkpoint, here one that leans towards short booking answers
    other_logits = ref_logits + 1.5 * (phi[..., 0] + phi[..., 1]) + torch.randn(
        num_contexts, num_responses, generator=gen, dtype=dtype)
    maker, ref_correct = PREFERENCE_KINDS[kind]
    pref, misspecified = maker(phi, gen)
    pref = _antisymmetric(pref)
    return World(
        name=kind,
        features=phi,
        context_probs=torch.full((num_contexts,), 1.0 / num_contexts, dtype=dtype),
        ref_probs=ref_probs,
        data_probs=ref_probs if ref_correct else torch.softmax(other_logits, -1),
        pref=pref,
        misspecified=misspecified,
        reference_policy="correct" if ref_correct else "misspecified",
    )


def _antisymmetric(p: Tensor) -> Tensor:
    """Exact antisymmetry p(a, b) + p(b, a) = 1 (removes rounding), diagonal 1/2."""
    return 0.5 * (p + 1.0 - p.transpose(-1, -2))


def with_ref_probs(world: World, ref_probs: Tensor) -> World:
    """A copy of ``world`` whose reference samples come from ``ref_probs``."""
    return replace(world, ref_probs=ref_probs)
