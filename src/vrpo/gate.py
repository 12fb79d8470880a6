"""``vrpo gate``: a deployment gate by slice.

A better average can hide a regression on the rare case that matters (the seed: "use VRPO
as a better measuring bench, then still run domain-specific safety gates"). The gate
compares a candidate policy with a baseline on the same prompts and FAILS (exit status 1)
when, in any slice,

- a rubric's pass rate is below the baseline's by more than ``--max-regression``, or
- the candidate's win rate against the baseline under the panel's preference p*
  (mean over prompts of p*(x, y_policy, y_baseline); the baseline against itself is 1/2)
  is below 1/2 by more than ``--max-regression``,

whatever the averages do. It prints a table naming each failing slice and metric.

``--policy`` and ``--baseline`` are each either
- an evaluation folder: ``responses.jsonl`` with ``prompt_id`` and ``response``, one row per
  prompt of ``--data`` (``vrpo reproduce scheduling`` writes these), or
- a model folder (``config.json`` or ``adapter_config.json``): its greedy responses to the
  prompts of ``--data`` are generated and saved under ``--out``.

``--data``: the prompts (JSONL / Parquet / CSV with ``prompt``; ``prompt_id`` and ``slice``
optional: a missing slice is taken from the panel). ``--panel`` names the judge that gives
rubrics and p* (a registry, ``PANELS``).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Sequence

# name -> "module:attribute" of an object with .slices(prompts), .rubrics(prompts, responses)
# and .preference_prob(prompts, a, b).
PANELS: dict[str, str] = {
    "scheduling": "vrpo.experiments.scheduling.panel:DEFAULT_PANEL",
}
RESPONSES = "responses.jsonl"
WIN_RATE = "win_rate_vs_baseline"
MEAN_PASS = "mean_rubric_pass"
ALL = "all"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="candidate: an evaluation folder (responses.jsonl) or a model folder")
    parser.add_argument("--baseline", required=True, help="baseline: an evaluation folder or a model folder")
    parser.add_argument("--data", required=True, help="prompts (JSONL/Parquet/CSV with `prompt`; optional `prompt_id`, `slice`)")
    parser.add_argument("--max-regression", type=float, default=0.05,
                        help="largest allowed drop of any slice's pass rate, or of its win rate below 1/2 (default 0.05)")
    parser.add_argument("--panel", default="scheduling", choices=sorted(PANELS), help="judge giving rubrics and p*")
    parser.add_argument("--out", default=None, help="folder for gate.json, gate.md and generated responses")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="when a model folder is given (default 64)")


def run(args: argparse.Namespace) -> int:
    from vrpo.data import load_prompts, read_rows

    if not 0.0 <= args.max_regression < 1.0:
        raise ValueError(f"--max-regression {args.max_regression}: expected a number in [0, 1)")
    panel = load_panel(args.panel)
    prompts = load_prompts(args.data)
    given = {r["prompt"]: r.get("slice") for r in read_rows(args.data) if isinstance(r.get("prompt"), str)}
    slices = [str(given.get(p["prompt"]) or panel.slices([p["prompt"]])[0]) for p in prompts]
    responses = {role: responses_for(getattr(args, role), prompts, args, role) for role in ("policy", "baseline")}
    rows = gate_table(panel, [p["prompt"] for p in prompts], slices, responses["policy"], responses["baseline"],
                      args.max_regression)
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    text = format_report(rows, args.max_regression)
    print(text)
    if args.out:
        from vrpo.provenance import atomic_write_json, atomic_write_text

        atomic_write_json(Path(args.out) / "gate.json", {"passed": not failed, "max_regression": args.max_regression,
                                                         "policy": args.policy, "baseline": args.baseline,
                                                         "data": args.data, "rows": rows})
        atomic_write_text(Path(args.out) / "gate.md", text + "\n")
    return 1 if failed else 0


def load_panel(name: str):
    if name not in PANELS:
        raise ValueError(f"--panel {name}: unknown; expected one of {sorted(PANELS)}")
    module, attr = PANELS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def responses_for(folder: str, prompts: list[dict], args: argparse.Namespace, role: str) -> list[str]:
    """The folder's response to each prompt, in the order of ``prompts``."""
    path = Path(folder)
    if (path / RESPONSES).exists():
        return read_responses(path / RESPONSES, [p["prompt_id"] for p in prompts], f"--{role}")
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        texts = generate_responses(path, [p["prompt"] for p in prompts], args.max_new_tokens)
        if args.out:
            write_responses(Path(args.out) / f"responses-{role}.jsonl", prompts, texts)
        return texts
    raise ValueError(f"--{role} {folder}: neither {RESPONSES} nor a model (config.json / adapter_config.json) found")


