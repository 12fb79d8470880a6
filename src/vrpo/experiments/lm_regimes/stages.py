"""The stages of one regime, each cached in the output folder so a rerun resumes:

    samples (vrpo.sampling, shared by the regimes of a world)
      -> per seed: labels from the regime's reviewer, oracle and cross-fitted g -> preference files
      -> the checkpoint: seed 0's DPO run (vrpo.train)
      -> the diagnostic: per-example gradients of seed 0's data at the checkpoint -> predicted ratio
      -> the measurement: fresh datasets at the same checkpoint -> measured ratio

Per-sequence gradient tables are saved as ``.npz`` (arrays only, never pickles).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vrpo.experiments.lm_regimes.presets import KS, MAX_PROMPT_TOKENS


# --------------------------------------------------------------------------------------
# Samples from pi_ref
# --------------------------------------------------------------------------------------
def draw_samples(world, folder: Path, prompts: list[str], num_samples: int, seed: int,
                 progress: bool = True) -> list[dict]:
    """``num_samples`` pi_ref samples per prompt with exact log-probs (``vrpo.sampling``, resumable)."""
    from vrpo.provenance import atomic_write_text
    from vrpo.sampling import read_samples, sample_references

    prompts_file = Path(folder).with_suffix(".prompts.jsonl")
    atomic_write_text(prompts_file, "".join(json.dumps({"prompt": x}) + "\n" for x in prompts))
    sample_references(str(world.policy_dir), str(prompts_file), str(folder), num_samples=num_samples,
                      max_new_tokens=world.sizes.max_new_tokens, seed=seed, batch_size=16, shard_size=64,
                      max_prompt_length=MAX_PROMPT_TOKENS, progress=progress)
    rows = read_samples(folder)
    if [r["prompt"] for r in rows] != list(prompts):
        raise ValueError(f"{folder}: the samples are not those of this run's prompts; delete the folder to redraw")
    return rows


def pairwise_preferences(reviewer, prompts: list[str], samples: list[list[str]]) -> np.ndarray:
    """[n, K, K] with [i, j, k] = p*(x_i, y_j, y_k) (one call over all pairs j < k; mirrored)."""
    k = len(samples[0])
    j, l = np.triu_indices(k, 1)
    xs = [x for x in prompts for _ in j]
    p = np.asarray(reviewer.preference(xs, [s[a] for s in samples for a in j], [s[b] for s in samples for b in l]))
    out = np.full((len(prompts), k, k), 0.5)
    out[:, j, l] = p.reshape(len(prompts), -1)
    out[:, l, j] = 1.0 - out[:, j, l]
    return out


# --------------------------------------------------------------------------------------
# Labelled data: one dataset per (regime, seed)
# --------------------------------------------------------------------------------------
def labelled_examples(reviewer, sample_rows: list[dict], n: int, k: int, rng: np.random.Generator,
                      repeats: int = 1) -> dict:
    """``n`` examples (prompts drawn without replacement), each with its own labelled pair and k
    reference samples: blocks of 2 + k consecutive samples of a row (``repeats`` blocks per row).
    Returns columns: prompt, prompt_id, a, b, refs, a_is_chosen."""
    blocks = [(row, r) for row in sample_rows for r in range(repeats)]
    pick = np.sort(rng.choice(len(blocks), size=n, replace=False)) if n < len(blocks) else np.arange(len(blocks))
    out: dict = {key: [] for key in ("prompt", "prompt_id", "a", "b", "refs")}
    for i in pick:
        row, r = blocks[i]
        s = row["samples"][r * (2 + k):(r + 1) * (2 + k)]
        for key, v in (("prompt", row["prompt"]), ("prompt_id", row["prompt_id"]), ("a", s[0]), ("b", s[1]),
                       ("refs", list(s[2:]))):
            out[key].append(v)
    out["a_is_chosen"] = reviewer.label(out["prompt"], out["a"], out["b"], rng).astype(bool)
    return out


def oracle_aux(reviewer, ex: dict) -> tuple[np.ndarray, np.ndarray]:
    """g = p*: on the labelled pair (chosen over rejected) and on every reference pair."""
    p_ab = np.asarray(reviewer.preference(ex["prompt"], ex["a"], ex["b"]))
    return np.where(ex["a_is_chosen"], p_ab, 1.0 - p_ab), pairwise_preferences(reviewer, ex["prompt"], ex["refs"])


def fitted_aux(world, reviewer, ex: dict, seed: int, preset, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The cross-fitted GPM on MiniLM embeddings (the IMDb experiment's ``fitted`` g): out-of-fold
    g on the labelled pairs, the fold average on the reference pairs."""
    from types import SimpleNamespace

    from vrpo.experiments.imdb.pipeline import aux_models, reference_matrices

    setup = SimpleNamespace(reviewers=reviewer, progress=progress,
                            preset=SimpleNamespace(aux_epochs=preset.aux_epochs, aux_folds=preset.aux_folds))
    rows = [{"prompt": x, "chosen": a if w else b, "rejected": b if w else a}
            for x, a, b, w in zip(ex["prompt"], ex["a"], ex["b"], ex["a_is_chosen"])]
    observed, model = aux_models(setup, rows, seed, {"fitted"})["fitted"]
    return np.asarray(observed), reference_matrices(model, ex["prompt"], ex["refs"])


