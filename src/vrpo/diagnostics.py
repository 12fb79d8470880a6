"""How much loss-gradient variance can VRPO remove on your data? (docs/variance.md)

The per-example gradient (score) of the base loss splits, by the law of total variance, into

    Var(psi) = E|psi - m(x, y+, y-)|^2         label noise      (VRPO cannot remove it)
             + E Var(m(x, Y1, Y2) | x)         within-prompt pair variance  (zeta_2)
             + Var(E[m | x])                   between-prompt variance      (cannot remove)

where m(x, a, b) = grad l(z_ab, p*_ab) is the score's mean given the pair. VRPO replaces
the observed pair's m by a U-statistic over K reference samples, whose variance given x is

    v_K = 4 (K - 2) / (K (K - 1)) * zeta_1 + 2 / (K (K - 1)) * zeta_2,
    zeta_1 = Cov(m(Y1, Y2), m(Y1, Y3) | x)   (one shared sample),

so the removable share is (zeta_2 - v_K) / Var(psi): zero at K = 2 (v_2 = zeta_2) and
zeta_2 / Var(psi) in the limit K -> infinity. With an auxiliary model g in place of p* the
split is an estimate that is right when g is close to p*.

``variance_decomposition`` is a pure function of per-example score vectors in any parameter
space; ``vrpo diagnose`` builds them for a linear reward on hashed text features at the start
of training (policy = reference, all margins 0) from the scored-data parquet of ``vrpo score``.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np


def _trace_var(v: np.ndarray) -> float:
    return float(((v - v.mean(0)) ** 2).sum(-1).sum() / max(1, v.shape[0] - 1))


def pair_moments(ref_pair_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example unbiased (U-statistic) estimates of zeta_2 = Var(m(Y1, Y2) | x) and
    zeta_1 = Cov(m(Y1, Y2), m(Y1, Y3) | x) (traces) from the scores m_jk of all pairs of
    K0 >= 4 reference samples. ref_pair_scores [n, K0, K0, d], symmetric in (j, k); the
    diagonal is ignored. Returns (zeta_2 [n], zeta_1 [n]).

    With ordered pairs: A2 = sum_{j!=k} |m_jk|^2, B = sum over pairs of pairs sharing one
    index, D = disjoint ones = |sum m|^2 - 2 A2 - 4 B (each kind divided by its count)."""
    m = np.asarray(ref_pair_scores, dtype=np.float64)
    n, K = m.shape[:2]
    if K < 4:
        raise ValueError(f"ref_pair_scores: {K} reference samples per example; expected at least 4 to split the pair variance")
    off = ~np.eye(K, dtype=bool)
    m = m * off[None, :, :, None]
    a2 = (m ** 2).sum((1, 2, 3))
    rows = m.sum(2)  # [n, K, d]
    b = (rows ** 2).sum((1, 2)) - a2
    total = m.sum((1, 2))
    d = (total ** 2).sum(-1) - 2 * a2 - 4 * b
    s2 = a2 / (K * (K - 1))
    s1 = b / (K * (K - 1) * (K - 2))
    s0 = d / (K * (K - 1) * (K - 2) * (K - 3))
    return s2 - s0, s1 - s0


def u_statistic_variance(k: int, zeta_2: float, zeta_1: float) -> float:
    """Var of the mean over the k(k-1)/2 pairs of k iid samples: v_k (Hoeffding)."""
    return 4.0 * (k - 2) / (k * (k - 1)) * zeta_1 + 2.0 / (k * (k - 1)) * zeta_2


