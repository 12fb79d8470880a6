"""From per-(method, seed) results to ``results.json``, ``results.md`` and the plots.

The table follows the paper's layout (average gold score per sampling temperature), each
cell ``mean +- sd over seeds``, the paper's number beside ours where the paper has the row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vrpo.experiments.imdb.methods import HEADLINE, METHODS

# The paper's IMDb table (read off the poster, +-0.005; docs/method.md), T = 0, .25, .5, .75, 1
PAPER_IMDB = {
    "DPO": (0.804, 0.811, 0.820, 0.807, 0.763),
    "VRPO (correct, oracle)": (0.952, 0.955, 0.960, 0.958, 0.934),
    "VRPO (correct, estimated)": (0.935, 0.949, 0.965, 0.960, 0.930),
    "VRPO (correct, misspecified)": (0.916, 0.933, 0.956, 0.952, 0.920),
    "VRPO (misspecified, oracle)": (0.827, 0.825, 0.834, 0.827, 0.797),
    "VRPO (misspecified, misspecified)": (0.769, 0.774, 0.791, 0.814, 0.805),
}
PAPER_TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)
SECTIONS = (("main", "Main rows (the paper's table)"), ("baseline", "Baselines"),
            ("ablation", "Ablations: loss vs control variate vs number of reference pairs"))

# paired comparisons reported where both rows ran: the paper's headline against DPO and SFT,
# then like for like (same base loss on both sides, so the difference is the control
# variate alone): sigmoid VRPO vs DPO, ramp VRPO vs ramp-DPO
COMPARISONS = ((HEADLINE, "dpo"), (HEADLINE, "sft"), ("dpo", "sft"), ("vrpo-sigmoid-k4-correct-oracle", "dpo"),
               ("vrpo-sigmoid-k2-correct-oracle", "dpo"), (HEADLINE, "ramp-dpo"))


def summarize(results: dict, temperatures, n_boot: int = 2000) -> dict:
    """Means +- sd over seeds, paired differences and win rates with 95% CIs, shape checks."""
    from vrpo.evaluate import mean_sd, paired_win_rate, seed_prompt_bootstrap_ci

    temps = [str(float(t)) for t in temperatures]
    table = {}
    for m, by_seed in results.items():
        seeds = sorted(by_seed)
        row = {t: mean_sd([by_seed[s]["mean_score"][t] for s in seeds]) for t in temps}
        row["kl"] = mean_sd([by_seed[s]["kl"] for s in seeds])
        row["avg"] = mean_sd([np.mean([by_seed[s]["mean_score"][t] for t in temps]) for s in seeds])
        table[m] = {k: {"mean": v[0], "sd": v[1]} for k, v in row.items()} | {"seeds": len(seeds)}

    def scores(m, t):
        return np.array([results[m][s]["scores"][t] for s in sorted(results[m])])

    comparisons = {}
    for a, b in COMPARISONS:
        if a in results and b in results and sorted(results[a]) == sorted(results[b]):
            per_t = {}
            for t in temps:
                diff = scores(a, t) - scores(b, t)
                lo, hi = seed_prompt_bootstrap_ci(diff, np.mean, n_boot=n_boot)
                per_t[t] = {"score_diff": float(diff.mean()), "diff_ci": [lo, hi],
                            **paired_win_rate(scores(a, t), scores(b, t), n_boot=n_boot)}
            comparisons[f"{a} vs {b}"] = per_t
    return {"table": table, "comparisons": comparisons, "shape": shape_checks(table, comparisons, temps)}


def shape_checks(table: dict, comparisons: dict, temps: list[str]) -> dict:
    """The paper's shape, checked on our numbers (True/False/None when a row is missing)."""
    def avg(m):
        return table[m]["avg"]["mean"] if m in table else None

    head = comparisons.get(f"{HEADLINE} vs dpo")
    o, f, mis = (avg(f"vrpo-ramp-k4-correct-{a}") for a in ("oracle", "fitted", "misspecified"))
    d, mo = avg("dpo"), avg("vrpo-ramp-k4-misspecified-oracle")
    return {
        "vrpo_oracle_above_dpo_every_temperature_ci_excludes_zero":
            None if head is None else all(head[t]["diff_ci"][0] > 0 for t in temps),
        "oracle_ge_fitted_ge_misspecified": None if None in (o, f, mis) else bool(o >= f >= mis),
        "smaller_gain_with_misspecified_pi_ref": None if None in (o, d, mo) else bool(mo - d < o - d),
    }


