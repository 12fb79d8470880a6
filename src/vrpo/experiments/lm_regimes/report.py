"""``results.md`` and ``predicted_vs_measured.png`` of ``vrpo reproduce lm-regimes``."""
from __future__ import annotations

from pathlib import Path

from vrpo.experiments.lm_regimes.presets import KS

TOLERANCE = 0.15  # the prediction is "right" when |predicted - measured| <= this at K = 8


def _num(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _ratios(d: dict, ci: dict | None = None) -> str:
    cells = []
    for k in map(str, KS):
        if k not in d:
            cells.append("–")
        elif ci and k in ci:
            cells.append(f"{d[k]:.2f} [{ci[k][0]:.2f}, {ci[k][1]:.2f}]")
        else:
            cells.append(f"{d[k]:.2f}")
    return " | ".join(cells)


def regime_table(results: dict) -> list[str]:
    ks = " | ".join(f"K={k}" for k in KS)
    lines = [f"| regime | checkpoint | label noise | pair | between | 4p*(1-p*) | predicted {ks} | measured {ks} | K=8 within {TOLERANCE} |",
             "|---|---|---|---|---|---|" + "---|" * (2 * len(KS)) + "---|"]
    for name, r in results["regimes"].items():
        for key, entry in r["by_checkpoint"].items():
            d, m = entry["diagnostic"], entry["measurement"]
            ok = abs(d["predicted_ratio"]["8"] - m["measured_ratio"]["8"]) <= TOLERANCE if "8" in m["measured_ratio"] else None
            lines.append(f"| {name} | {key} | {d['label_noise_share']:.0%} | {d['pair_share']:.0%} | {d['between_share']:.0%} "
                         f"| {r['label_stats']['mean_4p1mp']:.2f} | {_ratios(d['predicted_ratio'])} "
                         f"| {_ratios(m['measured_ratio'], m['ci'])} | {'–' if ok is None else ('yes' if ok else 'NO')} |")
    return lines


def secondary_table(results: dict) -> list[str]:
    """The same measured truth beside the other predictors: the fitted g and the n-gram proxy."""
    lines = ["| regime | measured K=8 | measured K=8, one realised label per pair | predicted, oracle g | "
             "predicted, cross-fitted g | n-gram proxy at margin 0 | "
             f"measured over datasets of {_batch(results)} (K=8) |", "|---|---|---|---|---|---|---|"]
    for name, r in results["regimes"].items():
        entry = r["by_checkpoint"][r["checkpoint"]]
        fitted = entry.get("diagnostic_fitted_g", {}).get("predicted_ratio", {}).get("8")
        mini = entry["measurement"]["minibatch_ratio"].get("8")
        realised = entry["measurement"].get("realised_labels_ratio", {}).get("8")
        spread = entry["measurement"].get("realised_labels_spread", {}).get("8")
        realised = None if realised is None else (f"{realised:.2f}" + (
            "" if spread is None else f" (any one draw: sd {spread['sd']:.2f}, 95% {spread['range'][0]:.2f}-{spread['range'][1]:.2f})"))
        lines.append(f"| {name} | {_num(r['measured_ratio'].get('8'))} | {realised or '–'} | {r['predicted_ratio']['8']:.2f} | "
                     f"{'–' if fitted is None else f'{fitted:.2f}'} | {r['ngram_proxy']['8']:.2f} | "
                     f"{'–' if mini is None else f'{mini:.2f}'} ({entry['measurement']['datasets']} datasets) |")
    return lines


def in_sample_table(results: dict) -> list[str]:
    """The pitfall: the diagnostic on the checkpoint's own training pairs, beside the held-out one."""
    rows = [(n, r) for n, r in results["regimes"].items() if "in_sample" in r]
    if not rows:
        return []
    lines = ["| regime | measured K=8 | predicted K=8, held-out rows | predicted K=8, the checkpoint's own training rows "
             "| pair share, held-out / own rows |", "|---|---|---|---|---|"]
    for name, r in rows:
        held, own = r["by_checkpoint"]["dpo"]["diagnostic"], r["in_sample"]
        lines.append(f"| {name} | {_num(r['measured_ratio'].get('8'))} | {held['predicted_ratio']['8']:.2f} | "
                     f"{own['predicted_ratio']['8']:.2f} | {held['pair_share']:.0%} / {own['pair_share']:.0%} |")
    return lines + [""]


def _batch(results: dict) -> int:
    r = next(iter(results["regimes"].values()))
    return r["by_checkpoint"][r["checkpoint"]]["measurement"]["batch"]


def training_section(name: str, t: dict) -> list[str]:
    lines = [f"### {name}: DPO vs VRPO (sigmoid, K = {t['num_ref_samples']}), {len(t['seeds'])} seeds", "",
             "| method | " + " | ".join(k for k in next(iter(t["table"].values())) if k != "seeds") + " |"]
    cols = [k for k in next(iter(t["table"].values())) if k != "seeds"]
    lines.append("|---|" + "---|" * len(cols))
    for method, row in t["table"].items():
        lines.append(f"| {method} | " + " | ".join(f"{row[c]['mean']:.3f} ± {row[c]['sd']:.3f}" for c in cols) + " |")
    for pair, per in t["paired"].items():
        lines += ["", f"{pair}, paired by seed and prompt (95% CI: seeds and prompts resampled):", "",
                  "| metric | difference [95% CI] |", "|---|---|"]
        for metric, v in per.items():
            mark = " *" if v["ci"][0] > 0 or v["ci"][1] < 0 else ""
            lines.append(f"| {metric} | {v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]{mark} |")
    return lines + [""]


def results_markdown(results: dict) -> str:
    lines = [f"# Where VRPO helps on a language model (`{results['command']}`)", "",
             "Variance of the per-example loss gradient at the checkpoint (seed 0's DPO run unless the row says "
             "pi_ref), in a fixed count sketch of all trainable parameters. *predicted*: `vrpo diagnose --model` from "
             "ONE dataset the checkpoint never saw (labelled pairs and their reference samples on held-out prompts, g = p*), before any "
             "VRPO training. "
             "*measured*: Var(VRPO_K gradient) / Var(DPO gradient) over fresh examples (fresh pairs from pi_ref, fresh "
             "labels from the reviewer, fresh reference samples; g = p*), in expectation over each pair's label "
             "(Bernoulli(p*), computed exactly: one realised label per pair adds a coin flip's noise, shown beside "
             "it in the second table), 95% bootstrap CI over examples. "
             "4p*(1-p*): mean over fresh pairs; 1 = every label a coin flip, 0 = every label decided by the pair.", ""]
    lines += regime_table(results) + [""] + secondary_table(results) + [""] + in_sample_table(results)
    for name in results.get("training_regimes", []):
        lines += training_section(name, results["regimes"][name]["training"])
    lines.append(f"Wall time {results['seconds']:.0f} s, CPU time {results['cpu_seconds']:.0f} s "
                 "(of this invocation; finished stages are reused on a rerun).")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Predicted vs measured VRPO/DPO variance ratio, every regime and K, with the +-0.15 band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1.3], [0, 1.3], color="grey", lw=1)
    ax.fill_between([0, 1.3], [-TOLERANCE, 1.3 - TOLERANCE], [TOLERANCE, 1.3 + TOLERANCE], color="grey", alpha=0.15)
    markers = {"2": "o", "4": "s", "8": "D", "16": "^"}
    for i, (name, r) in enumerate(results["regimes"].items()):
        for key, entry in r["by_checkpoint"].items():
            meas, ci = entry["measurement"]["measured_ratio"], entry["measurement"]["ci"]
            labelled = False  # one legend entry per (regime, checkpoint), on its first K measured
            for k, marker in markers.items():
                if k in meas:
                    pred = entry["diagnostic"]["predicted_ratio"][k]
                    ax.errorbar(pred, meas[k], yerr=[[meas[k] - ci[k][0]], [ci[k][1] - meas[k]]], fmt=marker,
                                color=f"C{i}", mfc="none" if key == "pi_ref" else f"C{i}", ms=6,
                                label=None if labelled else f"{name} ({key})")
                    labelled = True
    ax.set_xlabel("predicted Var(VRPO) / Var(DPO), one dataset")
    ax.set_ylabel("measured over fresh datasets")
    ax.set_xlim(0, 1.15)
    ax.set_ylim(0, 1.3)
    ax.set_title("marker = K (circle 2, square 4, diamond 8, triangle 16)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
