"""Auxiliary preference models g(x, a, b) = P(a preferred to b | x), behind one interface.

Every model follows scikit-learn's manner: ``__init__`` stores parameters, ``fit`` returns
self, fitted state ends in ``_``, randomness through ``random_state``, and
``predict_proba(prompts, responses_a, responses_b) -> np.ndarray [N]`` in [0, 1],
antisymmetric: g(x, a, b) + g(x, b, a) = 1.
"""
from vrpo.aux.base import AuxModel, CallableAux, ColumnAux, resolve_aux  # noqa: F401
from vrpo.aux.crossfit import fold_ids  # noqa: F401
