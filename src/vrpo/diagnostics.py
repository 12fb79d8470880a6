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
    base's, for K <= K0}.
    """
    obs = np.asarray(observed, dtype=np.float64)
    aux = np.asarray(observed_aux, dtype=np.float64)
    ref = np.asarray(ref_pair_scores, dtype=np.float64)
    if obs.ndim != 2 or aux.shape != obs.shape:
        raise ValueError(f"observed {obs.shape} / observed_aux {aux.shape}: expected two equal [n, d] arrays")
    if ref.ndim != 4 or ref.shape[0] != obs.shape[0] or ref.shape[-1] != obs.shape[1] or ref.shape[1] != ref.shape[2]:
        raise ValueError(f"ref_pair_scores: shape {ref.shape}; expected [n, K0, K0, d] = [{obs.shape[0]}, K0, K0, {obs.shape[1]}]")
    if obs.shape[0] < 2:
        raise ValueError(f"observed: {obs.shape[0]} examples; expected at least 2")
    total = _trace_var(obs)
    label = float(((obs - aux) ** 2).sum(-1).mean())
    zeta_2, zeta_1 = pair_moments(ref)
    pair, first = float(zeta_2.mean()), float(zeta_1.mean())
    between = max(0.0, total - label - pair)
    K0 = ref.shape[1]
    removable, predicted, measured = {}, {}, {}
    for k in ks:
        if k < 2:
            raise ValueError(f"ks: K={k}; expected K >= 2 reference samples")
        v = u_statistic_variance(k, pair, first)
        removable[str(k)] = (pair - v) / total if total > 0 else 0.0
        predicted[str(k)] = 1.0 - removable[str(k)]
        if k <= K0:
            j, l = np.triu_indices(k, 1)
            u_k = ref[:, j, l].mean(1)
            measured[str(k)] = _trace_var(obs - aux + u_k) / total if total > 0 else float("nan")
    removable["limit"] = pair / total if total > 0 else 0.0
    predicted["limit"] = 1.0 - removable["limit"]
    share = (lambda v: v / total) if total > 0 else (lambda v: 0.0)
    return {
        "n": int(obs.shape[0]), "reference_samples": int(K0),
        "total": total, "label_noise": label, "pair": pair, "pair_first_order": first, "between": between,
        "label_noise_share": share(label), "pair_share": share(pair), "between_share": share(between),
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
    parser.add_argument("data", help="scored data: DIR/data.parquet written by `vrpo score` (or its folder), "
                        "or a .jsonl file with the same columns")
    parser.add_argument("--k", default="2,4,8,16", help="comma-separated K to predict for (default 2,4,8,16)")
    parser.add_argument("--features", type=int, default=4096,
                        help="hashed text features of the linear-reward proxy (default 4096)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    path = Path(args.data)
    if path.is_dir():
        path = path / "data.parquet"
    if not path.exists():
        raise ValueError(f"data: {path} does not exist; expected the data.parquet written by `vrpo score`")
    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k {args.k!r}: expected comma-separated integers >= 2") from None
    if not ks or min(ks) < 2:
        raise ValueError(f"--k {args.k!r}: expected comma-separated integers >= 2")
    if args.features < 2:
        raise ValueError(f"--features {args.features}: expected at least 2")
    import pandas as pd

    try:
        df = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_parquet(path)
    except ValueError as e:
        raise ValueError(f"data: {path} could not be read as {'JSON lines' if path.suffix == '.jsonl' else 'Parquet'} ({e})") from None
    missing = [c for c in ("chosen", "rejected", "aux_prob", "ref_samples", "ref_aux_prob") if c not in df.columns]
    if missing:
        raise ValueError(f"data: {path} lacks column(s) {missing}; expected the scored data of `vrpo score`")
    report = diagnose_frame(df, ks, args.features)
    if not report["total"] > 0:  # shares of a zero variance would print as nan
        raise ValueError(f"data: {path}: the base loss's gradient does not vary over these {report['n']} examples "
                         "(every pair's chosen and rejected responses have the same features, e.g. chosen == "
                         "rejected): there is no variance to split")
    print(format_report(report, source=str(path)))
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)
    return 0


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


def format_report(r: dict, source: str = "") -> str:
    lines = [f"variance of the loss gradient ({r['n']} examples, {r['reference_samples']} reference samples each"
             + (f", {source})" if source else ")"),
             f"  label noise (VRPO cannot remove): {r['label_noise_share']:6.1%}",
             f"  within-prompt pair variance:      {r['pair_share']:6.1%}",
             f"  between-prompt variance:          {r['between_share']:6.1%}",
             "  K      removable share   VRPO/base variance (predicted, measured)"]
    for k, v in r["removable_share"].items():
        meas = r["measured_ratio"].get(k)
        shown = "" if meas is None else (f", {meas:.2f}" if np.isfinite(meas) else ", n/a")
        lines.append(f"  {k:<6} {v:8.1%}           {r['predicted_ratio'][k]:.2f}" + shown)
    return "\n".join(lines)
