"""Reference log-probs log pi_ref(y|x) of every training sequence, computed once and cached.

They are constants of the objective (docs/method.md), so training never holds a reference model:
this pass runs the reference model once over chosen and rejected responses (and over
reference samples whose log-probs did not come with them), stores the values in a cache
file keyed by a fingerprint of (reference model, token ids), and frees the model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vrpo.provenance import atomic_write_json


def token_fingerprint(features: list[dict]) -> str:
    """sha256 of every sequence's token ids: the data AND its tokenisation."""
    h = hashlib.sha256()
    for f in features:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_prompt_ids", "ref_ids"):
            h.update(json.dumps(f.get(key)).encode())
    return h.hexdigest()


def _missing_sample_positions(features: list[dict]) -> list[int]:
    return [i for i, f in enumerate(features) if "ref_ids" in f and f.get("ref_logps") is None]


def compute_reference_logps(model, features: list[dict], pad_token_id: int, batch_size: int,
                            share_prompt: bool = False) -> dict:
    """{"chosen": [n], "rejected": [n], "samples": {i: [K]}} under ``model`` at temperature 1, at
    most ``batch_size`` sequences per forward pass; ``share_prompt``: each example's sequences in
    one row, its prompt computed once (the layout training uses with ``--share-prompt``)."""
    from tqdm.auto import tqdm

    from vrpo.sampling import sequence_logps_under

    prompts, completions, slots = [], [], []
    for i, f in enumerate(features):
        prompts += [f["prompt_ids"], f["prompt_ids"]]
        completions += [f["chosen_ids"], f["rejected_ids"]]
        slots += [("chosen", i), ("rejected", i)]
    for i in _missing_sample_positions(features):
        for j, ids in enumerate(features[i]["ref_ids"]):
            prompts.append(features[i]["ref_prompt_ids"])
            completions.append(ids)
            slots.append(("samples", i, j))
    if share_prompt:  # whole examples per forward pass, ordered so each example's sequences are adjacent
        order = sorted(range(len(slots)), key=lambda n: slots[n][1])
        prompts, completions, slots = ([x[n] for n in order] for x in (prompts, completions, slots))
    values = []
    bounds = _batches(slots, batch_size, share_prompt)
    for start, stop in tqdm(bounds, desc="reference log-probs", unit="batch"):
        values += sequence_logps_under(model, prompts[start:stop], completions[start:stop], pad_token_id, stop - start,
                                       share_rows=[s[1] for s in slots[start:stop]] if share_prompt else None)
    out = {"chosen": [0.0] * len(features), "rejected": [0.0] * len(features), "samples": {}}
    for slot, v in zip(slots, values):
        if slot[0] == "samples":
            out["samples"].setdefault(str(slot[1]), [0.0] * len(features[slot[1]]["ref_ids"]))[slot[2]] = v
        else:
            out[slot[0]][slot[1]] = v
    return out


def _batches(slots: list[tuple], batch_size: int, whole_examples: bool) -> list[tuple[int, int]]:
    """[start, stop) of each forward pass: ``batch_size`` sequences, or whole examples up to it."""
    if not whole_examples:
        return [(s, min(s + batch_size, len(slots))) for s in range(0, len(slots), batch_size)]
    bounds, start = [], 0
    for n in range(1, len(slots) + 1):
        if n == len(slots) or (slots[n][1] != slots[n - 1][1] and n - start >= batch_size):
            bounds.append((start, n))
            start = n
    return bounds


SPOT_CHECK_PROMPTS = 8  # prompts whose stored sample log-probs are recomputed: half evenly spaced, half at random


def spot_check_positions(n: int, count: int = SPOT_CHECK_PROMPTS, seed: int = 0) -> list[int]:
    """Positions spread over the whole table: ``count // 2`` evenly spaced (first and last
    included) and the rest drawn at random (seeded), so no stretch of rows goes unchecked
    by construction."""
    import numpy as np

    if n <= count:
        return list(range(n))
    even = {int(round(x)) for x in np.linspace(0, n - 1, max(2, count // 2))}
    rest = [i for i in range(n) if i not in even]
    drawn = np.random.default_rng(seed).choice(len(rest), size=count - len(even), replace=False)
    return sorted(even | {rest[int(i)] for i in drawn})


def stored_sample_logp_error(model, features: list[dict], pad_token_id: int,
                             num_prompts: int = SPOT_CHECK_PROMPTS) -> float | None:
    """Largest |stored - recomputed| ref log-prob over the samples of prompts spread over the
    whole table (``spot_check_positions``) that brought their own (from ``vrpo sample``): a
    different model or tokenisation shows here. (An edited row is caught before, by the
    samples table's checksum.)"""
    from vrpo.sampling import sequence_logps_under

    stored = [f for f in features if f.get("ref_logps") is not None]
    worst = None
    for i in spot_check_positions(len(stored), num_prompts, seed=len(stored)):
        f = stored[i]
        fresh = sequence_logps_under(model, [f["ref_prompt_ids"]] * len(f["ref_ids"]), f["ref_ids"], pad_token_id)
        err = max(abs(a - b) for a, b in zip(fresh, f["ref_logps"]))
        worst = err if worst is None else max(worst, err)
    return worst


def stored_logps_fingerprint(features: list[dict]) -> str:
    """sha256 of the reference log-probs the samples brought: part of the cache key, so the
    spot check above is redone when they change."""
    h = hashlib.sha256()
    for f in features:
        h.update(json.dumps(f.get("ref_logps")).encode())
    return h.hexdigest()


def attach_reference_logps(features: list[dict], ref_model_path: str, model_fingerprint: str, pad_token_id: int,
                           cache_dir: str | Path, batch_size: int = 8, trust_remote_code: bool = False,
                           device=None, share_prompt: bool = False) -> tuple[list[dict], dict]:
    """Add ref_chosen_logps / ref_rejected_logps (and missing ref_logps) to the features,
    from the cache when it holds this (model, token ids, stored log-probs, dtype, layout) key.
    Returns the features and {"cache": file, "stored_sample_logp_error": float or None, "dtype",
    "share_prompt"}. ``device``: where the reference model runs for the one pass (the training
    process's device; default CPU). The model runs in float32 (``vrpo.sampling.LOG_PROB_DTYPE``)."""
    from vrpo.sampling import LOG_PROB_DTYPE

    layout = f"{LOG_PROB_DTYPE}/shared" if share_prompt else LOG_PROB_DTYPE
    key = hashlib.sha256((model_fingerprint + token_fingerprint(features) + stored_logps_fingerprint(features)
                          + layout).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"ref-logps-{key}.json"
    if path.exists():
        cached = json.loads(path.read_text())
    else:
        from vrpo.sampling import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(ref_model_path, trust_remote_code=trust_remote_code, what="reference model")
        if device is not None:
            model.to(device)
        cached = compute_reference_logps(model, features, pad_token_id, batch_size, share_prompt)
        cached["stored_sample_logp_error"] = stored_sample_logp_error(model, features, pad_token_id)
        del model  # no reference model is held during training
        atomic_write_json(path, dict(cached, model_fingerprint=model_fingerprint))
    out = []
    for i, f in enumerate(features):
        f = dict(f, ref_chosen_logps=cached["chosen"][i], ref_rejected_logps=cached["rejected"][i])
        if str(i) in cached["samples"]:
            f["ref_logps"] = cached["samples"][str(i)]
        out.append(f)
    return out, {"cache": str(path), "stored_sample_logp_error": cached.get("stored_sample_logp_error"),
                 "dtype": LOG_PROB_DTYPE, "share_prompt": share_prompt}
