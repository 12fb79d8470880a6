"""One value per sequence from one forward pass: packed layouts, the block attention mask of a
shared prompt, log-probs through the LM head chunk by chunk, and a reward model's scores.

A batch holds S sequences (prompt x_s, completion y_s) in R rows (``pack_rows``):

- plain: one row per sequence, ``[x_s, y_s]`` and right padding, the input any causal LM takes;
- shared prompt: one row per prompt, ``[p, t_1 y_1, ..., t_n y_n]`` and padding, where p is the
  longest common prefix of the row's prompts and t_j the rest of x_j (usually empty). Under a
  block attention mask each segment ``t_j y_j`` sees p and itself only, and its position ids
  restart at len(p), so every y_j gets the log-probs of its plain row ``[x_j, y_j]`` while the
  prompt is computed once instead of n times.

Row tensors [R, T] of a batch:
    input_ids, attention_mask (1 on tokens, 0 on padding)
    position_ids, segment_ids     shared-prompt rows only; segment_ids: -1 padding, 0 the prefix p,
                                  j >= 1 segment j (their presence selects the block mask)
    token_sequence                the sequence whose log-prob counts the token (-1: prompt, padding)
    token_source                  the position whose hidden state predicts the token (-1: none)
    completion_mask               token_sequence >= 0
Sequence tensors [S]: sequence_ids (the sequences' indices in the whole batch), sequence_row (the
row holding each), sequence_segment (its segment there; 1 in a plain row), sequence_last (where a reward model reads its score: the last token of
``[x_s, y_s]`` that is not the pad token, as transformers' sequence-classification models do).

The log-probs never hold the [R, T, V] logits: the LM head's input is captured by a hook (the
head itself runs on zero positions) and ``vrpo.losses.token_logps`` applies the head to the
completion tokens only, a chunk at a time. Models whose logits are more than ``head(hidden)``
(final soft-capping or scaling) fall back to the model's own full logits.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor

from vrpo import losses
from vrpo.errors import UserError

ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "token_sequence", "token_source",
            "completion_mask")
SEQUENCE_KEYS = ("sequence_ids", "sequence_row", "sequence_segment", "sequence_last")
LOGITS_BUDGET = 2 ** 25  # logits alive at once in token_logps (x 4 bytes in float32): 128 MiB
# config attributes of models whose logits are not head(hidden) (Gemma 2/3, Cohere, Granite, ...)
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # the implementations that take a 4D mask as given
SHARED_PROMPT_TOLERANCE = 1e-3  # nats or score units; a mask that is not honoured moves values far more

Item = tuple  # (sequence index s, prompt ids, completion ids)


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------
def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], len(seqs[0])
    for other in seqs[1:]:
        n = min(n, len(other))
        for i in range(n):
            if first[i] != other[i]:
                n = i
                break
    return n


def _last_non_pad(ids: Sequence[int], pad_token_id: int) -> int | None:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_token_id:
            return i
    return None


def _row(items: Sequence[Item], pad_token_id: int) -> dict:
    """Lists of one row (``items`` share it when there are several) and each sequence's score position."""
    prompts = [list(p) for _, p, _ in items]
    n = _common_prefix_length(prompts)
    ids, seq, src = list(prompts[0][:n]), [-1] * n, [-1] * n
    prefix_last = _last_non_pad(ids, pad_token_id)
    pos, seg, lasts = list(range(n)), [0] * n, []
    for j, (s, prompt, completion) in enumerate(items, 1):
        tail, start = prompts[j - 1][n:], len(ids)
        tokens = tail + list(completion)
        ids += tokens
        pos += range(n, n + len(tokens))
        seg += [j] * len(tokens)
        # the first token is predicted by the prefix's last state, the others by their predecessor
        src += ([n - 1] + list(range(start, start + len(tokens) - 1)))[:len(tokens)]
        seq += [-1] * len(tail) + [s] * len(completion)
        if tokens and n == 0 and not tail:  # no predecessor: never counted (as in a plain row)
            seq[start] = -1
        last = _last_non_pad(tokens, pad_token_id)
        # transformers' pooling: the last non-pad token of [x_s, y_s], else its first position
        lasts.append((s, j, start + last if last is not None else prefix_last if prefix_last is not None
                      else (0 if n else start)))
    return {"ids": ids, "pos": pos, "seg": seg, "seq": seq, "src": src, "lasts": lasts}


