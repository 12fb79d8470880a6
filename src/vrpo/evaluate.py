"""Evaluation of trained policies: generic, reusable pieces.

Statistics (numpy only, no model needed; reused by every experiment):
- ``win_rate``: P(a beats b) with ties counted one half;
- ``bootstrap_ci``: percentile bootstrap confidence interval of any statistic, resampling
  units (prompts) with replacement; ``seed_prompt_bootstrap_ci``: the same for a
  [seeds, prompts] table, resampling both; ``paired_win_rate`` = win rate + its CI;
- ``mean_sd``: mean and sample standard deviation over seeds;
- ``by_slice``: a statistic per slice label (e.g. per prompt category);
- ``kl_from_samples``: KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from
  samples of pi and the two log-probs of each sample (mean and standard error).

Model pieces (torch + transformers, imported inside):
- ``generate``: completions of prompts at a sampling temperature (T = 0 is greedy; T > 0
  samples the full tempered distribution: no top-k, no top-p);
- ``completion_logps``: exact log pi(y|x) of given completion token ids;
- ``scores_at_temperatures``: a score function (e.g. a gold reward) averaged over prompts
  at each temperature, plus the per-prompt scores for win rates.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

__all__ = [
    "win_rate", "bootstrap_ci", "seed_prompt_bootstrap_ci", "paired_win_rate", "mean_sd", "by_slice", "kl_from_samples",
    "generate", "completion_logps", "scores_at_temperatures",
]


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------
def _as_1d(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: empty; expected at least one value")
    if np.isnan(a).any():
        raise ValueError(f"{name}: contains NaN at index {int(np.flatnonzero(np.isnan(a))[0])}")
    return a


def _wins(a, b) -> np.ndarray:
    """Per unit: 1 if a > b, 1/2 if a == b, 0 if a < b."""
    a, b = _as_1d("a", a), _as_1d("b", b)
    if a.shape != b.shape:
        raise ValueError(f"win rate: a has {a.size} values and b has {b.size}; expected one pair per unit")
    return (a > b) + 0.5 * (a == b)


def win_rate(a, b) -> float:
    """Fraction of units where a beats b, ties counting 1/2. ``a``, ``b``: paired scores [N]."""
    return float(_wins(a, b).mean())


def bootstrap_ci(values, statistic: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(values)``, resampling the N units with replacement.

    ``values``: [N] or [N, ...] (rows are the units); ``statistic`` maps such an array to a number.
    numpy only, so the core install (which has no scipy) can report CIs (``vrpo gate``).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: {level}; expected a confidence level in (0, 1)")
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] == 0:
        raise ValueError("bootstrap_ci: no values; expected at least one unit")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    stats = np.array([statistic(v[i]) for i in idx])
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def seed_prompt_bootstrap_ci(values, statistic: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 2000,
                             level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Two-level percentile bootstrap for a [S, P] table (seeds x prompts): resample the S
    seeds and, independently, the P prompts (the same prompts for every seed, so pairs made on
    a prompt stay paired). Counts both sources of variation: training randomness (seeds) and
    which prompts were evaluated. With S = 1 it is the ordinary bootstrap over prompts.
    Written here because no kept library has it: ``scipy.stats.bootstrap`` resamples the
    units of each sample on their own, not the crossed rows and columns of one table."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: {level}; expected a confidence level in (0, 1)")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or 0 in v.shape:
        raise ValueError(f"seed_prompt_bootstrap_ci: shape {v.shape}; expected a non-empty [seeds, prompts] table")
    rng = np.random.default_rng(seed)
    S, P = v.shape
    stats = np.empty(n_boot)
    for i in range(n_boot):
        rows = rng.integers(0, S, S) if S > 1 else np.zeros(1, dtype=int)
        stats[i] = statistic(v[np.ix_(rows, rng.integers(0, P, P))])
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def paired_win_rate(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Win rate of a over b on paired units with its bootstrap CI:
    ``{"win_rate", "ci_low", "ci_high", "n"}``. The CI excludes 1/2 when a is reliably better or worse.

    ``a``, ``b``: [N] paired scores (units = prompts), or [S, N] (seeds x prompts: the CI
    then comes from ``seed_prompt_bootstrap_ci``)."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_win_rate: a has shape {a_arr.shape} and b {b_arr.shape}; expected paired scores")
    w = _wins(a_arr, b_arr).reshape(a_arr.shape)
    if w.ndim == 2:
        lo, hi = seed_prompt_bootstrap_ci(w, np.mean, n_boot=n_boot, level=level, seed=seed)
    else:
        lo, hi = bootstrap_ci(w, np.mean, n_boot=n_boot, level=level, seed=seed)
    return {"win_rate": float(w.mean()), "ci_low": lo, "ci_high": hi, "n": int(w.size)}


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof = 1; 0 for a single value) over seeds."""
    v = _as_1d("values", values)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def by_slice(values, slices: Sequence[Hashable], statistic: Callable[[np.ndarray], float] = np.mean) -> dict:
    """``{slice: statistic(values of that slice)}``, slices in order of first appearance."""
    v = np.asarray(values)
    if len(slices) != v.shape[0]:
        raise ValueError(f"by_slice: {v.shape[0]} values but {len(slices)} slice labels; expected one label per value")
    labels = np.asarray(slices, dtype=object)
    return {s: float(statistic(v[labels == s])) for s in dict.fromkeys(slices)}


