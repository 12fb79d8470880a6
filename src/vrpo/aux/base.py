"""The auxiliary-model interface and the two simplest members: a user's callable and
precomputed columns. ``resolve_aux(spec)`` turns a ``--aux SPEC`` string into a model."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


class AuxModel:
    """Base class. Subclasses implement ``_predict_raw(prompts, a, b) -> [N]`` (any model
    of P(a > b)); ``predict_proba`` antisymmetrises it, so every model is antisymmetric:
    g_sym(a, b) = (g(a, b) + 1 - g(b, a)) / 2. Models antisymmetric by construction (GPM,
    Bradley-Terry) set ``antisymmetric_by_construction = True`` to skip the second call.
    """

    antisymmetric_by_construction = False
    random_state: int | None = None

    def fit(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
            labels: Sequence[float]) -> "AuxModel":
        """Fit on labelled pairs; ``labels[i]`` = 1 if a won, 0 if b won (soft labels in [0, 1] allowed)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fitted (it is fixed)")

    def _predict_raw(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> np.ndarray:
        n = len(prompts)
        if not (len(responses_a) == len(responses_b) == n):
            raise ValueError(
                f"predict_proba: prompts ({n}), responses_a ({len(responses_a)}) and responses_b "
                f"({len(responses_b)}) must have the same length"
            )
        p_ab = check_probabilities(self._predict_raw(prompts, responses_a, responses_b), type(self).__name__, n)
        if self.antisymmetric_by_construction:
            return p_ab
        p_ba = check_probabilities(self._predict_raw(prompts, responses_b, responses_a), type(self).__name__, n)
        return 0.5 * (p_ab + 1.0 - p_ba)


def check_probabilities(p, source: str, n: int) -> np.ndarray:
    """Return ``p`` as float64 [n], or raise a one-line ValueError naming ``source``."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if p.shape[0] != n:
        raise ValueError(f"{source}: returned {p.shape[0]} probabilities for {n} pairs")
    if np.isnan(p).any():
        raise ValueError(f"{source}: returned NaN at pair {int(np.flatnonzero(np.isnan(p))[0])}; expected probabilities in [0, 1]")
    bad = np.flatnonzero((p < 0) | (p > 1))
    if bad.size:
        raise ValueError(f"{source}: returned {p[bad[0]]:.4g} at pair {int(bad[0])}; expected probabilities in [0, 1]")
    return p


class CallableAux(AuxModel):
    """Wraps a batched callable ``fn(prompts, responses_a, responses_b) -> [N] probabilities``
    (an external judge, a larger model, a rule). Antisymmetrised by ``predict_proba``."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def _predict_raw(self, prompts, responses_a, responses_b):
        return self.fn(list(prompts), list(responses_a), list(responses_b))


class ColumnAux(AuxModel):
    """Precomputed auxiliary probabilities that already sit in the data (``--aux column:NAME``).

    It cannot score new pairs; ``vrpo score`` reads the column for observed pairs and
    expects the reference pairs' probabilities to be precomputed too.
    """

    antisymmetric_by_construction = True

    def __init__(self, column: str = "aux_prob"):
        self.column = column

    def _predict_raw(self, prompts, responses_a, responses_b):
        raise ValueError(f"--aux column:{self.column}: precomputed columns cannot score new pairs; "
                         "use a model or a callable to score reference samples")


def resolve_aux(spec: str) -> AuxModel:
    """Turn ``--aux SPEC`` into a model:

    - ``module:function`` or ``path/to/file.py:function``: a batched callable (see CallableAux);
    - ``column:NAME``: precomputed probabilities in column NAME of the data;
    - a directory written by ``vrpo fit-aux`` (has ``aux_config.json``).
    """
    if spec.startswith("column:"):
        return ColumnAux(spec.split(":", 1)[1] or "aux_prob")
    path = Path(spec)
    if path.is_dir():
        if not (path / "aux_config.json").exists():
            raise ValueError(f"--aux {spec}: directory has no aux_config.json; expected a folder written by `vrpo fit-aux`")
        from vrpo.aux.io import load_aux  # written with the fitted models

        return load_aux(path)
    if ":" in spec:
        mod_name, fn_name = spec.rsplit(":", 1)
        try:
            if mod_name.endswith(".py"):
                import importlib.util

                s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
                if s is None or not Path(mod_name).exists():
                    raise FileNotFoundError(mod_name)
                module = importlib.util.module_from_spec(s)
                s.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                module = importlib.import_module(mod_name)
        except (ImportError, FileNotFoundError) as e:
            raise ValueError(f"--aux {spec}: cannot import {mod_name!r} ({e})") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"--aux {spec}: {mod_name!r} has no callable {fn_name!r}")
        return CallableAux(fn, name=spec)
    raise ValueError(f"--aux {spec}: expected module:function, file.py:function, column:NAME or a `vrpo fit-aux` directory")