def pack_rows(rows: Sequence[Sequence[Item]], pad_token_id: int) -> dict:
    """The batch of ``rows`` (see the module docstring). Each row is a list of
    ``(s, prompt_ids, completion_ids)``; a row of one item is plain, a row of several shares the
    prompts' common prefix. The indices s must be 0..S-1, each once."""
    built = [_row(items, pad_token_id) for items in rows]
    width = max(len(b["ids"]) for b in built)
    shape = (len(built), width)
    out = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros(shape, dtype=torch.long),
           "token_sequence": torch.full(shape, -1, dtype=torch.long),
           "token_source": torch.full(shape, -1, dtype=torch.long)}
    shared = any(len(items) > 1 for items in rows)
    if shared:
        out["position_ids"] = torch.zeros(shape, dtype=torch.long)
        out["segment_ids"] = torch.full(shape, -1, dtype=torch.long)
    lasts = {}
    for r, b in enumerate(built):
        n = len(b["ids"])
        out["input_ids"][r, :n] = torch.tensor(b["ids"], dtype=torch.long)
        out["attention_mask"][r, :n] = 1
        out["token_sequence"][r, :n] = torch.tensor(b["seq"], dtype=torch.long)
        out["token_source"][r, :n] = torch.tensor(b["src"], dtype=torch.long)
        if shared:
            out["position_ids"][r, :n] = torch.tensor(b["pos"], dtype=torch.long)
            out["segment_ids"][r, :n] = torch.tensor(b["seg"], dtype=torch.long)
        for s, j, last in b["lasts"]:
            lasts[s] = (r, j, last)
    if sorted(lasts) != list(range(len(lasts))):
        raise ValueError(f"pack_rows: sequence indices {sorted(lasts)[:8]}...; expected 0..S-1, each once")
    out["completion_mask"] = (out["token_sequence"] >= 0).long()
    out["sequence_ids"] = torch.arange(len(lasts))
    out["sequence_row"] = torch.tensor([lasts[s][0] for s in range(len(lasts))], dtype=torch.long)
    out["sequence_segment"] = torch.tensor([lasts[s][1] for s in range(len(lasts))], dtype=torch.long)
    out["sequence_last"] = torch.tensor([lasts[s][2] for s in range(len(lasts))], dtype=torch.long)
    return out


def plain_rows(batch: dict, pad_token_id: int) -> dict:
    """The sequences of a shared-prompt batch laid out one per row, in the same order (for checks)."""
    items = []
    for i, (r, j) in enumerate(zip(batch["sequence_row"].tolist(), batch["sequence_segment"].tolist())):
        ids, seg = batch["input_ids"][r].tolist(), batch["segment_ids"][r].tolist()
        own = [(t, q) for t, g, q in zip(ids, seg, batch["token_sequence"][r].tolist()) if g == j]
        cut = next((k for k, (_, q) in enumerate(own) if q >= 0), len(own))  # the tail ends where counting starts
        prompt = [t for t, g in zip(ids, seg) if g == 0] + [t for t, _ in own[:cut]]
        items.append([(i, prompt, [t for t, _ in own[cut:]])])
    out = pack_rows(items, pad_token_id)
    out["sequence_ids"] = batch["sequence_ids"].clone()
    return out


def row_chunks(batch: dict, max_sequences: int | None) -> list[dict]:
    """The batch cut into chunks of whole rows holding at most ``max_sequences`` sequences each
    (a row that alone holds more is a chunk of its own), each trimmed of the padding all its rows
    share. ``None``: the whole batch as one chunk."""
    rows = batch["input_ids"].shape[0]
    if max_sequences is None:
        return [batch]
    counts = torch.bincount(batch["sequence_row"], minlength=rows).tolist()
    bounds, start, held = [], 0, 0
    for r, c in enumerate(counts):
        if r > start and held + c > max_sequences:
            bounds.append((start, r))
            start, held = r, 0
        held += c
    bounds.append((start, rows))
    if len(bounds) == 1:
        return [batch]
    return [_slice_rows(batch, a, b) for a, b in bounds]


def _slice_rows(batch: dict, a: int, b: int) -> dict:
    width = int(batch["attention_mask"][a:b].sum(1).max())
    out = {k: batch[k][a:b, :width] for k in ROW_KEYS if k in batch}
    keep = (batch["sequence_row"] >= a) & (batch["sequence_row"] < b)
    out["sequence_ids"] = batch["sequence_ids"][keep]
    out["sequence_row"] = batch["sequence_row"][keep] - a
    out["sequence_segment"] = batch["sequence_segment"][keep]
    out["sequence_last"] = batch["sequence_last"][keep]
    # token_sequence indexes the chunk's own sequences 0..S_c-1
    local = torch.full((batch["sequence_ids"].numel(),), -1, dtype=torch.long, device=keep.device)
    local[keep.nonzero().flatten()] = torch.arange(int(keep.sum()), device=keep.device)
    ts = out["token_sequence"]
    out["token_sequence"] = torch.where(ts >= 0, local[ts.clamp(min=0)], ts)
    return out


