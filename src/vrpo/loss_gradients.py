"""Per-example loss gradients of a language model: the score vectors of docs/variance.md.

The DPO / VRPO loss depends on the policy only through the implicit rewards
r(s) = beta * (log pi_theta(s) - log pi_ref(s)) of its sequences s, so by the chain rule

    grad_theta loss = sum over sequences s of  d loss / d r(s) * beta * grad_theta log pi_theta(s).

One gradient per sequence (chosen, rejected, each reference sample) is therefore enough for
every per-example score: the base score psi = f'(z+-) beta (G+ - G-), the auxiliary model's
mean score m_g = l'(z+-, g+-) beta (G+ - G-), and each reference pair's score
l'(z~_jk, g~_jk) beta (G_j - G_k), with G_s = grad log pi_theta(s) and l' = d l / d z.

A gradient has as many entries as the model has trainable parameters, so each is sketched
at once by a fixed, seeded count sketch S: R^P -> R^D (coordinate i goes to bucket h(i)
with sign s(i)); E_S <S u, S v> = <u, v>, so traces of covariances, hence variance
ratios, are kept in expectation, and memory stays O(D) per sequence. ``dim=None`` keeps
the exact gradient (for tests and small models).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vrpo.losses import get_base_loss, sequence_logps, soft_label_loss


class CountSketch:
    """A fixed random linear map R^P -> R^D applied parameter by parameter.

    ``sizes``: the number of entries of each parameter tensor, in the order the gradients
    come; ``dim``: D (``None``: no sketch, the concatenated exact gradient); ``seed`` fixes
    the map, so two runs (or a diagnostic and a measurement) sketch into the same space."""

    def __init__(self, sizes: Sequence[int], dim: int | None = 4096, seed: int = 0):
        if dim is not None and dim < 1:
            raise ValueError(f"sketch dim: {dim}; expected a positive number of dimensions (or None for exact gradients)")
        self.sizes = [int(s) for s in sizes]
        self.num_params = sum(self.sizes)
        self.dim = self.num_params if dim is None else int(dim)
        self.exact = dim is None
        self._buckets, self._signs = [], []
        if not self.exact:
            gen = torch.Generator().manual_seed(int(seed))
            for size in self.sizes:
                self._buckets.append(torch.randint(0, self.dim, (size,), generator=gen).to(torch.int32))  # 4 bytes each
                self._signs.append(torch.randint(0, 2, (size,), generator=gen).to(torch.float32) * 2 - 1)

    def project_batch(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sketches of a batch of gradients, each parameter's given as [B, *shape]: [B, D]."""
        if len(grads) != len(self.sizes):
            raise ValueError(f"sketch: {len(grads)} gradient tensors for {len(self.sizes)} parameters")
        B = grads[0].shape[0]
        if self.exact:
            return torch.cat([g.detach().reshape(B, -1).float() for g in grads], 1)
        out = torch.zeros((B, self.dim))
        for g, bucket, sign in zip(grads, self._buckets, self._signs):
            out.index_add_(1, bucket, g.detach().reshape(B, -1).float() * sign)
        return out

    def project(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The sketch of one gradient given as a list of per-parameter tensors (None = zero): [D]."""
        if len(grads) != len(self.sizes):
            raise ValueError(f"sketch: {len(grads)} gradient tensors for {len(self.sizes)} parameters")
        if self.exact:
            return torch.cat([torch.zeros(s) if g is None else g.detach().reshape(-1).float()
                              for g, s in zip(grads, self.sizes)])
        out = torch.zeros(self.dim)
        for g, bucket, sign in zip(grads, self._buckets, self._signs):
            if g is not None:
                out.index_add_(0, bucket, g.detach().reshape(-1).float() * sign)
        return out


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the optimiser would move (LoRA's only, for a peft model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("per-sequence gradients: the model has no trainable parameters")
    return params


def sequence_gradients(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                       sketch: CountSketch, *, progress: bool = False, desc: str = "per-sequence gradients",
                       batch_tokens: int = 1024):
    """log pi_theta(y|x) and the sketched grad_theta log pi_theta(y|x) of each sequence.

    In eval mode (no dropout); repeated sequences are computed once. When every trainable
    parameter sits in a module whose per-sequence gradient has a closed form (Linear, GPT-2's
    Conv1D, Embedding, LayerNorm: ``PerSequenceGradients``), sequences go through the model in
    right-padded batches of about ``batch_tokens`` tokens and one backward pass gives every
    sequence's gradient; otherwise one forward and backward pass per sequence. Returns
    (logps float64 [N], gradients float32 [N, D])."""
    from tqdm.auto import tqdm

    params = trainable_parameters(model)
    if sum(p.numel() for p in params) != sketch.num_params:
        raise ValueError(f"sketch: built for {sketch.num_params} parameters, the model trains "
                         f"{sum(p.numel() for p in params)}")
    was_training = model.training
    model.eval()
    seen: dict[tuple, int] = {}
    first = []  # index of the first occurrence of each sequence
    for i in range(len(prompt_ids)):
        first.append(seen.setdefault((len(prompt_ids[i]), *prompt_ids[i], *completion_ids[i]), i))
    todo = [i for i in range(len(prompt_ids)) if first[i] == i]
    logps = np.zeros(len(prompt_ids))
    grads = np.zeros((len(prompt_ids), sketch.dim), dtype=np.float32)
    engine = PerSequenceGradients.for_model(model, params)
    bar = tqdm(total=len(todo), desc=desc, unit="seq", disable=not progress)
    for batch in _batches(todo, [len(prompt_ids[i]) + len(completion_ids[i]) for i in todo],
                          batch_tokens if engine else 0):
        lp, g = (engine or _OneAtATime(model, params))(
            [prompt_ids[i] for i in batch], [completion_ids[i] for i in batch])
        logps[batch], grads[batch] = lp, sketch.project_batch(g).cpu().numpy()
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    logps, grads[:] = logps[first], grads[first]
    return logps, grads


def _batches(items: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups whose padded size (count x longest) stays within ``budget`` tokens
    (budget 0: one item per group)."""
    out, cur, longest = [], [], 0
    for i, n in zip(items, lengths):
        if cur and (not budget or (len(cur) + 1) * max(longest, n) > budget):
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return out + ([cur] if cur else [])


def _padded(prompt_ids, completion_ids, device):
    """Right-padded ids (pad 0), the completion mask and the attention mask (real tokens). With
    right padding and causal attention no real token sees a pad and pads feed no log-prob, so
    the attention mask changes no value; it tells the model which positions are padding (without
    it transformers warns whenever the pad id ends a row)."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(q) for q in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (p, q) in enumerate(zip(prompt_ids, seqs)):
        ids[b, :len(q)] = torch.tensor(q)
        mask[b, len(p):len(q)] = True
        attention[b, :len(q)] = 1
    return ids.to(device), mask.to(device), attention.to(device)


class _OneAtATime:
    """The general path: one forward and backward pass per sequence (any module type)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, prompt_ids, completion_ids):
        logps, grads = [], []
        for p, c in zip(prompt_ids, completion_ids):
            ids, mask, attention = _padded([p], [c], self.params[0].device)
            logp = sequence_logps(self.model(input_ids=ids, attention_mask=attention).logits, ids, mask)[0]
            g = torch.autograd.grad(logp, self.params, allow_unused=True)
            logps.append(float(logp.detach()))
            grads.append([torch.zeros_like(q) if x is None else x for x, q in zip(g, self.params)])
        return np.array(logps), [torch.stack(gs) for gs in zip(*grads)]


