"""Cross-fitting (as in double machine learning): the auxiliary prediction for an observed
labelled pair must come from a model that never saw that pair's label, or g leaks the
label and the control variate shrinks to nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from vrpo.aux.base import AuxModel, check_pairs


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


def group_fold_ids(groups, folds: int, random_state: int | None = 0) -> np.ndarray:
    """Fold ids assigned per group (e.g. prompt_id): all pairs of a group share a fold, so a
    model never sees a sibling pair of the prompt it is predicting for. Shape [n]."""
    keys, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    if folds >= 2 and len(keys) < folds:
        raise ValueError(f"folds: {folds} folds but only {len(keys)} distinct groups (prompts; distinct pairs under "
                         "--fold-by pair); expected at least one per fold (fewer --folds, or --fold-by pair when "
                         "the groups are prompts)")
    return fold_ids(len(keys), folds, random_state)[inverse]


class FoldAverageAux(AuxModel):
    """The average of the fold models' probabilities, for reference pairs (which no fold saw).
    An average of antisymmetric models is antisymmetric."""

    antisymmetric_by_construction = True
    kind = "fold-average"

    def __init__(self, models: Sequence[AuxModel]):
        self.models = list(models)

    def fit(self, prompts, responses_a, responses_b, labels):
        raise ValueError("FoldAverageAux: already fitted (built by cross_fit); fit a new cross_fit instead")

    def _predict_raw(self, prompts, responses_a, responses_b):
        return np.mean([m.predict_proba(prompts, responses_a, responses_b) for m in self.models], axis=0)

    def predict_pairwise_batch(self, prompts, responses):
        per_model = [m.predict_pairwise_batch(prompts, responses) for m in self.models]
        return [np.mean(mats, axis=0) for mats in zip(*per_model)]


@dataclass
class CrossFitResult:
    """``oof_proba[i]`` = g(x_i, a_i, b_i) from the model of the folds that exclude pair i's
    fold (``fold_ids[i]``); ``fold_models[f]`` never saw fold f; ``reference_model`` scores
    reference pairs (fold average, or one model refitted on all pairs)."""

    oof_proba: np.ndarray
    fold_ids: np.ndarray
    fold_models: list
    reference_model: AuxModel


def cross_fit(model_factory: Callable[[], AuxModel], prompts, responses_a, responses_b, labels, folds: int = 5,
              random_state: int | None = 0, reference: str = "fold-average", groups=None,
              progress: bool = False) -> CrossFitResult:
    """K-fold cross-fitting, as in double machine learning: for each fold f, fit
    ``model_factory()`` on the other folds and predict the pairs of fold f.

    Args:
        model_factory: a zero-argument callable returning a fresh, unfitted AuxModel.
        labels: 1 if a won, 0 if b won (soft labels in [0, 1] allowed).
        groups: optional group key per pair (e.g. prompt_id) to keep groups within a fold.
        reference: ``"fold-average"`` (no extra fit) or ``"full"`` (refit on all pairs).
    """
    from tqdm.auto import tqdm

    check_pairs(prompts, responses_a, responses_b, labels, source="cross_fit")
    if reference not in REFERENCE_MODELS:
        raise ValueError(f"reference: {reference!r}; expected one of {sorted(REFERENCE_MODELS)}")
    n = len(prompts)
    ids = fold_ids(n, folds, random_state) if groups is None else group_fold_ids(groups, folds, random_state)
    take = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731  works for lists and Dataset columns
    oof = np.full(n, np.nan)
    models = []
    for f in tqdm(range(folds), desc="cross-fitting", unit="fold", disable=not progress):
        train, held = np.flatnonzero(ids != f), np.flatnonzero(ids == f)
        if held.size == 0:
            raise ValueError(f"cross_fit: fold {f} is empty (groups={len(set(map(str, groups)))}); "
                             f"expected at least {folds} groups")
        y = np.asarray(labels, dtype=np.float64)
        model = model_factory().fit(take(prompts, train), take(responses_a, train), take(responses_b, train), y[train])
        oof[held] = model.predict_proba(take(prompts, held), take(responses_a, held), take(responses_b, held))
        models.append(model)
    ref = REFERENCE_MODELS[reference](models, model_factory, prompts, responses_a, responses_b, labels)
    return CrossFitResult(oof, ids, models, ref)


REFERENCE_MODELS: dict[str, Callable] = {
    "fold-average": lambda models, *_: FoldAverageAux(models),
    "full": lambda models, factory, x, a, b, y: factory().fit(list(x), list(a), list(b), np.asarray(y, float)),
}


def crossfit_aux_probs(result: CrossFitResult, prompts, ref_samples) -> tuple[np.ndarray, np.ndarray]:
    """The two inputs of ``vrpo.losses.vrpo_loss`` from a cross-fit: ``aux_prob`` [n] (out of
    fold, observed pairs) and ``ref_aux_prob`` [n, K, K] (reference model, all pairs of the
    K reference samples of each prompt)."""
    mats = result.reference_model.predict_pairwise_batch(list(prompts), [list(s) for s in ref_samples])
    return result.oof_proba.copy(), np.stack(mats)