def assemble(parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Chunks' ``(sequence_ids, values)`` back into one [S] tensor in batch order (differentiable)."""
    if len(parts) == 1:
        ids, values = parts[0]
        return values[torch.argsort(ids)]
    ids = torch.cat([i for i, _ in parts])
    return torch.cat([v for _, v in parts])[torch.argsort(ids)]


# --------------------------------------------------------------------------------------
# The forward pass
# --------------------------------------------------------------------------------------
def unwrap(model):
    """The model inside DDP / DeepSpeed wrappers (a PeftModel stays: it forwards what we read)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def block_attention_mask(segment_ids: Tensor, additive_dtype: torch.dtype | None = None) -> Tensor:
    """[R, 1, T, T] mask of shared-prompt rows: query q sees key k <= q when k is in the prefix or
    in q's own segment; a padding position sees itself only (its output is never read; a row
    with nothing to attend to would give NaN). Boolean (True = attend), or additive (0 / min)."""
    width = segment_ids.shape[1]
    ar = torch.arange(width, device=segment_ids.device)
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = (ar[:, None] >= ar[None, :]) & (k >= 0) & ((k == 0) | (k == q))
    allowed = torch.where(q < 0, (ar[:, None] == ar[None, :]).expand_as(allowed), allowed)[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def model_inputs(model, batch: dict) -> dict:
    """Keyword arguments of the model's forward for ``batch``: plain rows take the 2D padding
    mask; shared-prompt rows the block mask (in the form the attention implementation reads)
    and their restarting position ids."""
    if "segment_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    impl = attention_implementation(model)
    if impl not in SHARED_PROMPT_ATTENTION:
        raise UserError(f"--share-prompt: {type(unwrap(model)).__name__} runs attention implementation {impl!r}, "
                        f"which does not take a 4D mask; shared-prompt rows need one of {list(SHARED_PROMPT_ATTENTION)} "
                        "(load the model with attn_implementation='sdpa') or pass --no-share-prompt")
    mask = block_attention_mask(batch["segment_ids"], None if impl == "sdpa" else torch.float32)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}


def attention_implementation(model) -> str | None:
    config = unwrap(model).config
    return getattr(config, "_attn_implementation", None)


def lm_head_for_chunks(model):
    """The module that maps final hidden states to logits when the logits are exactly its output
    (tied or biased heads included); None when the model post-processes them or runs split
    across processes (DataParallel replicas, FSDP / ZeRO-3 shards): then full logits are used."""
    if isinstance(model, torch.nn.DataParallel):
        return None
    inner = unwrap(model)
    config = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_POSTPROCESSING:
        if getattr(text, name, None) not in (None, 1, 1.0) or getattr(config, name, None) not in (None, 1, 1.0):
            return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        return None
    # a sharded weight (FSDP2's DTensor, a ZeRO-3 partition) exists whole only inside the model's forward
    sharded = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in head.parameters())
    return None if sharded else head


def logits_chunk_tokens(head) -> int:
    """Tokens per chunk so that one chunk's logits stay within LOGITS_BUDGET elements."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 32768
    return max(1, LOGITS_BUDGET // vocab)


def _hidden_states(model, inputs: dict, head) -> Tensor:
    """Final hidden states [R, T, d] that ``head`` would map to logits; the head runs on none."""
    captured = []

    def take_input(module, args, kwargs):
        h = args[0] if args else kwargs["input"]
        captured.append(h)
        empty = h[..., :0, :]
        return ((empty,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, input=empty))

    handle = head.register_forward_pre_hook(take_input, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the LM head ran {len(captured)} times in one forward pass; expected once")
    rows, width = inputs["input_ids"].shape
    return captured[0].reshape(rows, width, -1)


def _counted_tokens(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Flat index of each counted token's predicting state, its id, and its (chunk-local) sequence."""
    rows, cols = (batch["token_sequence"] >= 0).nonzero(as_tuple=True)
    width = batch["input_ids"].shape[1]
    return rows * width + batch["token_source"][rows, cols], batch["input_ids"][rows, cols], \
        batch["token_sequence"][rows, cols]


def sequence_logps(model, batch: dict, *, autocast: Callable = contextlib.nullcontext,
                   chunked_head: bool = True) -> Tensor:
    """log pi(y_s | x_s) of the batch's sequences [S] (``batch["sequence_ids"]`` order), from
    one forward pass; differentiable when autograd records. ``autocast``: the context the
    model's forward runs under (the head is applied outside it, chunk by chunk)."""
    inputs = model_inputs(model, batch)
    source, targets, sequence = _counted_tokens(batch)
    num = batch["sequence_ids"].numel()
    head = lm_head_for_chunks(model) if chunked_head else None
    if head is not None:
        hidden = _hidden_states(model, inputs, head)
        with autocast():
            tok = losses.token_logps(hidden.reshape(-1, hidden.shape[-1])[source], head, targets,
                                     logits_chunk_tokens(head))
    else:
        logits = model(**inputs).logits
        flat = logits.reshape(-1, logits.shape[-1])
        tok = losses.token_logps(flat[source], _identity, targets, max(1, LOGITS_BUDGET // logits.shape[-1]))
    return losses.sum_by_sequence(tok, sequence, num)


def _identity(x: Tensor) -> Tensor:
    return x


def _score_head(model):
    inner = unwrap(model)
    score = getattr(inner, "score", None)
    if isinstance(model, torch.nn.DataParallel) or not isinstance(score, torch.nn.Module):
        raise UserError(f"--share-prompt: {type(inner).__name__} has no `score` head applied to every position "
                        "(or runs as DataParallel replicas), so scores cannot be read per completion; "
                        "pass --no-share-prompt")
    return score


def sequence_scores(model, batch: dict) -> Tensor:
    """A sequence-classification model's score r(x_s, y_s) of the batch's sequences [S]: the
    model's own pooling on plain rows; on shared-prompt rows the score head's output at each
    sequence's ``sequence_last`` (the same position the pooling reads in its plain row)."""
    if "segment_ids" not in batch:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        return scores[batch["sequence_row"]].float()
    captured = []
    handle = _score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**model_inputs(model, batch))
    finally:
        handle.remove()
    return captured[0][batch["sequence_row"], batch["sequence_last"], 0].float()


# --------------------------------------------------------------------------------------
# Whole passes without gradients (reference log-probs, sampling's re-scoring) and the check
# that a model honours the shared-prompt mask
# --------------------------------------------------------------------------------------
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_shared_prompt(model, batch: dict, pad_token_id: int, values: Callable = sequence_logps) -> None:
    """Refuse (one line) a model whose values on the batch's first shared-prompt row differ from
    the plain rows' (a model that ignores or rewrites the 4D mask). Once per model object."""
    if "segment_ids" not in batch or unwrap(model) in _CHECKED:
        return
    first = row_chunks(batch, 1)[0]
    was_training = model.training
    model.eval()  # dropout off: both layouts must see the same function
    try:
        with torch.no_grad():
            shared, plain = values(model, first), values(model, plain_rows(first, pad_token_id))
    finally:
        model.train(was_training)
    worst = float((shared - plain).abs().max())
    if not worst <= SHARED_PROMPT_TOLERANCE:
        raise UserError(f"--share-prompt: {type(unwrap(model)).__name__} (attention {attention_implementation(model)!r}) "
                        f"gives other values on a shared-prompt row than on plain rows (max difference {worst:.3g}); "
                        "it does not honour the 4D attention mask: pass --no-share-prompt")
    _CHECKED[unwrap(model)] = True


def logps_of_rows(model, rows: Sequence[Sequence[Item]], pad_token_id: int, max_sequences: int) -> list[float]:
    """log pi(y_s | x_s) of every sequence of ``rows`` (``pack_rows``' items), at temperature 1,
    without gradients, at most ``max_sequences`` sequences (whole rows) per forward pass."""
    device = next(model.parameters()).device
    out = [0.0] * sum(len(r) for r in rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            start = 0
            while start < len(rows):
                stop, held = start, 0
                while stop < len(rows) and (stop == start or held + len(rows[stop]) <= max_sequences):
                    held += len(rows[stop])
                    stop += 1
                group = rows[start:stop]
                order = [s for items in group for s, _, _ in items]
                local = {s: i for i, s in enumerate(sorted(order))}
                batch = pack_rows([[(local[s], p, c) for s, p, c in items] for items in group], pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                check_shared_prompt(model, batch, pad_token_id)
                for s, v in zip(sorted(order), sequence_logps(model, batch).tolist()):
                    out[s] = v
                start = stop
    finally:
        model.train(was_training)
    return out
