"""results.json, results.md and plots of ``vrpo reproduce bandit``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vrpo.simulate.estimators import NEWTON_TOL, SMOOTHING_PATH
from vrpo.simulate.world import PREFERENCE_KINDS

LEGEND = {
    "base": "DPO / Bradley-Terry, sigmoid loss",
    "cdpo": "conservative DPO, label smoothing 0.1",
    "rdpo": "robust DPO, assumed flip rate 0.1",
    "vrpo_oracle_k2": "VRPO, oracle g = p*, K = 2 (the paper's single reference pair)",
    "vrpo_oracle_k4": "VRPO, oracle g, K = 4 (U-statistic over 6 pairs)",
    "vrpo_oracle": "VRPO, oracle g, K = 8 (U-statistic over 28 pairs)",
    "vrpo_oracle_k16": "VRPO, oracle g, K = 16",
    "vrpo_oracle_exact": "VRPO, oracle g, exact expectation over pi_ref (the limit K -> infinity)",
    "vrpo_oracle_optc": "VRPO, oracle g, K = 8, control-variate coefficient estimated from the data",
    "vrpo_oracle_k2_optc": "VRPO, oracle g, K = 2, estimated coefficient",
    "vrpo_fitted": "VRPO, K = 8, flexible (GPM-like) g fitted on the same labelled pairs",
    "vrpo_crossfit": "VRPO, K = 8, the same g cross-fitted (5 folds, out-of-fold for observed pairs)",
    "vrpo_crossfit_exact": "VRPO, cross-fitted g, exact expectation",
    "vrpo_wrong_aux": "VRPO, K = 8, deliberately wrong g = 1 - p*",
    "ramp_dpo": "base with the ramp loss, no control variate (ramp-DPO)",
    "vrpo_ramp_oracle_k2": "VRPO with the ramp loss, oracle g, K = 2 (the paper code's setting)",
    "vrpo_ramp_oracle": "VRPO with the ramp loss, oracle g, K = 8",
    "vrpo_ramp_oracle_exact": "VRPO with the ramp loss, oracle g, exact expectation",
}
RAMP_METHODS = {"ramp_dpo", "vrpo_ramp_oracle_k2", "vrpo_ramp_oracle", "vrpo_ramp_oracle_exact"}
LIMIT_KS = {"2": "vrpo_oracle_k2", "4": "vrpo_oracle_k4", "8": "vrpo_oracle", "16": "vrpo_oracle_k16"}
NEGLIGIBLE = 0.03  # a limit reduction under 3% of the base MSE has no "fraction" to speak of
FRACTION_NOTE = ("A fraction is a ratio of two estimated MSE reductions, so it is not bounded by 0% and 100%: "
                 "below 0% when the method's MSE is above the base's (it adds variance), above 100% when it beats "
                 "the reference by noise; read it together with the arrows of the MSE ratios.")


def _reference_of(method: str) -> str:
    """The base a method is compared with: ramp methods with ramp-DPO (same target)."""
    return "ramp_dpo" if method in RAMP_METHODS else "base"


def _paired_ratio_ci(a, b, seed: int = 0, boot: int = 2000) -> list[float]:
    """95% bootstrap CI of mean(a) / mean(b), resampling replicates jointly (paired)."""
    a, b = np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(boot, len(a)))
    r = a[idx].mean(1) / b[idx].mean(1)
    return [float(x) for x in np.percentile(r, [2.5, 97.5])]


def _fraction(base: float, method: float, limit: float):
    red = base - limit
    return None if red <= NEGLIGIBLE * base else (base - method) / red


def _setting_block(name: str, res: dict) -> dict:
    methods = {m: r for m, r in res.items() if not m.startswith("_")}
    out_methods = {}
    for m, r in methods.items():
        ref = methods.get(_reference_of(m))
        entry = {k: v for k, v in r.items() if not k.startswith("_")}
        if ref is not None:
            entry["mse_ratio"] = r["mse"] / ref["mse"]
            entry["variance_ratio"] = r["variance"] / ref["variance"] if ref["variance"] > 0 else None
            entry["regret_ratio"] = r["regret"] / ref["regret"] if ref["regret"] > 0 else None
            entry["compared_with"] = _reference_of(m)
            if "_sq_err" in r and "_sq_err" in ref:
                entry["mse_ratio_ci"] = _paired_ratio_ci(r["_sq_err"], ref["_sq_err"])
        out_methods[m] = entry
    block = {"misspecified": None, "reference_policy": None, "methods": out_methods,
             "target": res.get("_target")}
    b = methods.get("base")
    if b and "vrpo_oracle_exact" in methods:
        lim = methods["vrpo_oracle_exact"]["mse"]
        block["limit"] = {
            "method": "vrpo_oracle_exact",
            "mse_reduction": 1.0 - lim / b["mse"],
            "fraction_of_limit": {k: _fraction(b["mse"], methods[m]["mse"], lim)
                                  for k, m in LIMIT_KS.items() if m in methods},
        }
    if b and "vrpo_oracle" in methods:
        block["aux_fraction_of_oracle"] = {m: _fraction(b["mse"], methods[m]["mse"], methods["vrpo_oracle"]["mse"])
                                           for m in ("vrpo_fitted", "vrpo_crossfit", "vrpo_wrong_aux") if m in methods}
    return block


def diagnostic_check(gv: dict, methods: dict) -> dict:
    """Per K: the diagnostic's predictions from one dataset (gradient space at theta = 0, the
    DPO fit and the target; parameter space at the DPO fit) beside the measured ratios
    (gradient variance across datasets at the target; the estimators' MSE ratio)."""
    out = {}
    diag = gv["diagnostic"]
    for k, oracle in LIMIT_KS.items():
        m = methods.get(oracle, {})
        out[k] = {"predicted_gradient": {p: d["predicted_ratio"][k] for p, d in diag.items()},
                  "measured_gradient": gv["measured_ratio"][k],
                  "predicted_mse_fitted": diag["fitted"]["predicted_mse_ratio"][k],
                  "predicted_mse_fitted_sd": diag["fitted"]["predicted_mse_ratio_sd"][k],
                  "measured_variance": m.get("variance_ratio"), "measured_mse": m.get("mse_ratio")}
    cf = gv["diagnostic_crossfit"]["fitted"]
    if "vrpo_crossfit" in methods:
        c = methods["vrpo_crossfit"]
        out["crossfit_8"] = {"predicted_gradient_fitted": cf["predicted_ratio"]["8"],
                             "predicted_mse_fitted": cf["predicted_mse_ratio"]["8"],
                             "predicted_mse_fitted_sd": cf["predicted_mse_ratio_sd"]["8"],
                             "measured_variance": c.get("variance_ratio"), "measured_mse": c.get("mse_ratio")}
    return out


def build_results(cfg: dict, main: dict, one_stage: dict, grad_var: dict, sweep: dict, oracle_k: int,
                  aux_curve: dict | None = None) -> dict:
    from vrpo.simulate.world import make_world

    def settings_of(res_by_setting):
        out = {}
        for name, res in res_by_setting.items():
            world = make_world(name, seed=cfg["seed"])
            block = _setting_block(name, res)
            block["misspecified"] = world.misspecified
            block["reference_policy"] = world.reference_policy
            if name in grad_var:
                block["gradient_variance"] = grad_var[name]
                block["diagnostic_check"] = diagnostic_check(grad_var[name], block["methods"])
            out[name] = block
        return out

    results = {
        "replicates": cfg["replicates"], "n": cfg["n"], "seed": cfg["seed"], "ridge": cfg["ridge"]["linear_bt"],
        "primary_model": "linear_bt", "oracle_k": oracle_k,
        "command": f"vrpo reproduce bandit --replicates {cfg['replicates']} --n {cfg['n']} --seed {cfg['seed']}"
                   + (" --quick" if cfg["quick"] else "")
                   + (f" --ridge {cfg['ridge']['linear_bt']:g}" if cfg["ridge"]["linear_bt"] != 1e-3 else ""),
        "settings": settings_of(main),
        "methods_legend": {m: LEGEND.get(m, m) for m in next(iter(main.values())) if not m.startswith("_")},
    }
    if aux_curve:
        results["aux_learning_curve"] = aux_curve
    if one_stage:
        results["one_stage"] = {"primary_model": "tabular_dpo", "ridge": cfg["ridge"]["tabular_dpo"],
                                "settings": settings_of(one_stage)}
    if sweep:
        results["n_sweep"] = {
            name: {m: {meth: {k: v for k, v in r.items() if not k.startswith("_")}
                       for meth, r in res.items() if not meth.startswith("_")}
                   for m, res in by_n.items()}
            for name, by_n in sweep.items()}
        for name, by_n in results["n_sweep"].items():  # the main run is the sweep's point at --n
            if name in results["settings"]:
                by_n.setdefault(str(cfg["n"]), {m: results["settings"][name]["methods"][m]
                                                for m in next(iter(by_n.values())) if m in results["settings"][name]["methods"]})
    return results


# ------------------------------------------------------------------------------- markdown
def _arrow(ratio, ci=None) -> str:
    """down / up when the paired 95% CI of the ratio excludes 1, '=' otherwise."""
    if ratio is None:
        return ""
    if ci is not None:
        return "↓" if ci[1] < 1 else ("↑" if ci[0] > 1 else "≈")
    return "↓" if ratio < 0.95 else ("↑" if ratio > 1.05 else "≈")


def _fmt(x, nd=4) -> str:
    return "n/a" if x is None else f"{x:.{nd}g}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _target_regret(s: dict, base: str) -> str:
    t = (s.get("target") or {}).get(base)
    return "n/a" if t is None else f"{t['regret']:.4f}"


def _excess(m: dict) -> str:
    """Excess regret with its bootstrap 95% CI over replicates."""
    if "excess_regret" not in m:
        return "n/a"
    lo, hi = m["excess_regret_ci"]
    return f"{m['excess_regret']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def write_markdown(results: dict) -> str:
    S = results["settings"]
    L = [f"# Bandit testbed: {results['replicates']} replicates, n = {results['n']} labelled pairs, seed {results['seed']}",
         "", f"Printed by `{results['command']}`. Primary model: linear Bradley-Terry reward (two-stage); "
         f"VRPO uses the oracle g = p* and K = {results['oracle_k']} reference samples unless a row says otherwise. "
         "Ratios are method / base on the SAME datasets; arrows: ↓/↑ when the paired bootstrap 95% CI of the MSE "
         "ratio excludes 1, ≈ otherwise. Suboptimality = greedy regret in true win rate against pi_ref "
         "(docs/testbed.md).", ""]
    L += ["## Theory table (paper layout): base → VRPO (ratio)", "",
          "Regret is the greedy policy's suboptimality; the target's own regret is that of the population "
          "target itself (a misspecified model's best fit is not the best policy), and excess = regret - target's. "
          "'≠ target' is the share of prompts whose greedy response differs from the target's.", "",
          "| setting | misspecified | pi_ref | variance | MSE | MSE 95% CI (base; VRPO) | target's regret | "
          "excess regret | ≠ target |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        b, v = s["methods"]["base"], s["methods"].get("vrpo_oracle")
        if v is None:
            continue
        arrow = _arrow(v.get("mse_ratio"), v.get("mse_ratio_ci"))
        L.append(f"| {name} | {'yes' if s['misspecified'] else 'no'} | {s['reference_policy']} | "
                 f"{b['variance']:.4f} → {v['variance']:.4f} ({v['variance_ratio']:.2f}) | "
                 f"{b['mse']:.4f} → {v['mse']:.4f} ({v['mse_ratio']:.2f}) {arrow} | "
                 f"[{b['mse_ci'][0]:.4f}, {b['mse_ci'][1]:.4f}]; [{v['mse_ci'][0]:.4f}, {v['mse_ci'][1]:.4f}] | "
                 f"{_target_regret(s, 'sigmoid')} | {_excess(b)} → {_excess(v)} | "
                 f"{_pct(b.get('disagreement'))} → {_pct(v.get('disagreement'))} |")
    L += _targets_table(S)
    L += ["", "## How much of the limit do K reference samples reach? (oracle g, sigmoid)", "",
          "MSE ratio to base for K = 2, 4, 8, 16 and the exact expectation (the limit); then the fraction of the "
          "limit's MSE reduction that each K reaches ((base - K) / (base - limit); — when the limit removes < 3%). "
          + FRACTION_NOTE, "",
          "| setting | K=2 | K=4 | K=8 | K=16 | limit | frac K=2 | frac K=4 | frac K=8 | frac K=16 |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        m = s["methods"]
        if "limit" not in s:
            continue
        ratios = [m[x]["mse_ratio"] for x in ("vrpo_oracle_k2", "vrpo_oracle_k4", "vrpo_oracle", "vrpo_oracle_k16",
                                               "vrpo_oracle_exact")]
        fr = s["limit"]["fraction_of_limit"]
        L.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " | "
                 + " | ".join(_pct(fr.get(k)) for k in ("2", "4", "8", "16")) + " |")
    L += ["", "## Which part helps? Loss, control variate, number of reference pairs", "",
          "MSE ratio is against the base with the SAME loss (ramp rows against ramp-DPO: the two losses have "
          "different population targets, each a converged minimiser); regret compares all rows directly, and "
          "the targets' own regrets are in the second and third columns.", "",
          "| setting | DPO (sigmoid) regret [target's] | ramp-DPO regret [target's] | VRPO sigmoid K=2 | "
          "VRPO sigmoid K=8 | VRPO ramp K=2 | VRPO ramp K=8 | VRPO ramp limit |", "|---|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        m = s["methods"]
        if "ramp_dpo" not in m:
            continue
        cell = lambda k: (f"MSE {m[k]['mse_ratio']:.2f} {_arrow(m[k]['mse_ratio'], m[k].get('mse_ratio_ci'))}; "  # noqa: E731
                          f"regret {m[k]['regret']:.4f}") if k in m else "n/a"
        L.append(f"| {name} | {m['base']['regret']:.4f} [{_target_regret(s, 'sigmoid')}] | "
                 f"{m['ramp_dpo']['regret']:.4f} [{_target_regret(s, 'ramp')}] | {cell('vrpo_oracle_k2')} | "
                 f"{cell('vrpo_oracle')} | {cell('vrpo_ramp_oracle_k2')} | {cell('vrpo_ramp_oracle')} | "
                 f"{cell('vrpo_ramp_oracle_exact')} |")
    L += ["", "## Auxiliary model and other estimators (sigmoid, K = 8; MSE ratio to base, bias², failed fits)", "",
          "'frac of oracle' = (base - method) / (base - oracle VRPO) MSE reduction (— when the oracle gains < 3%). "
          + FRACTION_NOTE, "",
          "cDPO and rDPO estimate shifted targets by design (smoothed / de-flipped labels), so their MSE against the "
          "DPO target is mostly bias; their regret (in brackets, DPO's first) is the fair comparison.", "",
          "| setting | fitted | cross-fitted | frac of oracle (fitted; cross-fitted) | wrong g | est. coef K=8 (mean c) | "
          "est. coef K=2 | cDPO [regret] | rDPO [regret] |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        m = s["methods"]
        c = lambda k: (f"{m[k]['mse_ratio']:.2f} {_arrow(m[k]['mse_ratio'], m[k].get('mse_ratio_ci'))}"  # noqa: E731
                       + (f" ({m[k]['failed_fits']} failed)" if m[k]["failed_fits"] else "")) if k in m else "n/a"
        fo = s.get("aux_fraction_of_oracle", {})
        coef = lambda k: f"{c(k)} (c={m[k]['coef_mean']:.2f})" if k in m and "coef_mean" in m[k] else c(k)  # noqa: E731
        reg = lambda k: f"{c(k)} [{m['base']['regret']:.4f} → {m[k]['regret']:.4f}]" if k in m else "n/a"  # noqa: E731
        L.append(f"| {name} | {c('vrpo_fitted')} | {c('vrpo_crossfit')} | {_pct(fo.get('vrpo_fitted'))}; "
                 f"{_pct(fo.get('vrpo_crossfit'))} | {c('vrpo_wrong_aux')} | {coef('vrpo_oracle_optc')} | "
                 f"{coef('vrpo_oracle_k2_optc')} | {reg('cdpo')} | {reg('rdpo')} |")
    if results.get("aux_learning_curve"):
        L += _aux_curve_table(results["aux_learning_curve"])
    if any("diagnostic_check" in s for s in S.values()):
        L += _diagnostic_table(S)
    if "one_stage" in results:
        L += ["", "## One-stage: tabular softmax policy trained with DPO (beta = 1); MSE ratio to DPO, regret", "",
              "| setting | DPO MSE | VRPO K=2 | VRPO K=8 | VRPO limit | VRPO cross-fitted g K=8 | DPO regret | VRPO K=8 regret |",
              "|---|---|---|---|---|---|---|---|"]
        for name, s in results["one_stage"]["settings"].items():
            m = s["methods"]
            c = lambda k: f"{m[k]['mse_ratio']:.2f} {_arrow(m[k]['mse_ratio'], m[k].get('mse_ratio_ci'))}" if k in m else "n/a"  # noqa: E731
            L.append(f"| {name} | {m['base']['mse']:.4f} | {c('vrpo_oracle_k2')} | {c('vrpo_oracle')} | "
                     f"{c('vrpo_oracle_exact')} | {c('vrpo_crossfit')} | {m['base']['regret']:.4f} | "
                     f"{m['vrpo_oracle']['regret']:.4f} |")
    failures = "; ".join(f"{name}: " + ", ".join(f"{k} {v['failed_fits']}" for k, v in s["methods"].items() if v["failed_fits"])
                         for name, s in S.items() if any(v["failed_fits"] for v in s["methods"].values()))
    L += ["", f"Failed fits (not converged, non-finite or diverged), of {results['replicates']} per method: "
          + (failures or "none"), ""]
    return "\n".join(L)


def _diagnostic_table(S: dict) -> list[str]:
    datasets = next((s["gradient_variance"]["diagnostic"]["fitted"]["datasets"] for s in S.values()
                     if "diagnostic_check" in s), 0)
    L = ["", "## Does the variance diagnostic predict what VRPO does? (oracle g, sigmoid)", "",
         "`vrpo.diagnostics.variance_decomposition` on ONE dataset, fed the per-example gradients of the actual "
         "loss at theta = 0 (every margin 0: the start of training), at the DPO fit of that dataset, and at the "
         f"population target; each prediction is the mean of the one-dataset predictions on {datasets} datasets "
         "(± their sd: how far one dataset's prediction strays). Gradient space: predicted Var(VRPO score) / "
         "Var(base score), beside the variance ratio of the mean gradient at the target measured across the "
         "datasets. Parameter space: the scores mapped through the inverse Hessians of the base and VRPO "
         "objectives at the DPO fit (the first-order variance of the fitted parameter), beside the estimators' "
         "measured variance and MSE ratios.", "",
         "| setting | K | pred. θ=0 | pred. DPO fit | pred. target | measured (gradient) | pred. parameter variance, "
         "DPO fit | measured variance | measured MSE |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        dc = s.get("diagnostic_check")
        if not dc:
            continue
        for k in ("2", "4", "8", "16"):
            c = dc[k]
            pg = c["predicted_gradient"]
            L.append(f"| {name} | {k} | {_fmt2(pg.get('reference'))} | {_fmt2(pg.get('fitted'))} | "
                     f"{_fmt2(pg.get('target'))} | {c['measured_gradient']:.2f} | {c['predicted_mse_fitted']:.2f} ± "
                     f"{c['predicted_mse_fitted_sd']:.2f} | {_fmt2(c['measured_variance'])} | {_fmt2(c['measured_mse'])} |")
    L += _shares_table(S)
    L += ["", "With the cross-fitted g (what a user has), K = 8, at the DPO fit:", "",
          "| setting | pred. gradient | pred. parameter variance | measured variance (vrpo_crossfit) | "
          "measured MSE |", "|---|---|---|---|---|"]
    for name, s in S.items():
        c = (s.get("diagnostic_check") or {}).get("crossfit_8")
        if c:
            L.append(f"| {name} | {c['predicted_gradient_fitted']:.2f} | {c['predicted_mse_fitted']:.2f} ± "
                     f"{c['predicted_mse_fitted_sd']:.2f} | {_fmt2(c['measured_variance'])} | {_fmt2(c['measured_mse'])} |")
    return L


def _shares_table(S: dict) -> list[str]:
    """Where the base gradient's variance is, as the diagnostic sees it at each point (oracle g)."""
    where = (("reference", "θ=0"), ("fitted", "DPO fit"), ("target", "target"))
    L = ["", "Shares of the base gradient's variance, label noise / pair variance, as the diagnostic estimates "
         "them at each point (mean over the same datasets; 'between' prompts is the rest). The two are estimated "
         "separately, so on one dataset they can add up to a little more than 100%. Only the pair share is "
         "removable.", "",
         "| setting | " + " | ".join(f"{label}: label noise / pair" for _, label in where) + " |",
         "|---|" + "---|" * len(where)]
    for name, s in S.items():
        d = (s.get("gradient_variance") or {}).get("diagnostic")
        if d and "diagnostic_check" in s:
            L.append(f"| {name} | " + " | ".join(f"{_pct(d[w]['label_noise_share'])} / {_pct(d[w]['pair_share'])}"
                                                 if w in d else "n/a" for w, _ in where) + " |")
    return L


def _aux_curve_table(curves: dict) -> list[str]:
    L = ["", "## What it takes for a fitted g: labels of its own (sigmoid, K = 8)", "",
         "The flexible g trained on m labels of its own (a separate preference set from the same world), beside "
         "the cross-fitted g on the n labels VRPO trains on; MSE ratio to DPO, the fraction of the oracle's MSE cut, "
         "and the rms of g - p* over reference pairs.", "",
         "| setting | oracle | cross-fitted g (n labels) | " + " | ".join(
             f"g on {v['labels']} labels" for v in next(iter(curves.values()))["own_labels"].values()) + " |",
         "|---|---|---|" + "---|" * len(next(iter(curves.values()))["own_labels"])]
    for name, c in curves.items():
        cf = c["crossfit"]
        L.append(f"| {name} | {c['oracle_mse_ratio']:.2f} | {cf['mse_ratio']:.2f} ({_pct(cf['fraction_of_oracle'])}) | "
                 + " | ".join(f"{v['mse_ratio']:.2f} ({_pct(v['fraction_of_oracle'])}; rms {v['g_rms_error']:.3f})"
                              for v in c["own_labels"].values()) + " |")
    return L


def _targets_table(S: dict) -> list[str]:
    """The population targets of each base loss: exact sums, minimised to convergence."""
    L = ["", "## Population targets (exact sums over the world, minimised to convergence)", "",
         f"Converged: sigmoid by Newton to a decrement < {NEWTON_TOL:g}; ramp by Newton along the smoothing path "
         f"tau = {', '.join(f'{t:g}' for t in SMOOTHING_PATH)} (each relu smoothed to tau softplus(u / tau)), the "
         f"last stage to a decrement < {NEWTON_TOL:g}. Objective = mean loss + ridge.", "",
         "| setting | sigmoid target theta | objective | regret | ramp target theta | objective | regret |",
         "|---|---|---|---|---|---|---|"]
    for name, s in S.items():
        t = s.get("target") or {}
        cell = lambda b: (f"({', '.join(f'{x:.3f}' for x in t[b]['theta'])}) | {t[b].get('objective', float('nan')):.4f} | "  # noqa: E731
                          f"{t[b]['regret']:.4f}") if b in t else "n/a | n/a | n/a"
        L.append(f"| {name} | {cell('sigmoid')} | {cell('ramp')} |")
    return L


def _fmt2(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# ------------------------------------------------------------------------------- plots
def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    S = results["settings"]
    ks = [("2", "vrpo_oracle_k2"), ("4", "vrpo_oracle_k4"), ("8", "vrpo_oracle"), ("16", "vrpo_oracle_k16"),
          ("exact", "vrpo_oracle_exact")]
    for metric, fname in (("mse", "mse_vs_k.png"), ("regret", "regret_vs_k.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, s in S.items():
            m = s["methods"]
            if not all(k in m for _, k in ks):
                continue
            ys = [m[k][metric] / m["base"][metric] if m["base"][metric] > 0 else np.nan for _, k in ks]
            ax.plot(range(len(ks)), ys, marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_xticks(range(len(ks)), [k for k, _ in ks])
        ax.set_xlabel("K reference samples (oracle g, sigmoid)")
        ax.set_ylabel(f"{metric} / base {metric}")
        ax.set_title(f"VRPO {metric} against K (n = {results['n']}, {results['replicates']} replicates)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    sweep = results.get("n_sweep")
    if sweep:
        for metric, fname in (("mse", "mse_vs_n.png"), ("regret", "regret_vs_n.png")):
            fig, axes = plt.subplots(1, len(sweep), figsize=(4.2 * len(sweep), 3.6), squeeze=False)
            for ax, (name, by_n) in zip(axes[0], sweep.items()):
                ns = sorted(by_n, key=int)
                for meth in next(iter(by_n.values())):
                    ax.plot([int(x) for x in ns], [by_n[x][meth][metric] for x in ns], marker="o", label=meth)
                ax.set_xscale("log")
                ax.set_yscale("log" if metric == "mse" else "linear")
                ax.set_title(name)
                ax.set_xlabel("n labelled pairs")
                ax.set_ylabel(metric)
            axes[0][0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            paths.append(out / fname)
    return paths


__all__ = ["build_results", "write_markdown", "write_plots", "PREFERENCE_KINDS"]
