"""Saving and loading fitted auxiliary models: a folder with ``aux_config.json`` (``kind``,
the model's parameters, library versions) and ``model.safetensors`` (its tensors).

``AUX_KINDS`` maps each ``kind`` to a loader ``(config, tensors) -> AuxModel``; a new model
family registers one entry. Frozen backbones are not copied into the folder (they ship with
their package); their weight fingerprint is stored and checked at load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

CONFIG_NAME = "aux_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def _load_gpm(config, tensors):
    from vrpo.aux.gpm import GPM

    return GPM.from_saved(config, tensors)


def _load_bt(config, tensors):
    from vrpo.aux.bradley_terry import BradleyTerryAux

    return BradleyTerryAux.from_saved(config, tensors)


def _load_fold_average(config, tensors):
    from vrpo.aux.crossfit import FoldAverageAux

    members = []
    for i, member in enumerate(config["members"]):
        prefix = f"fold{i}."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        members.append(_loader(member["kind"])(member["config"], part))
    return FoldAverageAux(members)


AUX_KINDS: dict[str, Callable] = {"gpm": _load_gpm, "bt": _load_bt, "fold-average": _load_fold_average}


def _loader(kind: str) -> Callable:
    if kind not in AUX_KINDS:
        raise ValueError(f"aux model kind {kind!r}: not a known kind; expected one of {sorted(AUX_KINDS)}")
    return AUX_KINDS[kind]


def _config_and_tensors(model) -> tuple[dict, dict]:
    """(config, tensors) of a saveable model: GPM/BT, or a fold average of them."""
    kind = getattr(model, "kind", None)
    if kind == "fold-average":
        members, tensors = [], {}
        for i, m in enumerate(model.models):
            cfg, t = _config_and_tensors(m)
            members.append({"kind": cfg["kind"], "config": cfg["config"]})
            tensors.update({f"fold{i}.{k}": v for k, v in t.items()})
        return {"kind": kind, "config": {"members": members}}, tensors
    if kind not in AUX_KINDS or not hasattr(model, "state_tensors"):
        raise ValueError(f"save_aux: cannot save a {type(model).__name__}; expected a fitted GPM, BradleyTerryAux "
                         "or a cross-fit fold average (oracles, judges and columns are code or data, not weights)")
    return {"kind": kind, "config": model.get_config()}, model.state_tensors()


def save_aux(model, out_dir, extra: dict | None = None) -> Path:
    """Write ``model`` to ``out_dir`` (created): weights first, then the config, each atomically,
    so a folder with aux_config.json always has matching weights. Returns the folder."""
    from safetensors.torch import save_file

    from vrpo.provenance import atomic_write_json, now_utc, package_versions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, tensors = _config_and_tensors(model)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS_NAME)
    doc = {"format_version": FORMAT_VERSION, **cfg, "versions": package_versions(), "created": now_utc(), **(extra or {})}
    atomic_write_json(out / CONFIG_NAME, doc)
    return out


def read_aux_config(path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise ValueError(f"aux model {path}: no {CONFIG_NAME}; expected a folder written by `vrpo fit-aux`")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"aux model {cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ValueError(f"aux model {cfg_path}: no 'kind'; expected one of {sorted(AUX_KINDS)}")
    return doc


def load_aux(path, kind: str | None = None):
    """Load a folder written by ``save_aux`` / ``vrpo fit-aux``. ``kind`` (optional) is the
    kind the caller expects; a folder of another kind is a one-line ValueError."""
    from safetensors.torch import load_file

    path = Path(path)
    doc = read_aux_config(path)
    if kind is not None and doc["kind"] != kind:
        raise ValueError(f"aux model {path}: is a {doc['kind']!r} model; expected kind {kind!r}")
    loader = _loader(doc["kind"])
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise ValueError(f"aux model {path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    return loader(doc["config"], load_file(str(weights)))


# ----------------------------------------------------------------------------------------
# Out-of-fold predictions of the labelled pairs (``DIR/oof.parquet``)
# ----------------------------------------------------------------------------------------
OOF_NAME = "oof.parquet"


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Key of a labelled pair: first 16 hex digits of sha256(prompt NUL chosen NUL rejected)."""
    import hashlib

    return hashlib.sha256("\0".join((prompt, chosen, rejected)).encode("utf-8")).hexdigest()[:16]


def write_oof(out_dir, prompts, chosen, rejected, prompt_ids, aux_prob, folds) -> Path:
    """``oof.parquet``: one row per labelled pair: ``row`` (position in the data), ``pair_id``,
    ``prompt_id``, ``aux_prob`` = out-of-fold g(x, chosen, rejected), ``fold``. Atomic write."""
    import pandas as pd

    table = pd.DataFrame({
        "row": range(len(prompts)),
        "pair_id": [pair_id(x, c, r) for x, c, r in zip(prompts, chosen, rejected)],
        "prompt_id": [str(p) for p in prompt_ids],
        "aux_prob": [float(p) for p in aux_prob],
        "fold": [int(f) for f in folds],
    })
    path = Path(out_dir) / OOF_NAME
    tmp = path.with_name(path.name + ".tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_oof(aux_dir, prompts, chosen, rejected):
    """Out-of-fold ``aux_prob`` [n] for the given labelled pairs, or None when the folder has
    no ``oof.parquet``. Row by row when the data is the fit's data in the same order;
    otherwise matched by ``pair_id`` (a pair listed several times gets the mean of its
    listings). A pair the file lacks is a ValueError: every fold model may have seen its
    label, and scoring it in-sample would leak the label into g."""
    import numpy as np
    import pandas as pd

    path = Path(aux_dir) / OOF_NAME
    if not path.exists():
        return None
    table = pd.read_parquet(path, columns=["pair_id", "aux_prob"])
    keys = [pair_id(x, c, r) for x, c, r in zip(prompts, chosen, rejected)]
    if keys == list(table["pair_id"]):
        return table["aux_prob"].to_numpy(dtype=np.float64, copy=True)
    lookup = table.groupby("pair_id")["aux_prob"].mean().to_dict()
    missing = next((i for i, k in enumerate(keys) if k not in lookup), None)
    if missing is not None:
        raise ValueError(f"{path}: has no out-of-fold prediction for row {missing} (pair_id {keys[missing]}); expected "
                         "the data that `vrpo fit-aux` was fitted on (refit, or score these pairs with the model)")
    return np.array([lookup[k] for k in keys], dtype=np.float64)