def read_responses(path: Path, prompt_ids: Sequence[str], flag: str) -> list[str]:
    from vrpo.data import read_rows

    by_id: dict[str, str] = {}
    for i, row in enumerate(read_rows(path)):
        if "prompt_id" not in row or not isinstance(row.get("response"), str):
            raise ValueError(f"{flag} {path}: row {i}: expected `prompt_id` and a string `response`")
        by_id[str(row["prompt_id"])] = row["response"]
    missing = [pid for pid in prompt_ids if pid not in by_id]
    if missing:
        raise ValueError(f"{flag} {path}: no response for prompt_id {missing[0]!r} ({len(missing)} of "
                         f"{len(prompt_ids)} prompts of --data missing)")
    return [by_id[pid] for pid in prompt_ids]


def write_responses(path: Path, prompts: list[dict], texts: Sequence[str], extra: dict | None = None) -> Path:
    """``responses.jsonl``: one row per prompt (``prompt_id``, ``prompt``, ``response`` + extra columns)."""
    from vrpo.provenance import atomic_write_text

    lines = []
    for i, (p, t) in enumerate(zip(prompts, texts)):
        row = {"prompt_id": p["prompt_id"], "prompt": p["prompt"], "response": t}
        row.update({k: v[i] for k, v in (extra or {}).items()})
        lines.append(json.dumps(row))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def generate_responses(model_dir: Path, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy responses of the model (or LoRA adapter) folder to each prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.evaluate import generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return generate(model, tokenizer, list(prompts), temperature=0.0, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)[2]


def _mean(values: list[float]) -> float | None:
    kept = [v for v in values if v == v]  # drop NaN: the rubric does not apply
    return sum(kept) / len(kept) if kept else None


def gate_table(panel, prompts: Sequence[str], slices: Sequence[str], policy: Sequence[str], baseline: Sequence[str],
               max_regression: float) -> list[dict]:
    """One row per (slice, metric), slices then ``all``: n, baseline, policy, change, verdict.
    Verdict FAIL when change < -max_regression on a slice (the ``all`` rows are informative)."""
    rub_p, rub_b = panel.rubrics(prompts, policy), panel.rubrics(prompts, baseline)
    win = [float(w) for w in panel.preference_prob(prompts, policy, baseline)]
    rows = []
    for name in sorted(set(slices)) + [ALL]:
        idx = [i for i, s in enumerate(slices) if name in (s, ALL)]
        for metric in rub_p[0]:
            b, p = _mean([rub_b[i][metric] for i in idx]), _mean([rub_p[i][metric] for i in idx])
            if b is not None:
                rows.append(_row(name, metric, len(idx), b, p, max_regression))
        cells = lambda rub: [v for i in idx for v in rub[i].values()]  # noqa: E731 (every applicable cell)
        rows.append(_row(name, MEAN_PASS, len(idx), _mean(cells(rub_b)), _mean(cells(rub_p)), max_regression))
        rows.append(_row(name, WIN_RATE, len(idx), 0.5, _mean([win[i] for i in idx]), max_regression))
    return rows


def _row(slice_name: str, metric: str, n: int, baseline: float, policy: float, max_regression: float) -> dict:
    change = policy - baseline
    verdict = "FAIL" if slice_name != ALL and change < -max_regression - 1e-12 else "ok"
    return {"slice": slice_name, "metric": metric, "n": n, "baseline": round(baseline, 4), "policy": round(policy, 4),
            "change": round(change, 4), "verdict": verdict}


def format_report(rows: list[dict], max_regression: float) -> str:
    """The verdict, the failing rows (naming slice and metric), and the averages over all prompts."""
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    head = f"GATE {'FAILED' if failed else 'PASSED'}: " + (
        f"{len(failed)} slice metric(s) fell by more than {max_regression:g}" if failed
        else f"no slice metric fell by more than {max_regression:g}")
    lines = [head, ""]
    shown = failed + [r for r in rows if r["slice"] == ALL]
    lines += ["| slice | metric | n | baseline | policy | change | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['slice']} | {r['metric']} | {r['n']} | {r['baseline']:.3f} | {r['policy']:.3f} | "
              f"{r['change']:+.3f} | {r['verdict']} |" for r in shown]
    return "\n".join(lines)
