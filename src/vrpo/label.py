"""``vrpo label``: a simulated reviewer panel labels pairs of reference samples.

Takes the first two samples of each prompt in a ``vrpo sample`` folder (two responses
drawn from pi_ref: the labelled pair the estimator assumes, docs/method.md) and asks the
panel (``PANELS``) which one it prefers. One reviewer labels each pair: a group drawn by its share, who may be
fatigued (a coin flip), so the label's expectation is the panel's p*.

Output ``OUT/pairs.jsonl``: ``prompt_id``, ``prompt``, ``chosen``, ``rejected``, ``slice``,
``p_star`` (= p*(x, chosen, rejected): the truth, for evaluation only, never for training),
``reviewer_group``, ``fatigued``; and ``OUT/manifest.json``: the panel, the seed and the
samples' manifest (which checkpoint and settings produced the candidates the labels judge). Pairs whose two responses are
identical or empty carry no preference and are dropped (counted in the manifest).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PAIRS_FILE = "pairs.jsonl"
# name -> "module:attribute" of a panel object with .label(prompts, a, b, random_state),
# .preference_prob(prompts, a, b) (p*), .slices(prompts), .fatigue and .groups.
PANELS: dict[str, str] = {
    "scheduling": "vrpo.experiments.scheduling.panel:DEFAULT_PANEL",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import SEED, add_overwrite_flag

    parser.add_argument("--samples", required=True, help="a `vrpo sample` folder with at least 2 samples per prompt")
    parser.add_argument("--out", required=True, help="output folder (pairs.jsonl + manifest.json)")
    parser.add_argument("--panel", default="scheduling", choices=sorted(PANELS), help="the reviewer panel")
    parser.add_argument("--seed", type=SEED, default=0, help="draws the reviewer of each pair and their choice")
    add_overwrite_flag(parser)


def run(args: argparse.Namespace) -> int:
    from vrpo.outputs import claim_output
    from vrpo.provenance import atomic_write_text, now_utc, read_manifest, write_manifest
    from vrpo.sampling import read_samples, samples_fingerprint

    samples_dir = Path(args.samples)
    out = claim_output(args.out, "label", {"samples": samples_fingerprint(samples_dir), "panel": args.panel,
                                           "seed": args.seed}, overwrite=args.overwrite)
    panel = load_panel(args.panel)
    rows, dropped = candidate_pairs(read_samples(samples_dir), str(samples_dir))
    if not rows:
        raise ValueError(f"--samples {samples_dir}: no prompt has two distinct non-empty samples to label")
    pairs = label_pairs(panel, rows, args.seed)
    atomic_write_text(out / PAIRS_FILE, "".join(json.dumps(r) + "\n" for r in pairs))
    summary = noise_summary(pairs)
    write_manifest(out, {"kind": "labelled_pairs", "panel": args.panel, "fatigue": panel.fatigue,
                         "groups": {k: vars(g) for k, g in panel.groups.items()}, "seed": args.seed,
                         "pairs": len(pairs), "dropped_identical_or_empty": dropped, "by_slice": summary,
                         "samples": str(samples_dir), "samples_manifest": read_manifest(samples_dir), "time": now_utc()})
    print(f"labelled {len(pairs)} pairs ({dropped} dropped: identical or empty) -> {out / PAIRS_FILE}")
    for name, s in summary.items():
        print(f"  {name:20s} n={s['n']:4d}  label against p* majority: {s['against_majority']:.2f}  fatigued: {s['fatigued']:.2f}")
    return 0


def load_panel(name: str):
    import importlib

    if name not in PANELS:
        raise ValueError(f"--panel {name}: unknown; expected one of {sorted(PANELS)}")
    module, attr = PANELS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def candidate_pairs(sample_rows: list[dict], source: str) -> tuple[list[dict], int]:
    """(prompt, a, b) from the first two samples of each prompt; the number dropped."""
    rows, dropped = [], 0
    for i, row in enumerate(sample_rows):
        samples = list(row["samples"])
        if len(samples) < 2:
            raise ValueError(f"{source}: prompt {row['prompt_id']!r} (row {i}) has {len(samples)} sample(s); expected >= 2")
        a, b = samples[0], samples[1]
        if a == b or not a.strip() or not b.strip():
            dropped += 1
            continue
        rows.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "a": a, "b": b})
    return rows, dropped


def label_pairs(panel, rows: list[dict], seed: int) -> list[dict]:
    prompts, a, b = [r["prompt"] for r in rows], [r["a"] for r in rows], [r["b"] for r in rows]
    drawn = panel.label(prompts, a, b, random_state=seed)
    p_star = panel.preference_prob(prompts, a, b)
    slices = panel.slices(prompts)
    out = []
    for i, r in enumerate(rows):
        a_won = bool(drawn["label"][i])
        out.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                    "chosen": r["a"] if a_won else r["b"], "rejected": r["b"] if a_won else r["a"],
                    "slice": slices[i], "p_star": float(p_star[i] if a_won else 1.0 - p_star[i]),
                    "reviewer_group": drawn["reviewer_group"][i], "fatigued": bool(drawn["fatigued"][i])})
    return out


def noise_summary(pairs: list[dict]) -> dict:
    """Per slice: n, share of labels against the panel's majority (p* < 1/2), share fatigued."""
    out: dict[str, dict] = {}
    for name in sorted({p["slice"] for p in pairs}):
        group = [p for p in pairs if p["slice"] == name]
        out[name] = {"n": len(group), "against_majority": sum(p["p_star"] < 0.5 for p in group) / len(group),
                     "fatigued": sum(p["fatigued"] for p in group) / len(group)}
    return out