def reference_pair_summary(ref_pair_scores, ks: Sequence[int] = (2, 4, 8, 16)) -> dict:
    """What the decomposition needs from the reference pairs, per example: ``zeta_2`` [n],
    ``zeta_1`` [n] (``pair_moments``) and ``u`` {K: [n, d]}, the U-statistic (mean score over
    the pairs of the first K samples) for each K <= K0; ``u_blocks`` {K: [n, K0 // K, d]}
    (float32), the same over each disjoint block of K samples (independent draws of U_K, for a
    measurement that averages variances over blocks). Computed chunk by chunk of examples
    (``concat_summaries`` joins them), so [n, K0, K0, d] never has to be held at once."""
    ref = np.asarray(ref_pair_scores)
    if ref.ndim != 4 or ref.shape[1] != ref.shape[2]:
        raise ValueError(f"ref_pair_scores: shape {ref.shape}; expected [n, K0, K0, d]")
    zeta_2, zeta_1 = pair_moments(ref)
    u, blocks = {}, {}
    for k in ks:
        if 2 <= k <= ref.shape[1]:
            j, l = np.triu_indices(k, 1)
            blocks[str(k)] = np.stack([ref[:, b + j, b + l].astype(np.float64).mean(1)
                                       for b in range(0, ref.shape[1] - k + 1, k)], 1).astype(np.float32)
            u[str(k)] = ref[:, j, l].astype(np.float64).mean(1)
    return {"zeta_2": zeta_2, "zeta_1": zeta_1, "u": u, "u_blocks": blocks, "reference_samples": int(ref.shape[1]),
            "d": int(ref.shape[3])}


def concat_summaries(parts: Sequence[dict]) -> dict:
    """``reference_pair_summary`` of consecutive chunks of examples, joined in order."""
    if not parts:
        raise ValueError("reference pair summaries: none to join")
    return {"zeta_2": np.concatenate([p["zeta_2"] for p in parts]), "zeta_1": np.concatenate([p["zeta_1"] for p in parts]),
            "u": {k: np.concatenate([p["u"][k] for p in parts]) for k in parts[0]["u"]},
            "u_blocks": {k: np.concatenate([p["u_blocks"][k] for p in parts]) for k in parts[0]["u_blocks"]},
            "reference_samples": parts[0]["reference_samples"], "d": parts[0]["d"]}


def variance_decomposition(observed, observed_aux, ref_pair_scores, ks: Sequence[int] = (2, 4, 8, 16)) -> dict:
    """Split the variance of the base loss's per-example gradient and predict VRPO's.

    Args (n examples, d parameters, K0 >= 4 reference samples per example):
        observed [n, d]: grad f(z+-), the base (DPO / BT) score of each labelled pair.
        observed_aux [n, d]: grad l(z+-, g+-), the auxiliary model's mean score of that pair.
        ref_pair_scores [n, K0, K0, d]: grad l(z~_jk, g~_jk) for every pair of reference samples.
        ks: the K to predict for.

    Returns a dict: ``total`` (trace Var of the base score), ``label_noise``, ``pair``
    (E zeta_2), ``between`` (the rest), the same as ``*_share`` of the total,
    ``removable_share`` {K: (zeta_2 - v_K) / total, "limit": zeta_2 / total},
    ``predicted_ratio`` {K: Var(VRPO score) / Var(base score)}, and ``measured_ratio`` {K:
    the sample variance of psi - psi_aux + (mean over the first K samples' pairs) over the
    base's, for K <= K0}. Raises a one-line ValueError when the base score does not vary
    (nothing to decompose) instead of returning NaN.
    """
    obs = np.asarray(observed, dtype=np.float64)
    ref = np.asarray(ref_pair_scores)
    if obs.ndim == 2 and (ref.ndim != 4 or ref.shape[0] != obs.shape[0] or ref.shape[-1] != obs.shape[1]
                          or ref.shape[1] != ref.shape[2]):
        raise ValueError(f"ref_pair_scores: shape {ref.shape}; expected [n, K0, K0, d] = [{obs.shape[0]}, K0, K0, {obs.shape[1]}]")
    if ref.ndim == 4 and ref.shape[1] < 4:
        raise ValueError(f"ref_pair_scores: {ref.shape[1]} reference samples per example; expected at least 4 to split the pair variance")
    _check_scores(obs, np.asarray(observed_aux, dtype=np.float64))
    return decompose(obs, observed_aux, reference_pair_summary(ref, ks), ks)


