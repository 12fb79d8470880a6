"""Simulated reviewers: who labels the pairs, and the auxiliary models built from them.

The population is a mixture of three reviewer groups (the testbed's "reviewer groups"
kind); a labelled pair's winner is drawn from the mixture's probability

    p*(x, a, b) = sum_g w_g P_g(a > b),   with, for s = gold P(positive) of prompt + response
                                           and n = its number of words,
    - careful readers  (w = 0.60): P = sigmoid(10 (s_a - s_b))            (graded sentiment)
    - skimmers         (w = 0.25): P = 1/2 + 0.45 (1[s_a > 1/2] - 1[s_b > 1/2])  (thresholded)
    - wordy reviewers  (w = 0.15): P = sigmoid(0.5 (n_a - n_b))            (prefer more words)

Why this population. Each group alone is Bradley-Terry in its own utility, but the mixture
is not Bradley-Terry in ANY reward: BT makes logit P(a>b) additive along a chain,
logit P(a>c) = logit P(a>b) + logit P(b>c), and the mixture breaks that (a known triple in
``tests/test_imdb.py`` misses it by a wide margin). So DPO, which fits a BT model in its
implicit reward, is misspecified, the regime where the paper says the control variate
helps. The majority still agrees with the gold reward, so a better fit of p* means a higher
gold score; the wordy minority is the part of p* the gold reward does not reward.

Auxiliary models (all antisymmetric by construction, g(a, b) = 1 - g(b, a)):
- ``OracleAux``: p* itself, the reviewers' exact expected preference;
- ``WordCountJudge``: the misspecified auxiliary model, a Bradley-Terry judge on word count
  only: it models the wordy minority and ignores sentiment (a wrong feature).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vrpo.aux.base import AuxModel

GROUP_WEIGHTS = {"careful": 0.60, "skimmer": 0.25, "wordy": 0.15}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def careful(s_a, s_b, n_a, n_b):
    """Graded sentiment: a steep BT in the gold probability."""
    return _sigmoid(10.0 * (np.asarray(s_a) - np.asarray(s_b)))


def skimmer(s_a, s_b, n_a, n_b):
    """Thresholded sentiment: only notices whether a response reads positive."""
    return 0.5 + 0.45 * ((np.asarray(s_a) > 0.5).astype(float) - (np.asarray(s_b) > 0.5).astype(float))


def wordy(s_a, s_b, n_a, n_b):
    """Prefers the response with more words."""
    return _sigmoid(0.5 * (np.asarray(n_a, dtype=float) - np.asarray(n_b, dtype=float)))


GROUPS: dict[str, Callable] = {"careful": careful, "skimmer": skimmer, "wordy": wordy}


def mixture_preference(s_a, s_b, n_a, n_b, weights: dict[str, float] = GROUP_WEIGHTS) -> np.ndarray:
    """p*(a > b) of the reviewer population from the features of a and b, float64 [N]."""
    return sum(w * GROUPS[g](s_a, s_b, n_a, n_b) for g, w in weights.items())


def word_count(texts: Sequence[str]) -> np.ndarray:
    return np.array([len(t.split()) for t in texts], dtype=np.float64)


class SimulatedReviewers:
    """Label pairs with the mixture ``p*``; features read from prompt + response text."""

    def __init__(self, gold, weights: dict[str, float] = GROUP_WEIGHTS):
        if abs(sum(weights.values()) - 1.0) > 1e-9 or any(w < 0 for w in weights.values()):
            raise ValueError(f"reviewer weights: {weights}; expected non-negative weights summing to 1")
        unknown = set(weights) - set(GROUPS)
        if unknown:
            raise ValueError(f"reviewer weights: unknown group(s) {sorted(unknown)}; expected some of {sorted(GROUPS)}")
        self.gold = gold
        self.weights = dict(weights)

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(gold score s of prompt + response, word count n of the response)."""
        return self.gold.score([p + r for p, r in zip(prompts, responses)]), word_count(responses)

    def preference(self, prompts, responses_a, responses_b) -> np.ndarray:
        """p*(x, a, b), float64 [N]."""
        s_a, n_a = self.features(prompts, responses_a)
        s_b, n_b = self.features(prompts, responses_b)
        return mixture_preference(s_a, s_b, n_a, n_b, self.weights)

    def label(self, prompts, responses_a, responses_b, rng: np.random.Generator) -> np.ndarray:
        """One reviewer's verdict per pair: 1 if a wins, else 0 (a Bernoulli(p*) draw)."""
        return (rng.random(len(prompts)) < self.preference(prompts, responses_a, responses_b)).astype(np.int64)


class OracleAux(AuxModel):
    """The auxiliary model that knows the reviewers: g = p* exactly."""

    antisymmetric_by_construction = True

    def __init__(self, reviewers: SimulatedReviewers):
        self.reviewers = reviewers

    def _predict_raw(self, prompts, responses_a, responses_b):
        return self.reviewers.preference(prompts, responses_a, responses_b)


class WordCountJudge(AuxModel):
    """Misspecified auxiliary model: Bradley-Terry on word count only, g = sigmoid(0.5 (n_a - n_b))."""

    antisymmetric_by_construction = True

    def _predict_raw(self, prompts, responses_a, responses_b):
        return wordy(0, 0, word_count(responses_a), word_count(responses_b))
