"""The gold reward: a sentiment classifier fitted on the labels of the ``gold`` split.

TF-IDF over word 1-2 grams + logistic regression (its held-out accuracy on full reviews is
printed in results.md). Its probability of "positive", in [0, 1], is the paper's "average score":
the quantity every policy is judged by. No policy and no auxiliary model ever sees it
during training except through the simulated reviewers' labels.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np


class GoldReward:
    """``score(texts) -> [N]`` P(positive) from a fitted TF-IDF + logistic regression."""

    def __init__(self, C: float = 4.0, max_features: int = 200_000, random_state: int = 0):
        self.C = C
        self.max_features = max_features
        self.random_state = random_state

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> "GoldReward":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vectorizer_ = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=self.max_features,
                                           sublinear_tf=True)
        x = self.vectorizer_.fit_transform(list(texts))
        self.classifier_ = LogisticRegression(C=self.C, max_iter=1000, random_state=self.random_state)
        self.classifier_.fit(x, np.asarray(labels))
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) per text, float64 [N]."""
        if not len(texts):
            return np.zeros(0)
        return self.classifier_.predict_proba(self.vectorizer_.transform(list(texts)))[:, 1]

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float(np.mean((self.score(texts) > 0.5) == np.asarray(labels, dtype=bool)))


def load_or_fit_gold(folder: Path, texts: Sequence[str], labels: Sequence[int]) -> GoldReward:
    """The gold reward cached as ``folder/gold.pkl`` (our own cache, written atomically)."""
    from vrpo.provenance import atomic_write_bytes

    path = Path(folder) / "gold.pkl"
    if path.exists():
        with open(path, "rb") as fh:
            return pickle.load(fh)
    gold = GoldReward().fit(texts, labels)
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(path, pickle.dumps(gold))
    return gold