def _check_scores(obs: np.ndarray, aux: np.ndarray) -> None:
    if obs.ndim != 2 or aux.shape != obs.shape:
        raise ValueError(f"observed {obs.shape} / observed_aux {aux.shape}: expected two equal [n, d] arrays")
    if obs.shape[0] < 2:
        raise ValueError(f"observed: {obs.shape[0]} examples; expected at least 2")


class ZeroVariance(ValueError):
    """The base score does not vary: every share would be 0/0."""


def decompose(observed, observed_aux, summary: dict, ks: Sequence[int] = (2, 4, 8, 16)) -> dict:
    """``variance_decomposition`` from the per-example scores and a ``reference_pair_summary``."""
    obs = np.asarray(observed, dtype=np.float64)
    aux = np.asarray(observed_aux, dtype=np.float64)
    _check_scores(obs, aux)
    if summary["zeta_2"].shape[0] != obs.shape[0] or summary["d"] != obs.shape[1]:
        raise ValueError(f"reference pair summary of {summary['zeta_2'].shape[0]} examples in {summary['d']} dimensions; "
                         f"expected {obs.shape[0]} in {obs.shape[1]}")
    total = _trace_var(obs)
    if not total > 0:
        raise ZeroVariance(f"the base loss gradient does not vary over these {obs.shape[0]} examples (every chosen and "
                         "rejected response scores alike?); there is no variance to decompose")
    label = float(((obs - aux) ** 2).sum(-1).mean())
    pair, first = float(summary["zeta_2"].mean()), float(summary["zeta_1"].mean())
    removable, predicted, measured = {}, {}, {}
    for k in ks:
        if k < 2:
            raise ValueError(f"ks: K={k}; expected K >= 2 reference samples")
        v = u_statistic_variance(k, pair, first)
        removable[str(k)] = (pair - v) / total
        predicted[str(k)] = 1.0 - removable[str(k)]
        if str(k) in summary["u"]:
            measured[str(k)] = _trace_var(obs - aux + summary["u"][str(k)]) / total
    removable["limit"] = pair / total
    predicted["limit"] = 1.0 - removable["limit"]
    between = max(0.0, total - label - pair)
    return {
        "n": int(obs.shape[0]), "reference_samples": int(summary["reference_samples"]),
        "total": total, "label_noise": label, "pair": pair, "pair_first_order": first, "between": between,
        "label_noise_share": label / total, "pair_share": pair / total, "between_share": between / total,
        "removable_share": removable, "predicted_ratio": predicted, "measured_ratio": measured,
    }


