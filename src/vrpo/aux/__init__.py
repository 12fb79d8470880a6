"""Auxiliary preference models g(x, a, b) = P(a preferred to b | x), behind one interface.

Every model follows scikit-learn's manner: ``__init__`` stores parameters, ``fit`` returns
self, fitted state ends in ``_``, randomness through ``random_state``, and
``predict_proba(prompts, responses_a, responses_b) -> np.ndarray [N]`` in [0, 1],
antisymmetric: g(x, a, b) + g(x, b, a) = 1. ``predict_pairwise(prompt, responses)`` gives
the [K, K] matrix of all pairs of K responses (K embeddings for the embedding models).

Heavy dependencies (torch, transformers) are imported only when a model is built or fitted.
"""
from vrpo.aux.base import AuxModel, CallableAux, ColumnAux, check_pairs, resolve_aux  # noqa: F401
from vrpo.aux.crossfit import CrossFitResult, FoldAverageAux, cross_fit, crossfit_aux_probs, fold_ids  # noqa: F401
from vrpo.aux.gpm import GPM  # noqa: F401
from vrpo.aux.bradley_terry import BradleyTerryAux  # noqa: F401
from vrpo.aux.oracle import OracleAux  # noqa: F401
from vrpo.aux.judge import JudgeAux  # noqa: F401
from vrpo.aux.io import load_aux, save_aux  # noqa: F401
from vrpo.aux import calibration  # noqa: F401

# `vrpo fit-aux --model NAME`: name -> factory(**overrides) of an unfitted model
AUX_MODELS = {
    "gpm-minilm": lambda **kw: GPM(backbone="minilm", **kw),
    "gpm-transformer": lambda **kw: GPM(backbone="transformer", **{"epochs": 2, "batch_size": 16, **kw}),
    "bt": lambda **kw: BradleyTerryAux(backbone="minilm", **kw),
    "bt-transformer": lambda **kw: BradleyTerryAux(backbone="transformer", **{"epochs": 2, "batch_size": 16, **kw}),
    "gpm-table": lambda **kw: GPM(backbone="table", **kw),
    "bt-table": lambda **kw: BradleyTerryAux(backbone="table", **kw),
}