class PerSequenceGradients:
    """Per-sequence gradients of a batch from ONE forward and backward pass.

    A module's weight gradient is a sum over positions of (output gradient x input): for a
    Linear layer dW = sum_t g_t x_t^T. Keeping the batch index instead of summing over it
    gives each sequence's own gradient (sequences of a batch do not interact). Hooks record
    each module's input and output gradient; ``RULES`` turns them into per-sequence
    gradients. A parameter shared by two modules (GPT-2's tied embedding and output layer)
    gets the sum of both contributions."""

    def __init__(self, model, params, modules):
        self.model, self.params, self.modules = model, params, modules

    @classmethod
    def for_model(cls, model, params) -> "PerSequenceGradients | None":
        """The engine, or None when a trainable parameter sits in a module without a rule."""
        wanted = {id(p) for p in params}
        modules, covered = [], set()
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            rule = _rule(module)
            if rule is None:
                return None
            modules.append((module, rule))
            covered |= {id(p) for p in own}
        return cls(model, params, modules) if covered == wanted else None

    def __call__(self, prompt_ids, completion_ids):
        ids, mask, attention = _padded(prompt_ids, completion_ids, self.params[0].device)
        records, handles = [], []
        for module, rule in self.modules:
            handles.append(module.register_forward_hook(self._recorder(module, rule, records)))
        # explicit [B, T] position ids: a learned position embedding then has a per-sequence output
        # (with the default [1, T] its gradient would already be summed over the batch)
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        try:
            logps = sequence_logps(self.model(input_ids=ids, attention_mask=attention, position_ids=positions).logits,
                                   ids, mask)
        finally:
            for h in handles:
                h.remove()
        # d (sum_b logp_b) / d output_b = d logp_b / d output_b: the sequences do not interact.
        # Only the modules' outputs are asked for, so no summed weight gradient is computed.
        outs = torch.autograd.grad(logps.sum(), [r[3] for r in records], allow_unused=True)
        grads = {id(p): torch.zeros((len(prompt_ids), *p.shape), dtype=torch.float32) for p in self.params}
        for (module, rule, inp, _), g_out in zip(records, outs):
            if g_out is None:
                continue
            for param, g in rule(module, inp, g_out, len(prompt_ids)):
                if g is not None and id(param) in grads:
                    grads[id(param)] += g.float()
        return logps.detach().double().numpy(), [grads[id(p)] for p in self.params]

    @staticmethod
    def _recorder(module, rule, records):
        def hook(mod, inputs, output):
            records.append((module, rule, inputs[0].detach(), output))
        return hook