# ----------------------------------------------------------------------------- the command
def scores_at_reference(chosen_feat, rejected_feat, aux_prob, ref_feat, ref_aux_prob, f_prime_0: float = -0.5):
    """Per-example scores of a linear reward r = w' e(y) at the start of training (all
    margins 0): grad f(z) = f'(0) (e+ - e-); grad l(z, g) at 0 = (2g - 1) f'(0) (e+ - e-);
    for reference pairs (2 g~_jk - 1) f'(0) (e_j - e_k). Shapes: chosen/rejected [n, d],
    aux_prob [n], ref [n, K, d], ref_aux_prob [n, K, K]."""
    diff = np.asarray(chosen_feat) - np.asarray(rejected_feat)
    g = np.asarray(aux_prob, dtype=np.float64)[:, None]
    e = np.asarray(ref_feat, dtype=np.float64)
    gr = np.asarray(ref_aux_prob, dtype=np.float64)
    ref_diff = e[:, :, None, :] - e[:, None, :, :]
    return (f_prime_0 * diff, f_prime_0 * (2 * g - 1) * diff,
            f_prime_0 * (2 * gr - 1)[..., None] * ref_diff)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, int_at_least, int_list

    parser.add_argument("data", help="scored data: DIR/data.parquet written by `vrpo score` (or its folder), "
                        "or a .jsonl file with the same columns")
    parser.add_argument("--k", type=int_list(2), default=[2, 4, 8, 16], help="comma-separated K to predict for (default 2,4,8,16)")
    parser.add_argument("--proxy", choices=("ngram", "model"), default=None,
                        help="whose gradients: 'model' = the checkpoint's own per-example loss gradients (needs "
                        "--model; the default when --model is given), 'ngram' = a linear reward on hashed n-gram "
                        "features at margin 0 (fast, no model; the default without --model). docs/variance.md says "
                        "when each is right")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ngram = parser.add_argument_group("n-gram proxy")
    ngram.add_argument("--features", type=int_at_least(2), default=4096,
                       help="hashed text features of the linear-reward proxy (default 4096)")
    model = parser.add_argument_group("model gradients (--model)")
    model.add_argument("--model", default=None,
                       help="checkpoint to evaluate the gradients at: a `vrpo train` run folder (its beta, base loss, "
                       "reference model and LoRA adapter are read from it) or a model folder. Recommended: a short "
                       "DPO run's folder (near the target, where the pair variance is the one training meets)")
    model.add_argument("--ref-model", default=None,
                       help="pi_ref for the implicit rewards (default: the run's reference model, or --model itself, "
                       "where every margin is 0)")
    model.add_argument("--beta", type=POSITIVE_FLOAT, default=None, help="beta of r = beta log(pi/pi_ref) "
                       "(default: the run's, else 0.1)")
    model.add_argument("--base-loss", default=None, help="base loss f (default: the run's, else sigmoid)")
    model.add_argument("--lora-r", type=NONNEGATIVE_INT, default=0,
                       help="on a plain model folder: differentiate a fresh LoRA adapter of this rank (what LoRA "
                       "training moves) instead of every parameter; a LoRA run folder uses its own adapter")
    model.add_argument("--proj-dim", type=NONNEGATIVE_INT, default=4096,
                       help="dimensions of the fixed random projection (count sketch) of each gradient; 0 keeps the "
                       "exact gradient (default 4096)")
    model.add_argument("--max-rows", type=POSITIVE_INT, default=256,
                       help="rows to use, a seeded random subset (default 256; the cost is one forward and backward "
                       "pass per sequence: rows x (2 + K0))")
    model.add_argument("--seed", type=SEED, default=0, help="seed of the row subset and the projection (default 0)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vrpo.errors import UserError, check_writable_folder

    path = Path(args.data)
    if path.is_dir():
        path = path / "data.parquet"
    if not path.exists():
        raise UserError(f"data: {path} does not exist; expected the data.parquet written by `vrpo score`")
    from vrpo.cli_args import int_list
    from vrpo.provenance import atomic_write_json

    args.k = int_list(2).check(args.k, "--k")  # the Python API may pass a string or a list
    if args.json:  # an unwritable --json fails now, not after the gradients are computed
        if Path(args.json).is_dir():
            raise UserError(f"--json {args.json}: is a folder; expected a file name")
        check_writable_folder(Path(args.json).resolve().parent, "--json")
    proxy = args.proxy or ("model" if args.model else "ngram")
    if proxy == "model" and not args.model:
        raise UserError("--proxy model: needs --model CHECKPOINT (the checkpoint whose gradients to decompose)")
    try:
        if proxy == "ngram":
            report = diagnose_frame(_read_frame(path), args.k, args.features)
            source = f"{path}; proxy: hashed n-gram features at margin 0"
        else:
            report = diagnose_checkpoint(path, args)
            source = f"{path}; gradients of {args.model}"
    except ZeroVariance as e:  # name the file: e.g. every chosen == rejected
        raise UserError(f"data: {path}: {e}") from None
    print(format_report(report, source=source))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def _read_frame(path):
    import pandas as pd

    try:
        df = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_parquet(path)
    except ValueError as e:
        raise ValueError(f"data: {path} could not be read as {'JSON lines' if path.suffix == '.jsonl' else 'Parquet'} ({e})") from None
    missing = [c for c in SCORED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"data: {path} lacks column(s) {missing}; expected the scored data of `vrpo score`")
    return df


SCORED_COLUMNS = ("chosen", "rejected", "aux_prob", "ref_samples", "ref_aux_prob")


def _text(v) -> str:
    if isinstance(v, str):
        return v
    try:  # conversational messages: the assistant contents
        return " ".join(str(m.get("content", "")) for m in v)
    except AttributeError:
        return str(v)


def diagnose_frame(df, ks: Sequence[int], n_features: int = 4096) -> dict:
    """``variance_decomposition`` of a scored-data frame with hashed-feature scores."""
    from sklearn.feature_extraction.text import HashingVectorizer

    K0s = {len(s) for s in df["ref_samples"]}
    if len(K0s) != 1:
        raise ValueError(f"ref_samples: rows have {sorted(K0s)} reference samples; expected the same K for every row")
    K0 = K0s.pop()
    if K0 < 4:
        raise ValueError(f"ref_samples: {K0} reference samples per prompt; expected at least 4 to split the pair variance "
                         "(draw more with `vrpo sample --k 4`)")
    ref_g = np.stack([np.stack([np.asarray(r, dtype=np.float64) for r in row]) for row in df["ref_aux_prob"]])
    if ref_g.shape[1:] != (K0, K0):
        raise ValueError(f"ref_aux_prob: shape {ref_g.shape[1:]} per row; expected [{K0}, {K0}]")
    hv = HashingVectorizer(n_features=n_features, alternate_sign=True, norm="l2", ngram_range=(1, 2))
    enc = lambda texts: hv.transform([_text(t) for t in texts]).toarray()  # noqa: E731
    n = len(df)
    ref = enc([t for s in df["ref_samples"] for t in s]).reshape(n, K0, -1)
    obs, aux, pairs = scores_at_reference(enc(df["chosen"]), enc(df["rejected"]), df["aux_prob"].to_numpy(), ref, ref_g)
    return variance_decomposition(obs, aux, pairs, ks)


def diagnose_checkpoint(path, args) -> dict:
    """``variance_decomposition`` of the checkpoint's own per-example loss gradients on the
    scored rows at ``path`` (``vrpo diagnose --model``)."""
    from vrpo.data import load_preferences
    from vrpo.loss_gradients import CountSketch, load_checkpoint, scores_from_table, sequence_table, trainable_parameters

    ckpt = load_checkpoint(args.model, ref_model=args.ref_model, beta=args.beta, base_loss=args.base_loss,
                           lora_r=args.lora_r)
    rows = load_preferences(path, ckpt.tokenizer).to_list()
    missing = [c for c in SCORED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"data: {path} lacks column(s) {missing}; expected the scored data of `vrpo score`")
    k0 = _reference_count(rows, path)
    if len(rows) > args.max_rows:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(rows), args.max_rows, replace=False))
        rows = [rows[i] for i in keep]
    sizes = [p.numel() for p in trainable_parameters(ckpt.model)]
    sketch = CountSketch(sizes, None if args.proj_dim == 0 else args.proj_dim, seed=args.seed)
    table = sequence_table(ckpt, [r["prompt"] for r in rows],
                           [[r["chosen"], r["rejected"], *r["ref_samples"][:k0]] for r in rows], sketch)
    obs, aux, summary = scores_from_table(table, ckpt.beta, ckpt.base_loss, [r["aux_prob"] for r in rows],
                                          [np.asarray(r["ref_aux_prob"], dtype=np.float64)[:k0, :k0] for r in rows], args.k)
    report = decompose(obs, aux, summary, args.k)
    seen = _rows_trained_on(ckpt.trained_on, ckpt.tokenizer, rows) if ckpt.trained_on else None
    if seen:
        report["note"] = (f"{seen} of the {len(rows)} diagnosed rows are pairs the checkpoint was trained on "
                          f"({ckpt.trained_on}): its margins fit their labels, which shrinks the base score and "
                          "overstates the removable share; diagnose rows it did not train on (hold out part of the "
                          "data from the short DPO run)")
    report["gradients"] = {"checkpoint": str(args.model), "differentiated": ckpt.description,
                           "trainable_parameters": sketch.num_params, "reference_model": ckpt.ref_path or str(args.model),
                           "beta": ckpt.beta, "base_loss": ckpt.base_loss,
                           "projection": "exact" if sketch.exact else f"count sketch to {sketch.dim} dimensions (seed {args.seed})"}
    return report