def preference_rows(ex: dict, aux_prob, ref_aux_prob) -> list[dict]:
    """The scored-data rows ``vrpo.train`` reads (docs/architecture.md). The samples' stored
    log-probs stay out: they were computed with the tokenisation of all 2 + K samples of a
    prompt together, and the trainer tokenises the K reference samples apart (the boundary
    between prompt and response can differ), so it computes them once itself."""
    return [{"prompt_id": pid, "prompt": x, "chosen": a if w else b, "rejected": b if w else a, "aux_prob": float(g),
             "ref_samples": refs, "ref_aux_prob": np.asarray(m).tolist()}
            for pid, x, a, b, w, g, refs, m in zip(ex["prompt_id"], ex["prompt"], ex["a"], ex["b"], ex["a_is_chosen"],
                                                    aux_prob, ex["refs"], ref_aux_prob)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    from vrpo.provenance import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------
# Gradients at a checkpoint: cached per-sequence tables -> decomposition
# --------------------------------------------------------------------------------------
def gradient_table(path: Path, make, ex: dict, progress: bool) -> dict:
    """The per-sequence table (``vrpo.loss_gradients.sequence_table``) of the examples' sequences
    [a, b, refs], cached as ``path`` (.npz); ``make()`` -> (checkpoint, sketch) when it is computed."""
    from vrpo.loss_gradients import sequence_table
    from vrpo.provenance import atomic_write_bytes

    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in ("logps", "ref_logps", "grads")}
    ckpt, sketch = make()
    table = sequence_table(ckpt, ex["prompt"], [[a, b, *r] for a, b, r in zip(ex["a"], ex["b"], ex["refs"])],
                           sketch, progress=progress)
    import io

    buf = io.BytesIO()
    np.savez(buf, **table)
    atomic_write_bytes(path, buf.getvalue())
    return table


def decomposition(table: dict, ex: dict, aux: tuple, beta: float, base: str = "sigmoid") -> dict:
    """``vrpo.diagnostics.decompose`` of the examples with auxiliary probabilities ``aux``."""
    from vrpo.diagnostics import decompose
    from vrpo.loss_gradients import scores_from_table

    obs, obs_aux, summary = scores_from_table(table, beta, base, aux[0], aux[1], KS, a_is_chosen=ex["a_is_chosen"])
    return decompose(obs, obs_aux, summary, KS), (obs, obs_aux, summary)


def label_expected_scores(table: dict, ex: dict, p_ab, ref_aux_prob, beta: float, base: str = "sigmoid") -> dict:
    """The measured examples' scores in expectation over their labels (Bernoulli(p*), p* known).

    A fresh dataset draws fresh pairs AND fresh labels; one label per pair adds the noise of a
    single coin flip to every variance it measures (the realised labels can correlate with the
    pair scores by chance: a 2-sd draw moved the mixture's ratio at K = 8 from 0.80 to 0.61).
    Each example's DPO score and VRPO residual psi - psi_aux take the value of "a won" with
    probability p* and of "b won" otherwise, so per example: mean m = p v_a + (1 - p) v_b and
    label variance s = p (1 - p) |v_a - v_b|^2; the reference samples' U-statistics do not
    depend on the label. ``expected_trace_var`` turns (m, s) into E_labels[sample variance]."""
    p = np.asarray(p_ab, dtype=np.float64)
    n = len(p)
    a = _oriented_scores(table, beta, base, p, ref_aux_prob, np.ones(n, dtype=bool))
    b = _oriented_scores(table, beta, base, 1.0 - p, ref_aux_prob, np.zeros(n, dtype=bool))
    outcomes = {"dpo": (a[0], b[0]), "residual": (a[0] - a[1], b[0] - b[1])}
    return {name: _label_moments(*v, p) for name, v in outcomes.items()} | {
        "u_blocks": a[2]["u_blocks"], "outcomes": outcomes, "p": p}


def label_draw_spread(expected: dict, draws: int = 200, seed: int = 0) -> dict:
    """How far ONE realised label per pair moves the measured ratio: the block ratio of
    ``draws`` independent label draws (Bernoulli(p*)) on the same pairs and reference samples,
    per K: its standard deviation and 95% range."""
    rng = np.random.default_rng(seed)
    p, (dpo_a, dpo_b), (res_a, res_b) = expected["p"], expected["outcomes"]["dpo"], expected["outcomes"]["residual"]
    ratios: dict = {k: [] for k in expected["u_blocks"]}
    zero = np.zeros(len(p))
    for _ in range(draws):
        w = (rng.random(len(p)) < p)[:, None]
        drawn = {"dpo": (np.where(w, dpo_a, dpo_b), zero), "residual": (np.where(w, res_a, res_b), zero),
                 "u_blocks": expected["u_blocks"]}
        for k, r in block_measured_ratios(drawn).items():
            ratios[k].append(r)
    return {k: {"sd": float(np.std(v)), "range": [float(q) for q in np.quantile(v, [0.025, 0.975])]}
            for k, v in ratios.items()}


