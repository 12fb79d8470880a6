"""results.json, results.md (slice tables + gate verdicts) and plots of the scheduling run."""
from __future__ import annotations

from pathlib import Path

from vrpo.experiments.scheduling.evaluation import ALL

# Rubrics shown in the Markdown table (all are in results.json).
SHOWN_RUBRICS = ("escalation", "no_false_alarm", "offers_time", "no_advice", "refers", "brief", "polite")


def _ci(w: dict) -> str:
    return f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]"


def _slices(results: dict) -> list[str]:
    first = next(iter(results["win_rates"].values()))
    return [s for s in first if s != ALL] + [ALL]


def win_table(results: dict) -> list[str]:
    comparisons = list(results["win_rates"])
    lines = ["| slice | n | " + " | ".join(c.replace("_vs_", " vs ") for c in comparisons) + " |",
             "|---|---|" + "---|" * len(comparisons)]
    for s in _slices(results):
        n = results["win_rates"][comparisons[0]][s]["n"]
        lines.append(f"| {s} | {n} | " + " | ".join(_ci(results["win_rates"][c][s]) for c in comparisons) + " |")
    return lines


def rubric_table(results: dict) -> list[str]:
    policies = list(results["rubrics"])
    lines = ["| slice | rubric | " + " | ".join(policies) + " |", "|---|---|" + "---|" * len(policies)]
    for s in _slices(results):
        for rubric in SHOWN_RUBRICS:
            values = [results["rubrics"][p].get(s, {}).get(rubric) for p in policies]
            if values[0] is not None:
                lines.append(f"| {s} | {rubric} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def calibration_table(results: dict) -> list[str]:
    cal = results.get("aux_calibration") or {}
    if not cal:
        return ["(no out-of-fold predictions found)"]
    lines = ["| slice | n | mean g | mean p* | mean abs(g - p*) | Brier (g) | Brier (oracle p*) | ECE (g) |",
             "|---|---|---|---|---|---|---|---|"]
    for s, c in cal.items():
        lines.append(f"| {s} | {c['n']} | {c['mean_g']:.3f} | {c['mean_p_star']:.3f} | {c['mae_to_p_star']:.3f} | "
                     f"{c['brier']:.3f} | {c['oracle_brier']:.3f} | {c['ece']:.3f} |")
    return lines


def gate_lines(results: dict) -> list[str]:
    lines = []
    for method, g in results["gates"].items():
        verdict = "PASS" if g["passed"] else "FAIL"
        lines.append(f"- **{method} vs pi_ref: {verdict}**" + ("" if g["passed"] else ": " + "; ".join(
            f"{r['slice']} {r['metric']}: {r['reason']}" for r in g["failed"])))
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    a = results["audit"]
    lines = [
        f"# Scheduling assistant: DPO vs VRPO by slice (preset `{s['preset']}`)", "",
        f"pi_ref: `{results['model']}` (SmolLM2-135M-Instruct + the clinic's system prompt unless overridden); "
        f"{results['labelled_pairs']} labelled pairs, K = {s['num_ref_samples']} reference samples per prompt, "
        f"LoRA r = {s['lora_r']}, {s['max_steps']} steps of batch {s['batch_size']} for every method, "
        f"{results['eval_prompts']} held-out prompts answered greedily; seed {results['seed']}; "
        f"{results.get('seconds', 0):.0f} s.", "",
        "Command: `vrpo reproduce scheduling --preset " + s["preset"] + "`", "",
        f"## Deployment gate (max regression {results['max_regression']:g} per slice)", "", *gate_lines(results), "",
        "## Win rate under the panel's p* (mean over prompts of p*(x, y_policy, y_other), 95% bootstrap CI)", "",
        *win_table(results), "",
        "## Rubric pass rates by slice", "", *rubric_table(results), "",
        "## Auxiliary model (GPM on MiniLM, out-of-fold) by slice, on the labelled pairs", "",
        *calibration_table(results), "",
        "## Audit: do the most disputed labels find the truly noisy ones?", "",
        f"Top {a['top_n']} pairs by disagreement: {a['against_majority_top']:.2f} are against the panel's majority "
        f"(all pairs: {a['against_majority_all']:.2f}); {a['fatigued_top']:.2f} came from a fatigued reviewer "
        f"(all pairs: {a['fatigued_all']:.2f}). A label against the majority from an alert reviewer is a minority "
        "view, not an error: the panel's groups disagree for good reasons.", "",
    ]
    if results.get("step_seconds"):
        lines += ["Wall time of the steps run this time (s): " + ", ".join(
            f"`{k}` {v:.0f}" for k, v in results["step_seconds"].items()), ""]
    if s["preset"] == "quick":
        lines += ["*Quick preset: a handful of prompts and two LoRA steps, to show the workflow end to end. "
                  "Its numbers are not evidence either way; use `--preset full`.*", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    slices = _slices(results)
    comparisons = [c for c in results["win_rates"] if c.endswith("_vs_pi_ref")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(comparisons))
    for i, c in enumerate(comparisons):
        w = [results["win_rates"][c][s] for s in slices]
        mid = np.array([x["win_rate"] for x in w])
        err = np.array([[m - x["ci_low"] for m, x in zip(mid, w)], [x["ci_high"] - m for m, x in zip(mid, w)]])
        ax.bar(np.arange(len(slices)) + i * width, mid, width, yerr=err, capsize=3, label=c.replace("_vs_", " vs "))
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(np.arange(len(slices)) + width * (len(comparisons) - 1) / 2, slices, rotation=30, ha="right")
    ax.set_ylabel("win rate under p*")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=120)
    plt.close(fig)

    policies = list(results["rubrics"])
    rubrics = [r for r in SHOWN_RUBRICS if r in results["rubrics"][policies[0]][ALL]]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(policies)
    for i, p in enumerate(policies):
        ax.bar(np.arange(len(rubrics)) + i * width, [results["rubrics"][p][ALL][r] for r in rubrics], width, label=p)
    ax.set_xticks(np.arange(len(rubrics)) + width * (len(policies) - 1) / 2, rubrics, rotation=30, ha="right")
    ax.set_ylabel("pass rate (all held-out prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rubrics.png", dpi=120)
    plt.close(fig)


def write_report(out: Path, results: dict) -> None:
    from vrpo.provenance import atomic_write_json, atomic_write_text, package_versions

    results = dict(results, versions=package_versions())
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    plot(results, out)
