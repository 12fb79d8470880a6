"""The oracle auxiliary model: the KNOWN true preference p*(x, a, b), for simulations.

With g = p* VRPO removes the most variance it can; a fitted g's gain is reported as a
fraction of the oracle's. The oracle has nothing to learn: ``fit`` checks the pairs and
returns self, so it drops into ``cross_fit`` and the CLI like any other model.
"""
from __future__ import annotations

from typing import Callable

from vrpo.aux.base import AuxModel, check_pairs


class OracleAux(AuxModel):
    """Wraps ``p_star(prompts, responses_a, responses_b) -> [N]`` (batched), the true P(a > b).

    ``check_antisymmetry=True`` (default) verifies p*(a, b) + p*(b, a) = 1 on every call
    (to 1e-6) instead of silently symmetrising: a non-antisymmetric "truth" is a bug in
    the simulation, not something to average away.
    """

    antisymmetric_by_construction = True

    def __init__(self, p_star: Callable, check_antisymmetry: bool = True, random_state: int | None = None):
        self.p_star = p_star
        self.check_antisymmetry = check_antisymmetry
        self.random_state = random_state

    def fit(self, prompts, responses_a, responses_b, labels):
        check_pairs(prompts, responses_a, responses_b, labels, source="OracleAux.fit")
        return self

    def _predict_raw(self, prompts, responses_a, responses_b):
        import numpy as np

        from vrpo.aux.base import check_probabilities

        p = check_probabilities(self.p_star(list(prompts), list(responses_a), list(responses_b)), "OracleAux", len(prompts))
        if self.check_antisymmetry:
            q = check_probabilities(self.p_star(list(prompts), list(responses_b), list(responses_a)), "OracleAux", len(prompts))
            bad = np.flatnonzero(np.abs(p + q - 1.0) > 1e-6)
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"OracleAux: p*(a, b) + p*(b, a) = {p[i] + q[i]:.6g} at pair {i}; expected 1 "
                                 "(the true preference must be antisymmetric)")
        return p