def _cell(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"


def results_markdown(summary: dict, temperatures, command: str, meta: dict) -> str:
    temps = [str(float(t)) for t in temperatures]
    head = "| method (pi_ref, aux) | " + " | ".join(f"T={float(t):g}" for t in temperatures) + \
        " | KL(pi‖pi_ref) | paper (T=" + "/".join(f"{t:g}" for t in PAPER_TEMPERATURES) + ") |"
    rule = "|" + "---|" * (len(temps) + 3)
    lines = [f"# IMDb: average gold score vs sampling temperature ({meta['preset']} preset)", "",
             f"Command: `{command}`", "",
             f"Each cell: mean ± sd over {meta['num_seeds']} seeds of the gold reward's P(positive) of "
             f"prompt + continuation, averaged over {meta['num_eval_prompts']} held-out prompts. "
             "Paper numbers (GPT-2 scale; docs/method.md) are for the shape, not the level.", ""]
    table = summary["table"]
    for group, title in SECTIONS:
        rows = [m for m in table if m in METHODS and METHODS[m].group == group] + \
            [m for m in table if m not in METHODS and group == "main"]
        if not rows:
            continue
        lines += [f"## {title}", "", head, rule]
        for m in rows:
            spec = METHODS.get(m.split("@")[0])
            label = spec.at_beta(float(m.split("=")[1])).label if "@" in m else spec.label
            paper = PAPER_IMDB.get(spec.paper_row) if spec.paper_row and "@" not in m else None
            paper_txt = " / ".join(f"{v:.3f}" for v in paper) if paper else "–"
            lines.append(f"| {label} | " + " | ".join(_cell(table[m][t]) for t in temps) +
                         f" | {table[m]['kl']['mean']:.2f} | {paper_txt} |")
        lines.append("")
    for name, per_t in summary["comparisons"].items():
        a, b = name.split(" vs ")
        lines += [f"## {METHODS[a].label} vs {METHODS[b].label} (paired by prompt, 95% bootstrap CI over seeds and prompts)",
                  "", "| T | score difference [95% CI] | win rate [95% CI] |", "|---|---|---|"]
        for t in temps:
            c = per_t[t]
            lines.append(f"| {float(t):g} | {c['score_diff']:+.3f} [{c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f}] | "
                         f"{c['win_rate']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] |")
        lines.append("")
    lines += ["## The paper's shape, checked on these numbers", ""]
    lines += [f"- {k.replace('_', ' ')}: **{v}**" for k, v in summary["shape"].items()]
    lines.append("")
    return "\n".join(lines)


def frontier_points(summary: dict, temperature: str) -> dict:
    """``{method: [(mean KL, mean score), ...]}`` sorted by KL, for methods run at several
    betas (rows ``NAME`` and ``NAME@beta=B``): the reward-vs-KL frontier."""
    by_base: dict = {}
    for m, row in summary["table"].items():
        by_base.setdefault(m.split("@")[0], []).append((row["kl"]["mean"], row[temperature]["mean"]))
    return {m: sorted(p) for m, p in by_base.items() if len(p) > 1}


def plot(summary: dict, results: dict, temperatures, out: Path) -> list[Path]:
    """score_vs_temperature.png (main rows) and score_vs_kl.png (every run, T = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, temps = summary["table"], [str(float(t)) for t in temperatures]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in table:
        if "@" in m or m not in METHODS or METHODS[m].group == "ablation":
            continue
        ax.errorbar([float(t) for t in temps], [table[m][t]["mean"] for t in temps],
                    yerr=[table[m][t]["sd"] for t in temps], label=METHODS[m].label, marker="o", capsize=3)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("average gold score")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(out / "score_vs_temperature.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors, markers = plt.get_cmap("tab20").colors, "osD^vPX*<>"
    for i, (m, by_seed) in enumerate(results.items()):  # one colour + marker per method (20 x 10 distinct)
        xs = [by_seed[s]["kl"] for s in sorted(by_seed)]
        ys = [by_seed[s]["mean_score"]["1.0"] for s in sorted(by_seed)] if "1.0" in temps else \
            [by_seed[s]["mean_score"][temps[-1]] for s in sorted(by_seed)]
        ax.scatter(xs, ys, s=20, color=colors[i % 20], marker=markers[i % len(markers)], label=m)
    for base, points in frontier_points(summary, temps[-1]).items():
        ax.plot([k for k, _ in points], [v for _, v in points], "-", alpha=0.6, label=f"{base}: frontier over beta")
    ax.set_xlabel("KL(pi || pi_ref) (nats per response, from T=1 samples)")
    ax.set_ylabel(f"gold score at T={float(temps[-1]):g}")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    paths.append(out / "score_vs_kl.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
