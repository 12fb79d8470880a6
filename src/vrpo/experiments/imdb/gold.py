"""The gold reward: a sentiment classifier fitted on the labels of the ``gold`` split.

TF-IDF over word 1-2 grams + logistic regression (its held-out accuracy on full reviews is
printed in results.md). Its probability of "positive", in [0, 1], is the paper's "average score":
the quantity every policy is judged by. No policy and no auxiliary model ever sees it
during training except through the simulated reviewers' labels.

Cached as data that cannot run code: ``gold.json`` (settings, vocabulary, classes, a
fingerprint of the training texts) and ``gold.safetensors`` (idf, coefficients,
intercept); never a pickle, which a planted cache file could use to run code.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

CONFIG_FILE, WEIGHTS_FILE = "gold.json", "gold.safetensors"


class GoldReward:
    """``score(texts) -> [N]`` P(positive) from a fitted TF-IDF + logistic regression."""

    def __init__(self, C: float = 4.0, max_features: int = 200_000, random_state: int = 0):
        self.C = C
        self.max_features = max_features
        self.random_state = random_state

    def _vectorizer(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=self.max_features, sublinear_tf=True)

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> "GoldReward":
        from sklearn.linear_model import LogisticRegression

        self.vectorizer_ = self._vectorizer()
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

    # ---- saving as data (JSON + safetensors), never as a pickle --------------------------
    def save(self, folder: str | Path, texts_fingerprint: str = "") -> Path:
        from safetensors.numpy import save_file

        from vrpo.provenance import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"idf": self.vectorizer_.idf_, "coef": self.classifier_.coef_, "intercept": self.classifier_.intercept_}
        tmp = folder / f".{WEIGHTS_FILE}.tmp"
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(tmp))
        atomic_write_bytes(folder / WEIGHTS_FILE, tmp.read_bytes())
        tmp.unlink()
        vocabulary = {term: int(i) for term, i in self.vectorizer_.vocabulary_.items()}
        atomic_write_json(folder / CONFIG_FILE, {
            "C": self.C, "max_features": self.max_features, "random_state": self.random_state,
            "classes": [int(c) for c in self.classifier_.classes_], "vocabulary": vocabulary,
            "texts_fingerprint": texts_fingerprint})  # written last: a folder with it is complete
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "GoldReward":
        from safetensors.numpy import load_file
        from sklearn.linear_model import LogisticRegression

        folder = Path(folder)
        doc = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
        gold = cls(C=doc["C"], max_features=doc["max_features"], random_state=doc["random_state"])
        gold.vectorizer_ = gold._vectorizer()
        gold.vectorizer_.vocabulary_ = dict(doc["vocabulary"])
        gold.vectorizer_.idf_ = tensors["idf"]
        gold.classifier_ = LogisticRegression(C=gold.C, max_iter=1000, random_state=gold.random_state)
        gold.classifier_.classes_ = np.asarray(doc["classes"])
        gold.classifier_.coef_ = tensors["coef"]
        gold.classifier_.intercept_ = tensors["intercept"]
        gold.classifier_.n_features_in_ = tensors["coef"].shape[1]
        return gold


def texts_fingerprint(texts: Sequence[str], labels: Sequence[int]) -> str:
    """sha256 (16 hex) of the training texts and labels: the cache's identity beside its settings."""
    return hashlib.sha256("\x00".join(f"{int(y)}\x01{t}" for t, y in zip(texts, labels)).encode()).hexdigest()[:16]


def load_or_fit_gold(folder: Path, texts: Sequence[str], labels: Sequence[int]) -> GoldReward:
    """The gold reward cached in ``folder`` (``gold.json`` + ``gold.safetensors``), refitted when
    the folder holds none or one fitted on other texts."""
    folder = Path(folder)
    key = texts_fingerprint(texts, labels)
    if (folder / CONFIG_FILE).exists():
        try:
            cached = json.loads((folder / CONFIG_FILE).read_text()).get("texts_fingerprint")
        except json.JSONDecodeError:
            cached = None
        if cached == key and (folder / WEIGHTS_FILE).exists():
            return GoldReward.load(folder)
    gold = GoldReward().fit(texts, labels)
    gold.save(folder, key)
    return gold