def _linear(m, x, g, B):
    return [(m.weight, torch.einsum("bto,bti->boi", g, x)), (m.bias, None if m.bias is None else g.sum(1))]


def _conv1d(m, x, g, B):  # transformers' GPT-2 Conv1D: y = x W + b, W [in, out]
    return [(m.weight, torch.einsum("bti,bto->bio", x, g)), (m.bias, g.sum(1))]


def _embedding(m, ids, g, B):
    if g.shape[0] != B:
        raise ValueError(f"per-sequence gradients: {type(m).__name__} output has batch size {g.shape[0]}, expected {B}")
    out = torch.zeros((B * m.weight.shape[0], m.weight.shape[1]), dtype=g.dtype)
    flat = (ids + torch.arange(B, device=ids.device)[:, None] * m.weight.shape[0]).reshape(-1)
    out.index_add_(0, flat, g.reshape(-1, g.shape[-1]))
    return [(m.weight, out.view(B, *m.weight.shape))]


def _layer_norm(m, x, g, B):
    xhat = torch.nn.functional.layer_norm(x, m.normalized_shape, eps=m.eps)
    return [(m.weight, (g * xhat).sum(1) if m.weight is not None else None),
            (m.bias, None if m.bias is None else g.sum(1))]


def _rule(module):
    """The per-sequence gradient rule of a module type (by class), or None."""
    from transformers.pytorch_utils import Conv1D

    for kind, rule in ((torch.nn.Linear, _linear), (Conv1D, _conv1d), (torch.nn.Embedding, _embedding),
                       (torch.nn.LayerNorm, _layer_norm)):
        if type(module) is kind or (kind is Conv1D and isinstance(module, Conv1D)):
            return rule
    return None


def _dloss_dmargin(margin: np.ndarray, prob, base) -> np.ndarray:
    """d l(z, p) / d z elementwise (l = f when p = 1), by autograd through vrpo.losses."""
    z = torch.tensor(np.asarray(margin, dtype=np.float64), requires_grad=True)
    p = prob if isinstance(prob, float) else torch.tensor(np.asarray(prob, dtype=np.float64))
    (dz,) = torch.autograd.grad(soft_label_loss(z, p, base).sum(), z)
    return dz.numpy()


