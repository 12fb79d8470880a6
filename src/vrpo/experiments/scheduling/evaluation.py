"""Evaluation by slice under the panel's truth p*.

For policies pi (pi_ref, DPO, VRPO) with one response per evaluation prompt:
- win rate of pi against another policy in slice s: mean over prompts x of s of
  p*(x, y_pi, y_other) (the expected share of reviewers preferring pi's answer), with a
  95% percentile-bootstrap CI over prompts: ``vrpo gate``'s statistics with the panel's
  p* as the judge (``panel.oracle_prob``);
- rubric pass rates per slice (``panel.rubrics``, the gate's ``--rubrics`` contract), e.g.
  escalation on urgent symptoms;
- calibration of the auxiliary model per slice, on the labelled pairs: its out-of-fold
  g against the labels (Brier, ECE) and against the truth (mean |g - p*|), beside the
  oracle g = p* (the best any g can do against noisy labels).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vrpo.gate import ALL, slice_members, slice_pass_rates, slice_win_rates


def win_rates(judge, prompts: Sequence[str], slices: Sequence[str], policy: Sequence[str], other: Sequence[str],
              n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """``{slice: {"win_rate", "ci_low", "ci_high", "n"}}`` of ``policy`` over ``other`` under
    ``judge(prompts, a, b)`` (``panel.oracle_prob``: p*), as ``vrpo gate --judge`` computes them."""
    p = np.asarray(judge(list(prompts), list(policy), list(other)), dtype=np.float64)
    return slice_win_rates(p, slices, n_boot=n_boot, seed=seed)


def rubric_rates(rubrics, prompts: Sequence[str], slices: Sequence[str], responses: Sequence[str]) -> dict[str, dict]:
    """``{slice: {rubric: pass rate}}`` over the prompts where the rubric applies, from
    ``rubrics(prompts, responses, slices)`` (``panel.rubrics``), as ``vrpo gate --rubrics`` reads them."""
    return slice_pass_rates(rubrics(list(prompts), list(responses), list(slices)), slices)


def aux_calibration(aux_prob: Sequence[float], p_star: Sequence[float], slices: Sequence[str], seed: int = 0) -> dict:
    """Per slice: the auxiliary model's out-of-fold g(x, chosen, rejected) against the labels
    (every label is 1: chosen won) and against the truth p*; the oracle g = p* for scale.
    The ECE reads each pair in both orders (``both_orders``): in the chosen-first order alone
    every label is 1, and a g of 1/2 everywhere, which says nothing wrong, would score 0.5."""
    from vrpo.aux.calibration import both_orders, brier, expected_calibration_error

    g, truth = np.asarray(aux_prob, dtype=np.float64), np.asarray(p_star, dtype=np.float64)
    labels = np.ones_like(g)
    out = {}
    for name, m in slice_members(slices).items():
        bins = 10  # even: with an odd count the middle bin is symmetric about 1/2 and scores every g near 1/2 as 0
        out[name] = {"n": int(m.sum()), "mean_g": float(g[m].mean()), "mean_p_star": float(truth[m].mean()),
                     "brier": brier(g[m], labels[m]), "ece": expected_calibration_error(*both_orders(g[m], labels[m]), bins=bins),
                     "oracle_brier": brier(truth[m], labels[m]), "mae_to_p_star": float(np.abs(g[m] - truth[m]).mean())}
    return out


def audit_truth(audit_rows: list[dict], pairs: list[dict], top_fraction: float = 0.2) -> dict:
    """How well the audit's most disputed pairs find labels that are truly against the panel's
    majority (p* < 1/2) or came from a fatigued reviewer, against the base rate. Pairs are
    matched by their position (``row``) in the labelled data."""
    k = max(1, int(round(top_fraction * len(audit_rows))))
    top = [pairs[int(r["row"])] for r in audit_rows[:k]]

    def rate(group, key):
        return float(np.mean([key(p) for p in group])) if group else float("nan")

    against = lambda p: p["p_star"] < 0.5  # noqa: E731
    tired = lambda p: bool(p["fatigued"])  # noqa: E731
    return {"top_fraction": top_fraction, "top_n": k,
            "against_majority_top": rate(top, against), "against_majority_all": rate(pairs, against),
            "fatigued_top": rate(top, tired), "fatigued_all": rate(pairs, tired)}
