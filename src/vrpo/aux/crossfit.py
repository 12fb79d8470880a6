"""Cross-fitting (as in double machine learning): the auxiliary prediction for an observed
labelled pair must come from a model that never saw that pair's label, or g leaks the
label and the control variate shrinks to nothing."""
from __future__ import annotations

import numpy as np


def fold_ids(n: int, folds: int, random_state: int | None = 0) -> np.ndarray:
    """A balanced random fold id in [0, folds) for each of n items. Shape [n]."""
    if folds < 2:
        raise ValueError(f"folds: {folds}; expected at least 2 for cross-fitting")
    if n < folds:
        raise ValueError(f"folds: {folds} folds for {n} labelled pairs; expected at least one pair per fold")
    rng = np.random.default_rng(random_state)
    ids = np.arange(n) % folds
    rng.shuffle(ids)
    return ids