def _rows_trained_on(trained_on: str, tokenizer, rows: list[dict]) -> int | None:
    """How many of the diagnosed ``rows`` are pairs of the run's training data (``--data`` of
    the run: a file, or a `vrpo score` / `vrpo label` folder), compared as rendered text
    (prompt, chosen, rejected), whatever file or folder holds them; None when that data can no
    longer be read (moved, deleted): then nothing is said."""
    from pathlib import Path

    from vrpo.data import load_preferences
    from vrpo.provenance import DATA_TABLES

    data = Path(trained_on)
    if data.is_dir():
        data = next((data / name for name in DATA_TABLES if (data / name).is_file()), data)
    try:
        trained = {_pair_key(r) for r in load_preferences(data, tokenizer).to_list()}
    except (ValueError, OSError):
        return None
    return sum(_pair_key(r) in trained for r in rows)


def _pair_key(row: dict) -> tuple[str, str, str]:
    return row["prompt"], row["chosen"], row["rejected"]


def _reference_count(rows: list[dict], path) -> int:
    """K0, the reference samples every row holds (the fewest), at least 4."""
    counts = [len(r["ref_samples"] or []) for r in rows]
    k0 = min(counts)
    if k0 < 4:
        raise ValueError(f"data: {path} row {counts.index(k0)} has {k0} reference samples; expected at least 4 per prompt "
                         "to split the pair variance (draw more with `vrpo sample --num-samples 4`)")
    return k0


