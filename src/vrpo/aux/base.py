"""The auxiliary-model interface and the two simplest members: a user's callable and
precomputed columns. ``resolve_aux(spec)`` turns a ``--aux SPEC`` string into a model."""
from __future__ import annotations

import importlib.util  # also binds `importlib`
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

    def predict_pairwise(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        """All ordered pairs of K responses to one prompt: [K, K] with [j, k] = g(x, y_j, y_k),
        diagonal 1/2 and [k, j] = 1 - [j, k] (antisymmetry)."""
        return self.predict_pairwise_batch([prompt], [responses])[0]

    def predict_pairwise_batch(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """``predict_pairwise`` for many prompts in ONE ``predict_proba`` call over the
        K(K-1)/2 pairs j < k of each prompt (models that embed responses embed each distinct
        text once). Returns one [K, K] float64 array per prompt (K may differ by prompt)."""
        if len(prompts) != len(responses):
            raise ValueError(f"predict_pairwise_batch: {len(prompts)} prompts but {len(responses)} response lists")
        xs, ya, yb, index = [], [], [], []
        for i, (x, ys) in enumerate(zip(prompts, responses)):
            K = len(ys)
            for j, k in zip(*np.triu_indices(K, 1)):
                xs.append(x), ya.append(ys[j]), yb.append(ys[k]), index.append((i, j, k))
        p = self.predict_proba(xs, ya, yb) if xs else np.zeros(0)
        out = [np.full((len(ys), len(ys)), 0.5) for ys in responses]
        for (i, j, k), g in zip(index, p):
            out[i][j, k], out[i][k, j] = g, 1.0 - g
        return out

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


def check_pairs(prompts, responses_a, responses_b, labels=None, source: str = "fit", *,
                allow_empty_responses: bool = False) -> None:
    """One-line ValueErrors for bad pairs: unequal lengths, a text that is not a string or an
    empty response (naming the row), labels missing, outside [0, 1] or NaN.

    Fitting refuses an empty labelled response (a broken row, far more often than a real
    answer someone judged). Prediction passes ``allow_empty_responses=True``: a reference
    sample may be empty when pi_ref drew the end-of-sequence token first, a legitimate
    draw that the control variate must score like any other (an embedding model embeds
    "" as it embeds any text)."""
    n = len(prompts)
    lengths = {"responses_a": len(responses_a), "responses_b": len(responses_b)}
    if labels is not None:
        lengths["labels"] = len(labels)
    for name, m in lengths.items():
        if m != n:
            raise ValueError(f"{source}: {name} has {m} rows but prompts has {n}; expected one per pair")
    for name, texts in (("prompt", prompts), ("response_a", responses_a), ("response_b", responses_b)):
        for i, t in enumerate(texts):
            if not isinstance(t, str) or (name != "prompt" and not allow_empty_responses and not t.strip()):
                expected = "a string" if allow_empty_responses else "a non-empty string"
                raise ValueError(f"{source}: row {i}: {name} is {t!r}; expected {expected}")
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(y) | (y < 0) | (y > 1))
        if bad.size:
            raise ValueError(f"{source}: row {int(bad[0])}: label {labels[bad[0]]!r}; expected a preference "
                             "label in [0, 1] (1 = response_a preferred); unlabelled rows cannot be fitted")


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
    (an external judge, a larger model, a rule). Antisymmetrised by ``predict_proba``.

    The callable is the user's code: whatever it raises, or a return value that is not N
    numbers, becomes a one-line error naming ``name`` (the ``--aux`` spec)."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def _predict_raw(self, prompts, responses_a, responses_b):
        return self._call(self.fn, prompts, responses_a, responses_b)

    def _call(self, fn: Callable, prompts, responses_a, responses_b) -> np.ndarray:
        """``fn`` on one batch of pairs, inside the boundary of the user's code: its exception,
        or a return value that is not one number per pair, is a one-line error naming the spec."""
        from vrpo.errors import UserError, user_code

        spec = f"--aux {self.name}"
        with user_code(spec):
            values = fn(list(prompts), list(responses_a), list(responses_b))
        expected = f"expected a list of {len(prompts)} probabilities (numbers in [0, 1]), one per pair"
        if values is None or isinstance(values, (str, bytes)) or np.ndim(values) == 0:
            raise UserError(f"{spec}: returned {type(values).__name__} {values!r:.40}; {expected}")
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"{spec}: returned values such as {_first(values)!r:.40}; {expected}") from None
        if array.ndim != 1:
            raise UserError(f"{spec}: returned an array of shape {array.shape}; expected a list of {len(prompts)} "
                            "probabilities, one per pair")
        return array