def example_scores(logps: np.ndarray, ref_logps: np.ndarray, grads: np.ndarray, n: int, k: int, beta: float,
                   base: str, aux_prob, ref_aux_prob):
    """Per-example scores from per-sequence log-probs and gradients.

    Sequences in the order [chosen_0..n-1, rejected_0..n-1, sample_{0,0..k-1}, sample_{1,0..}, ...]:
    ``logps``/``ref_logps`` [n (2 + k)] under pi_theta and pi_ref, ``grads`` [n (2 + k), D];
    ``aux_prob`` [n] = g(x, y+, y-), ``ref_aux_prob`` [n, k, k] (entry j < k read, mirrored).

    Returns (observed [n, D] = grad f(z+-), observed_aux [n, D] = grad l(z+-, g+-),
    ref_pairs [n, k, k, D] = grad l(z~_jk, g~_jk), symmetric, zero diagonal): the inputs of
    ``vrpo.diagnostics.variance_decomposition``."""
    get_base_loss(base)
    if len(logps) != n * (2 + k) or len(ref_logps) != len(logps) or grads.shape[0] != len(logps):
        raise ValueError(f"example scores: {len(logps)} log-probs, {len(ref_logps)} reference log-probs, "
                         f"{grads.shape[0]} gradients; expected {n * (2 + k)} each")
    r = beta * (np.asarray(logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64))
    chosen, rejected, samples = r[:n], r[n:2 * n], r[2 * n:].reshape(n, k)
    g_obs = grads[:n] - grads[n:2 * n]  # G+ - G-
    z = chosen - rejected
    observed = (beta * _dloss_dmargin(z, 1.0, base))[:, None] * g_obs
    observed_aux = (beta * _dloss_dmargin(z, np.asarray(aux_prob, dtype=np.float64), base))[:, None] * g_obs
    j, l = np.triu_indices(k, 1)
    gjk = np.asarray(ref_aux_prob, dtype=np.float64)[:, j, l]
    coef = beta * _dloss_dmargin(samples[:, j] - samples[:, l], gjk, base)  # [n, P]
    gs = grads[2 * n:].reshape(n, k, -1)
    ref_pairs = np.zeros((n, k, k, grads.shape[1]), dtype=np.float32)
    upper = coef[..., None] * (gs[:, j] - gs[:, l])
    ref_pairs[:, j, l] = upper
    ref_pairs[:, l, j] = upper  # m_kj = m_jk: l(-z, 1 - g) = l(z, g)
    return observed.astype(np.float32), observed_aux.astype(np.float32), ref_pairs


# --------------------------------------------------------------------------------------
# A checkpoint and its rows -> per-example scores, chunk by chunk
# --------------------------------------------------------------------------------------
class Checkpoint:
    """The policy at which gradients are taken and what its implicit rewards need.

    ``model``: the module whose trainable parameters are differentiated (a peft model for
    LoRA); ``ref_path``: pi_ref's folder, or None when pi_ref is the model itself (every
    margin 0); ``token_settings``: the tokenisation limits training used."""

    def __init__(self, model, tokenizer, ref_path, beta: float, base_loss: str, token_settings: dict, description: str,
                 trained_on: str | None = None):
        self.model, self.tokenizer, self.ref_path = model, tokenizer, ref_path
        self.beta, self.base_loss, self.token_settings, self.description = beta, base_loss, token_settings, description
        self.trained_on = trained_on  # the run's training data, when the checkpoint is a `vrpo train` run

    def num_trainable(self) -> int:
        return sum(p.numel() for p in trainable_parameters(self.model))


def _run_record(path) -> dict | None:
    """The resolved config of a `vrpo train` run folder (config.yaml with a method), else None."""
    from vrpo.provenance import read_run_config

    record = read_run_config(path, "--model")
    return record if record is not None and "method" in record else None


def load_checkpoint(path: str, *, ref_model: str | None = None, beta: float | None = None, base_loss: str | None = None,
                    lora_r: int = 0) -> Checkpoint:
    """A `vrpo train` run folder (beta, base loss, pi_ref, LoRA adapter and tokenisation read
    from its config.yaml) or a plain model folder (pi_ref = ``ref_model`` or itself)."""
    from pathlib import Path

    from vrpo.sampling import load_model_and_tokenizer

    record = _run_record(path) or {}
    adapter = Path(path) / "adapter"
    if record.get("lora_r", 0) > 0 and (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        from vrpo._warnings import third_party_deprecations_silenced

        base, tokenizer = load_model_and_tokenizer(record["model"], what=f"--model {path}: its base model")
        with third_party_deprecations_silenced():
            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        what = f"LoRA adapter of the run {path}"
    else:
        model, tokenizer = load_model_and_tokenizer(path)
        what = f"model {path}"
        if lora_r > 0:
            from vrpo.train.config import VRPOConfig
            from vrpo.train.run import _apply_lora

            model = _apply_lora(model, VRPOConfig(lora_r=lora_r))
            what = f"a fresh rank-{lora_r} LoRA adapter on {path}"
    ref = ref_model or record.get("ref_model") or record.get("model") or None
    if ref is not None and Path(ref).resolve() == Path(path).resolve():
        ref = None
    settings = {k: record.get(k, v) for k, v in (("max_length", 512), ("max_prompt_length", 256),
                                                  ("prompt_truncation", "error"))}
    return Checkpoint(model, tokenizer, ref, beta or record.get("beta") or 0.1,
                      base_loss or record.get("base_loss") or "sigmoid", settings, what, record.get("data"))


def tokenize_examples(tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[str]], token_settings: dict):
    """(prompt ids, completion ids) of every sequence, example by example: the labelled pair
    (responses[i][:2]) and the reference samples (responses[i][2:]) tokenised as training
    tokenises them (two calls, as the trainer makes)."""
    from vrpo.data import tokenize_completions

    prompt_ids, completion_ids = [], []
    for i, (prompt, resp) in enumerate(zip(prompts, responses)):
        for part, where in ((list(resp[:2]), f"row {i}"), (list(resp[2:]), f"row {i} reference samples")):
            p, ids = tokenize_completions(tokenizer, prompt, part, where=where, **token_settings)
            prompt_ids += [p] * len(ids)
            completion_ids += ids
    return prompt_ids, completion_ids


