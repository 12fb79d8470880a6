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


# --------------------------------------------------------------------------------------
# Reviewers of the LM-regimes experiment (docs/lm_regimes.md): sharp, nearly deterministic
# preferences over response features the reviewers see clearly, so that the pair a reviewer
# happened to see, not the coin flip of the label, drives the gradient's variance. The
# mixture above is left unchanged (the IMDb tables use it).
# --------------------------------------------------------------------------------------
_PUNCTUATION = set(".,!?;:")


def punctuation_count(texts: Sequence[str]) -> np.ndarray:
    return np.array([sum(c in _PUNCTUATION for c in t) for t in texts], dtype=np.float64)


def char_count(texts: Sequence[str]) -> np.ndarray:
    return np.array([len(t.strip()) for t in texts], dtype=np.float64)


class FeatureReviewer:
    """A reviewer whose p*(x, a, b) is a function of features of prompt + response:
    ``s`` = gold P(positive) of prompt + response, ``chars`` = the response's length in
    characters, ``punct`` = its punctuation marks. Subclasses define ``prob(fa, fb)``
    (antisymmetric) and may define ``utility(f)`` (the truth a policy is judged by)."""

    def __init__(self, gold):
        self.gold = gold

    def features(self, prompts, responses) -> dict[str, np.ndarray]:
        return {"s": self.gold.score([p + r for p, r in zip(prompts, responses)]), "chars": char_count(responses),
                "punct": punctuation_count(responses)}

    def prob(self, fa: dict, fb: dict) -> np.ndarray:
        raise NotImplementedError

    def utility(self, f: dict) -> np.ndarray | None:
        return None

    def preference(self, prompts, responses_a, responses_b) -> np.ndarray:
        """p*(x, a, b), float64 [N]."""
        return self.prob(self.features(prompts, responses_a), self.features(prompts, responses_b))

    def label(self, prompts, responses_a, responses_b, rng: np.random.Generator) -> np.ndarray:
        """One verdict per pair: 1 if a wins, a Bernoulli(p*) draw."""
        return (rng.random(len(prompts)) < self.preference(prompts, responses_a, responses_b)).astype(np.int64)


class SharpSentimentReviewer(FeatureReviewer):
    """One sharp reviewer, Bradley-Terry in the gold score: P = sigmoid(steepness (s_a - s_b)).
    At steepness 40 a typical difference between two continuations of one prompt (0.1-0.2)
    is decided with probability 0.98-0.999: the label is nearly a function of the pair."""

    def __init__(self, gold, steepness: float = 40.0):
        super().__init__(gold)
        self.steepness = steepness

    def prob(self, fa, fb):
        return _sigmoid(self.steepness * (fa["s"] - fb["s"]))


class TargetSentimentReviewer(FeatureReviewer):
    """A nonlinear utility: prefers sentiment near ``target``, not the most positive,
    u = -|s - target|, P = sigmoid(steepness (u_a - u_b)). Bradley-Terry in u, but u is
    not monotone in the gold score."""

    def __init__(self, gold, target: float = 0.7, steepness: float = 40.0):
        super().__init__(gold)
        self.target, self.steepness = target, steepness

    def prob(self, fa, fb):
        return _sigmoid(self.steepness * (self.utility(fa) - self.utility(fb)))

    def utility(self, f):
        return -np.abs(f["s"] - self.target)


class MajorityPanel(FeatureReviewer):
    """An intransitive panel: three sharp judges, each looking at one feature (sentiment,
    length in characters, punctuation), vote; the label is their majority. With judge
    probabilities p1, p2, p3 (each sigmoid(k_f (f_a - f_b)), k_f set so that a typical
    difference within a prompt is decided with probability ~0.98),

        p*(a > b) = p1 p2 + p1 p3 + p2 p3 - 2 p1 p2 p3,

    the probability that at least two of three independent judges prefer a (antisymmetric:
    the majority of complements is the complement). Majority over features is a Condorcet
    cycle: a = (high s, mid length, low punct), b = (mid, low, high), c = (low, high, mid)
    gives a > b > c > a (tests/test_lm_regimes.py), so no reward r fits it."""

    STEEPNESS = {"s": 30.0, "chars": 0.3, "punct": 3.0}

    def __init__(self, gold, steepness: dict | None = None):
        super().__init__(gold)
        self.steepness = dict(steepness or self.STEEPNESS)

    def judges(self, fa, fb) -> list[np.ndarray]:
        return [_sigmoid(k * (np.asarray(fa[f]) - np.asarray(fb[f]))) for f, k in self.steepness.items()]

    def prob(self, fa, fb):
        p1, p2, p3 = self.judges(fa, fb)
        return p1 * p2 + p1 * p3 + p2 * p3 - 2 * p1 * p2 * p3