def kl_from_samples(policy_logps, ref_logps) -> tuple[float, float]:
    """KL(pi || pi_ref) estimated from y ~ pi: mean of log pi(y|x) - log pi_ref(y|x).

    Returns (estimate, standard error). Unbiased, but a single sample's term can be negative.
    """
    d = _as_1d("policy_logps", policy_logps) - _as_1d("ref_logps", ref_logps)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), se


# --------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------
def generate(model, tokenizer, prompts: Sequence[str], *, temperature: float, max_new_tokens: int,
             seed: int = 0, batch_size: int = 64) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Complete each prompt once. Returns (prompt token ids, completion token ids, completion texts).

    T = 0 is greedy decoding; T > 0 samples softmax(logits / T) over the full vocabulary.
    Prompts are left-padded into batches; padding never enters the returned ids (a completion
    ends at its first end-of-sequence token, which it keeps: its probability is part of log pi(y|x)).
    """
    import torch

    if temperature < 0:
        raise ValueError(f"temperature: {temperature}; expected a value >= 0 (0 = greedy)")
    torch.manual_seed(seed)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompt_ids[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, **sampling)
        completions.extend(_until_eos(row[width:].tolist(), tokenizer.eos_token_id) for row in out)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return prompt_ids, completions, texts


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    """Completion ids up to and including the first end-of-sequence token (what follows is padding)."""
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


def completion_logps(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
                     batch_size: int = 64, pad_token_id: int = 0):
    """Exact log pi(y|x) = sum over completion tokens of log-softmax at temperature 1, float64 [N]."""
    import torch

    from vrpo.losses import sequence_logps

    out = []
    for s in range(0, len(prompt_ids), batch_size):
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size])]
        width = max(len(q) for q in seqs)
        ids = torch.tensor([q + [pad_token_id] * (width - len(q)) for q in seqs])
        attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
        comp = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size])):
            comp[i, len(p):len(p) + len(c)] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        out.append(sequence_logps(logits, ids, comp).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def scores_at_temperatures(model, tokenizer, prompts: Sequence[str], score_fn: Callable[[list[str], list[str]], np.ndarray],
                           temperatures: Sequence[float], *, max_new_tokens: int, seed: int = 0,
                           ref_model=None, batch_size: int = 64) -> dict:
    """Per temperature T: ``{"scores": [N] per-prompt score, "mean": float}``; with ``ref_model``,
    also the KL(pi || pi_ref) estimate from the T = 1 samples under key ``"kl"`` (mean, se).

    ``score_fn(prompts, completions)`` -> [N] scores (e.g. gold reward of prompt + completion).
    """
    out: dict = {}
    for i, t in enumerate(temperatures):
        p_ids, c_ids, texts = generate(model, tokenizer, prompts, temperature=t, max_new_tokens=max_new_tokens,
                                       seed=seed + i, batch_size=batch_size)
        scores = np.asarray(score_fn(list(prompts), texts), dtype=np.float64)
        out[float(t)] = {"scores": scores, "mean": float(scores.mean()), "texts": texts}
        if ref_model is not None and float(t) == 1.0:
            pad = tokenizer.pad_token_id or 0
            lp = completion_logps(model, p_ids, c_ids, batch_size=batch_size, pad_token_id=pad)
            lr = completion_logps(ref_model, p_ids, c_ids, batch_size=batch_size, pad_token_id=pad)
            out["kl"] = kl_from_samples(lp, lr)
    return out