def sequence_table(ckpt: Checkpoint, prompts: Sequence[str], responses: Sequence[Sequence[str]], sketch: CountSketch,
                   *, progress: bool = True) -> dict:
    """Per-sequence log-probs under pi_theta and pi_ref and sketched gradients of M responses
    per prompt (responses[i] = [y_a, y_b, y~_1 .. y~_K], M = 2 + K for every i):
    ``{"logps": [n, M], "ref_logps": [n, M], "grads": [n, M, D]}``."""
    from vrpo.sampling import load_model_and_tokenizer, sequence_logps_under

    m = {len(r) for r in responses}
    if len(m) != 1 or min(m) < 4:
        raise ValueError(f"sequence table: {sorted(m)} responses per prompt; expected the same number (>= 4) for every prompt")
    m = m.pop()
    prompt_ids, completion_ids = tokenize_examples(ckpt.tokenizer, prompts, responses, ckpt.token_settings)
    logps, grads = sequence_gradients(ckpt.model, prompt_ids, completion_ids, sketch, progress=progress)
    ref = logps
    if ckpt.ref_path is not None:
        ref_model, _ = load_model_and_tokenizer(str(ckpt.ref_path), what="--ref-model")
        ref = np.asarray(sequence_logps_under(ref_model.eval(), prompt_ids, completion_ids, ckpt.tokenizer.pad_token_id))
    n = len(prompts)
    return {"logps": logps.reshape(n, m), "ref_logps": np.asarray(ref).reshape(n, m), "grads": grads.reshape(n, m, -1)}


def scores_from_table(table: dict, beta: float, base: str, aux_prob, ref_aux_prob, ks: Sequence[int], *,
                      a_is_chosen=None, chunk: int = 32):
    """(observed [n, D], observed_aux [n, D], reference pair summary) from a ``sequence_table``.

    ``aux_prob`` [n] = g(x, y+, y-); ``ref_aux_prob`` [n, K, K]; ``a_is_chosen`` [n] bool:
    whether the first response of each example won (default: all, as in preference rows
    ordered chosen, rejected). Assembled ``chunk`` examples at a time, so the [n, K, K, D]
    pair scores are never held at once."""
    from vrpo.diagnostics import concat_summaries, reference_pair_summary

    n, m = table["logps"].shape
    k = m - 2
    first = np.ones(n, dtype=bool) if a_is_chosen is None else np.asarray(a_is_chosen, dtype=bool)
    order = np.where(first[:, None], np.arange(m)[None], np.r_[1, 0, 2:m][None])  # chosen, rejected, samples
    observed, observed_aux, parts = [], [], []
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        pick = lambda a: np.take_along_axis(a[idx], order[idx].reshape(len(idx), m, *[1] * (a.ndim - 2)), 1)  # noqa: E731
        lp, ref, gr = pick(table["logps"]), pick(table["ref_logps"]), pick(table["grads"])
        flat = lambda a: np.concatenate([a[:, 0], a[:, 1], a[:, 2:].reshape(-1, *a.shape[2:])])  # noqa: E731
        obs, aux, pairs = example_scores(flat(lp), flat(ref), flat(gr), len(idx), k, beta, base,
                                         np.asarray(aux_prob, dtype=np.float64)[idx],
                                         np.asarray(ref_aux_prob, dtype=np.float64)[idx, :k, :k])
        observed.append(obs)
        observed_aux.append(aux)
        parts.append(reference_pair_summary(pairs, ks))
    return np.concatenate(observed), np.concatenate(observed_aux), concat_summaries(parts)