def _oriented_scores(table, beta, base, aux_prob, ref_aux_prob, a_is_chosen):
    """(observed, observed_aux, reference pair summary) with the given response as the chosen one."""
    from vrpo.loss_gradients import scores_from_table

    obs, aux, summary = scores_from_table(table, beta, base, aux_prob, ref_aux_prob, KS, a_is_chosen=a_is_chosen)
    return obs.astype(np.float64), aux.astype(np.float64), summary


def _label_moments(v_a: np.ndarray, v_b: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m [n, D], s [n]): mean and trace variance over the label of v_a w.p. p, else v_b."""
    return p[:, None] * v_a + (1 - p)[:, None] * v_b, p * (1 - p) * ((v_a - v_b) ** 2).sum(1)


def realised_scores(scores: tuple) -> dict:
    """The same structure for the realised labels (no expectation: s = 0)."""
    obs, aux, summary = (np.asarray(x, dtype=np.float64) if i < 2 else x for i, x in enumerate(scores))
    zero = np.zeros(obs.shape[0])
    return {"dpo": (obs, zero), "residual": (obs - aux, zero), "u_blocks": summary["u_blocks"]}


def expected_trace_var(m: np.ndarray, s: np.ndarray) -> float:
    """E[trace of the sample variance] of rows with independent label noise: mean m_i, trace
    variance s_i. E sum |v_i - vbar|^2 = sum |m_i - mbar|^2 + (1 - 1/n) sum s_i, so over n - 1:
    tv(m) + mean(s)."""
    return _trace_var(m) + float(np.mean(s))


def _vrpo_rows(scores: dict, u: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    m, s = scores["residual"]
    return m + u[:, b], s


def block_measured_ratios(scores: dict) -> dict:
    """Var(VRPO_K) / Var(DPO) over the examples (``label_expected_scores`` or
    ``realised_scores``), the VRPO variance averaged over the disjoint blocks of K reference
    samples each example holds (K0 // K independent draws of U_K: the same expectation as the
    first block alone, less noise)."""
    base = expected_trace_var(*scores["dpo"])
    return {k: float(np.mean([expected_trace_var(*_vrpo_rows(scores, u, b)) for b in range(u.shape[1])])) / base
            for k, u in scores["u_blocks"].items()}


def _trace_var(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(((v - v.mean(0)) ** 2).sum() / max(1, v.shape[0] - 1))


def minibatch_ratios(scores: dict, batch: int) -> dict:
    """Var over datasets of ``batch`` examples of the minibatch-mean VRPO gradient over DPO's,
    the datasets being disjoint consecutive blocks of the fresh examples (iid); a mean of b
    rows has mean mean(m) and label variance sum(s) / b^2."""
    m0 = scores["dpo"][0]
    n = (m0.shape[0] // batch) * batch
    if n // batch < 2:
        return {}, n // batch  # fewer than two datasets: no variance across them

    def var_of_means(m, s):
        return expected_trace_var(np.asarray(m[:n], dtype=np.float64).reshape(-1, batch, m.shape[1]).mean(1),
                                  np.asarray(s[:n]).reshape(-1, batch).sum(1) / batch ** 2)

    base = var_of_means(*scores["dpo"])
    return {k: float(np.mean([var_of_means(*_vrpo_rows(scores, u, b)) for b in range(u.shape[1])])) / base
            for k, u in scores["u_blocks"].items()}, n // batch


def bootstrap_ratios(scores: dict, n_boot: int, seed: int = 0) -> dict:
    """95% percentile intervals of ``block_measured_ratios``, resampling examples (each copy
    with its own label when ``scores`` are label expectations).

    With resampling counts w [B, n]: E sum_i w_i |v_i - vbar_w|^2 = w . (|m|^2 + s) -
    (|w m|^2 + w . s) / n, one matrix product per array instead of a loop over resamples."""
    m0 = scores["dpo"][0]
    n = m0.shape[0]
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)

    def trace_sums(m, s):
        m = np.asarray(m, dtype=np.float64)
        return w @ ((m ** 2).sum(1) + s) - (((w @ m) ** 2).sum(1) + w @ s) / n

    base = trace_sums(*scores["dpo"])
    out = {}
    for k, u in scores["u_blocks"].items():
        ratio = np.mean([trace_sums(*_vrpo_rows(scores, u, b)) for b in range(u.shape[1])], 0) / base
        out[k] = [float(q) for q in np.quantile(ratio, [0.025, 0.975])]
    return out