def _first(values):
    try:
        return next(iter(values))
    except (TypeError, StopIteration):
        return values


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
        return CallableAux(load_callable(spec, "--aux"), name=spec)
    raise ValueError(f"--aux {spec}: expected module:function, file.py:function, column:NAME or a `vrpo fit-aux` directory")


def load_callable(spec: str, flag: str) -> Callable:
    """The function named by ``module:function`` or ``path/to/file.py:function`` (``--aux``,
    ``vrpo gate --rubrics`` / ``--judge``). Importing runs the user's code: any error in it
    is one line naming ``flag`` and the spec."""
    from vrpo.errors import UserError

    if ":" not in spec:
        raise UserError(f"{flag} {spec}: expected module:function or file.py:function")
    mod_name, fn_name = spec.rsplit(":", 1)
    module = _import_user_module(spec, mod_name, flag)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def _import_user_module(spec: str, mod_name: str, flag: str = "--aux"):
    """Import the module of ``module:function`` / ``file.py:function``: this RUNS the user's
    code, so any error in it (a syntax error, an exception at import) is reported in one
    line naming the spec."""
    import sys

    from vrpo.errors import UserError, user_code

    if mod_name.endswith(".py"):
        if not Path(mod_name).is_file():
            raise UserError(f"{flag} {spec}: no such file {mod_name!r}")
        s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
        module = importlib.util.module_from_spec(s)
        with user_code(f"{flag} {spec}"):
            s.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    try:
        found = sys.modules.get(mod_name) or importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UserError(f"{flag} {spec}: no module named {mod_name!r} (for a file, give its path ending in .py)")
    with user_code(f"{flag} {spec}"):
        return importlib.import_module(mod_name)


def aux_identity(spec: str) -> dict:
    """What ``--aux SPEC`` (or ``vrpo gate``'s ``--rubrics`` / ``--judge``) names, for an output
    folder's reuse record: the spec and a fingerprint of the code or model behind it (a
    file's bytes, a module's source file, a ``vrpo fit-aux`` folder's weights, settings and
    out-of-fold predictions). A column is named by the spec alone: the data's own
    fingerprint covers it."""
    from vrpo.provenance import fingerprint_files

    if spec.startswith("column:"):
        return {"spec": spec}
    path = Path(spec)
    if path.is_dir():
        return {"spec": spec, "fingerprint": _fit_aux_fingerprint(path)}
    mod_name = spec.rsplit(":", 1)[0] if ":" in spec else spec
    source = Path(mod_name) if mod_name.endswith(".py") else _module_source(mod_name)
    return {"spec": spec, "fingerprint": fingerprint_files([source]) if source and source.is_file() else None}


def _module_source(mod_name: str) -> Path | None:
    try:
        found = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin and found.origin.endswith(".py") else None


def _fit_aux_fingerprint(folder: Path) -> str:
    """sha256 of a fit-aux folder's model: aux_config.json without its time and versions, the
    weights and the out-of-fold predictions."""
    import hashlib
    import json

    h = hashlib.sha256()
    config_file = folder / "aux_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            config = config_file.read_text()
        if isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in ("created", "versions")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name in ("model.safetensors", "oof.parquet"):
        if (folder / name).is_file():
            from vrpo.provenance import file_sha256

            h.update(f"{name}:{file_sha256(folder / name)}".encode())
    return h.hexdigest()
