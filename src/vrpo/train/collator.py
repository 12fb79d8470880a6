"""From canonical preference rows to tensors: features per example, and the collator that
packs chosen, rejected and the K reference samples of each prompt into one batch.

Kept apart from the Trainer so other trainers (the reward model of two-stage VRPO) reuse it.

Feature of one example (a dict, stored in a ``datasets.Dataset``):
    prompt_ids, chosen_ids, rejected_ids          token ids (vrpo.data.tokenize_completions)
    aux_prob                                      g(x, y+, y-)                      (VRPO)
    ref_prompt_ids, ref_ids [K], ref_aux_prob [K][K], ref_logps [K] or None        (VRPO)
    ref_chosen_logps, ref_rejected_logps          added by vrpo.train.reference

Batch (``PreferenceCollator``), N = B * (2 + K) sequences in the order
[chosen_0..chosen_{B-1}, rejected_0.., ref_{0,0}..ref_{0,K-1}, ref_{1,0}, ...]:
    the rows of ``vrpo.sequences.pack_rows``: N plain rows [N, T] in that order (right padding),
    or with ``share_prompt`` B rows, each example's prompt once followed by its 2 + K completions;
    ref_chosen_logps [B], ref_rejected_logps [B], ref_sample_logps [B, K], aux_prob [B],
    ref_aux_prob [B, K, K] (when present in the features).
"""
from __future__ import annotations

from typing import Sequence

import torch

from vrpo.data import check_probability_column, attach_reference_samples, sequence_batch, tokenize_completions  # noqa: F401 (re-export)
from vrpo.sequences import pack_rows


def _check_reference_columns(row: dict, i: int, k: int, source: str) -> None:
    for col in ("aux_prob", "ref_samples", "ref_aux_prob"):
        if row.get(col) is None:
            hint = "run `vrpo score`" if col != "ref_samples" else "run `vrpo sample` and pass --samples"
            raise ValueError(f"{source}: row {i} has no {col!r}; VRPO needs it ({hint})")
    have = len(row["ref_samples"])
    if have < k:
        raise ValueError(f"{source}: row {i} (prompt_id {row['prompt_id']!r}) has {have} reference samples, "
                         f"fewer than --num-ref-samples {k}")
    if any(not isinstance(s, str) for s in row["ref_samples"][:k]):  # "" is a legitimate draw (immediate EOS)
        raise ValueError(f"{source}: row {i}: a reference sample that is not text")
    mat = row["ref_aux_prob"]
    if len(mat) < k or any(len(r) < k for r in mat[:k]):
        raise ValueError(f"{source}: row {i}: ref_aux_prob is not a {k} x {k} matrix; score the samples with `vrpo score`")
    check_probability_column([p for r in mat[:k] for p in r[:k]], f"ref_aux_prob (row {i})", source)


def default_num_ref_samples(rows: Sequence[dict], source: str) -> int:
    """K = the fewest reference samples any row holds (at least 2)."""
    counts = [len(r.get("ref_samples") or []) for r in rows]
    k = min(counts) if counts else 0
    if k < 2:
        raise ValueError(f"{source}: row {counts.index(k)} has {k} reference samples; VRPO needs at least 2 per prompt "
                         "(draw them with `vrpo sample` and pass --samples, or train on a `vrpo score` folder)")
    return k


def build_features(rows: Sequence[dict], tokenizer, cfg, *, with_reference: bool, num_ref_samples: int | None = None,
                   source: str = "data") -> list[dict]:
    """Tokenise each canonical row into a feature (see the module docstring)."""
    settings = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                    prompt_truncation=cfg.prompt_truncation)
    features = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        prompt_ids, (chosen_ids, rejected_ids) = tokenize_completions(
            tokenizer, row["prompt"], [row["chosen"], row["rejected"]], where=where, **settings)
        feat = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        if with_reference:
            k = num_ref_samples
            _check_reference_columns(row, i, k, source)
            logps = row.get("ref_logps")
            # a sample cut at the sampler's length limit never drew EOS: none is added (as when it was scored)
            cut = list(row.get("ref_truncated") or [False] * k)[:k]
            ref_prompt_ids, ref_ids = tokenize_completions(tokenizer, row["prompt"], list(row["ref_samples"][:k]),
                                                           where=f"{where} reference samples", **settings,
                                                           add_eos=[not t for t in cut], cut_completions=logps is None)
            feat.update(aux_prob=float(row["aux_prob"]), ref_prompt_ids=ref_prompt_ids, ref_ids=ref_ids,
                        ref_aux_prob=[list(map(float, r[:k])) for r in row["ref_aux_prob"][:k]],
                        ref_logps=None if logps is None else [float(x) for x in logps[:k]])
        features.append(feat)
    return features


class PreferenceCollator:
    """Pads the features of a batch into one block of rows (see the module docstring).

    ``share_prompt``: one row per example holding its prompt once and all 2 + K completions
    (``vrpo.sequences``' shared-prompt layout) instead of one row per sequence.
    """

    def __init__(self, pad_token_id: int, with_reference: bool, share_prompt: bool = False):
        self.pad_token_id = pad_token_id
        self.with_reference = with_reference
        self.share_prompt = share_prompt

    def __call__(self, features: list[dict]) -> dict:
        batch = pack_rows(self.rows(features), self.pad_token_id)
        for key in ("ref_chosen_logps", "ref_rejected_logps", "aux_prob"):
            if key in features[0] and features[0][key] is not None:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        if self.with_reference:
            batch["ref_sample_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
            batch["ref_aux_prob"] = torch.tensor([f["ref_aux_prob"] for f in features], dtype=torch.float32)
        return batch

    def rows(self, features: list[dict]) -> list[list[tuple]]:
        """``vrpo.sequences.pack_rows``' rows: items (sequence index, prompt ids, completion ids)."""
        b = len(features)
        examples = []
        for i, f in enumerate(features):
            items = [(i, f["prompt_ids"], f["chosen_ids"]), (b + i, f["prompt_ids"], f["rejected_ids"])]
            if self.with_reference:
                k = len(f["ref_ids"])
                items += [(2 * b + i * k + j, f["ref_prompt_ids"], ids) for j, ids in enumerate(f["ref_ids"])]
            examples.append(items)
        if self.share_prompt:
            return examples
        return [[item] for item in sorted((it for items in examples for it in items), key=lambda it: it[0])]
