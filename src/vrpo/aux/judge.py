"""An external judge as the auxiliary model: any batched callable (a larger model, an API,
a rule) that returns P(a preferred to b). Called in batches with a progress bar, its
answers checked and antisymmetrised: g_sym(a, b) = (g(a, b) + 1 - g(b, a)) / 2, which also
cancels a judge's position bias (preferring whichever response comes first)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from vrpo.aux.base import CallableAux, check_pairs, check_probabilities


class JudgeAux(CallableAux):
    """``judge(prompts, responses_a, responses_b) -> [N]`` probabilities, called ``batch_size``
    pairs at a time. Fixed: ``fit`` checks the pairs and returns self (nothing is learned)."""

    def __init__(self, judge: Callable, batch_size: int = 64, name: str | None = None, progress: bool = False,
                 random_state: int | None = None):
        super().__init__(judge, name=name)
        self.judge = judge
        self.batch_size = batch_size
        self.progress = progress
        self.random_state = random_state

    def fit(self, prompts, responses_a, responses_b, labels):
        check_pairs(prompts, responses_a, responses_b, labels, source=f"JudgeAux({self.name}).fit")
        return self

    def _predict_raw(self, prompts, responses_a, responses_b):
        from tqdm.auto import tqdm

        if self.batch_size < 1:
            raise ValueError(f"JudgeAux: batch_size {self.batch_size}; expected >= 1")
        n = len(prompts)
        out = []
        for s in tqdm(range(0, n, self.batch_size), desc=f"judge {self.name}", disable=not self.progress):
            e = min(s + self.batch_size, n)
            out.append(check_probabilities(
                self._call(self.judge, prompts[s:e], responses_a[s:e], responses_b[s:e]),
                f"judge {self.name} (pairs {s}..{e - 1})", e - s))
        return np.concatenate(out) if out else np.zeros(0)