LEGEND = ("  predicted: (label noise + between-prompt + the variance of the mean over K samples' pairs) / total, "
          "from the decomposition (any K)\n"
          "  measured here: the variance of these rows' own VRPO scores with their first K reference samples, over "
          "the base's (K <= K0); a check of the prediction on the same rows, not a new experiment")


def format_report(r: dict, source: str = "") -> str:
    lines = [f"variance of the loss gradient ({r['n']} examples, {r['reference_samples']} reference samples each"
             + (f"; {source})" if source else ")")]
    grads = r.get("gradients")
    if grads:
        lines.append(f"  at {grads['differentiated']} ({grads['trainable_parameters']:,} parameters, {grads['projection']}); "
                     f"pi_ref {grads['reference_model']}, beta {grads['beta']:g}, base loss {grads['base_loss']}")
    lines += [f"  label noise (VRPO cannot remove): {r['label_noise_share']:6.1%}",
              f"  within-prompt pair variance:      {r['pair_share']:6.1%}",
              f"  between-prompt variance:          {r['between_share']:6.1%}",
              "  K      removable share   VRPO/base variance: predicted   measured here"]
    for k, v in r["removable_share"].items():
        meas = r["measured_ratio"].get(k)
        shown = "" if meas is None else (f"   {meas:13.2f}" if np.isfinite(meas) else f"   {'n/a':>13}")
        lines.append(f"  {k:<6} {v:8.1%}           {r['predicted_ratio'][k]:22.2f}" + shown)
    if r.get("note"):
        lines.append(f"  note: {r['note']}")
    return "\n".join(lines + [LEGEND])
