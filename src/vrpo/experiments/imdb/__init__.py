"""``vrpo reproduce imdb``: the paper's controlled language experiment on CPU.

A tiny GPT (pi_ref, pre-trained here on IMDb text) continues review prefixes; simulated
reviewers (a non-Bradley-Terry mixture) label pairs of its continuations; each method of
``methods.METHODS`` trains on those labels with ``vrpo.train``; a gold sentiment classifier
scores the trained policies at five sampling temperatures. See docs/imdb.md.

Writes to ``--out`` (default ``runs/imdb-<preset>``): ``results.json``, ``results.md``,
``score_vs_temperature.png``, ``score_vs_kl.png``, ``config.json`` (the resolved preset),
``versions.json``; per run ``runs/<method>/seed<k>/`` (model, result.json). Rerunning skips
finished (method, seed) pairs.

Other experiments add sections to the results (the two-stage rows) by one line in
``EXTRA_SECTIONS``: ``name -> "module:function"``, the function taking ``(setup, out)`` and
returning ``{"json": <anything JSON>, "markdown": <str>}``.
"""
from __future__ import annotations

import argparse

EXTRA_SECTIONS: dict[str, str] = {"two_stage": "vrpo.experiments.imdb.two_stage:two_stage_section"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, add_overwrite_flag
    from vrpo.experiments.imdb.presets import PRESETS

    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="quick (the demo, minutes), paper (the full table, see docs/imdb.md for its runtime) or "
                        "micro (the tests' smoke run)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/imdb-PRESET); rerun to resume")
    parser.add_argument("--seeds", type=POSITIVE_INT, default=None, help="number of seeds (default: the preset's)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: the preset's); see docs/imdb.md")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite_flag(parser)


def reuse_inputs(preset) -> dict:
    """What the folder's finished runs, samples and preference files depend on: the preset but
    its choice of rows and seeds (a rerun with more seeds or other methods reuses the
    finished ones) and the bootstrap size (the summary is recomputed every time)."""
    from dataclasses import asdict

    from vrpo.experiments.imdb.two_stage import get_settings

    left_out = ("methods", "seeds", "frontier_methods", "frontier_betas", "n_boot")
    return {**{k: v for k, v in asdict(preset).items() if k not in left_out},
            "two_stage": asdict(get_settings(preset.name))}


def _preset_from_args(args):
    from vrpo.experiments.imdb.methods import get_methods
    from vrpo.experiments.imdb.presets import get_preset

    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.methods:
        names = tuple(n.strip() for n in args.methods.split(",") if n.strip())
        get_methods(names)
        overrides["methods"] = names
    return get_preset(args.preset, **overrides)


def _read_invocations(path) -> list[dict]:
    import json

    entries = []
    lines = path.read_text().splitlines() if path.exists() else []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}: line {i} is not a JSON record ({e.msg}); fix or delete the file") from None
            if not isinstance(entries[-1], dict) or not isinstance(entries[-1].get("seconds"), (int, float)):
                raise ValueError(f"{path}: line {i}: expected an object with numeric 'seconds'; fix or delete the file")
    return entries


def run(args: argparse.Namespace) -> int:
    import importlib
    import json
    import shlex
    import sys
    import time
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from vrpo.experiments.imdb.methods import get_methods
    from vrpo.experiments.imdb.pipeline import Setup, describe
    from vrpo.experiments.imdb.report import plot, results_markdown, summarize
    from vrpo.experiments.imdb.runner import run_all
    from vrpo.provenance import atomic_write_json, atomic_write_text, package_versions

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # weight-loading bars and padding hints would drown our progress bars
    hf_logging.disable_progress_bar()
    preset = _preset_from_args(args)
    out = Path(args.out or f"runs/imdb-{preset.name}")
    progress = not args.no_progress
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    t0, c0 = time.perf_counter(), time.process_time()
    from vrpo.outputs import claim_output

    # every invocation into OUT appends its time, so a resumed experiment still states its full cost;
    # read now, so a damaged log stops the run before anything is computed
    log = out / "invocations.jsonl"
    entries = _read_invocations(log)
    claim_output(out, "reproduce imdb", reuse_inputs(preset), overwrite=args.overwrite)
    entries = [] if not log.exists() else entries  # --overwrite started the folder over
    atomic_write_json(out / "config.json", asdict(preset))
    atomic_write_json(out / "versions.json", package_versions())
    specs = get_methods(preset.methods)
    specs += [s.at_beta(b) for s in get_methods(preset.frontier_methods) for b in preset.frontier_betas]
    setup = Setup(preset, out, progress)
    results = run_all(setup, specs, progress)
    summary = summarize(results, preset.temperatures, preset.n_boot)
    command = "vrpo reproduce imdb --preset " + preset.name + "".join(
        f" {a}" for a in ([f"--seeds {args.seeds}"] if args.seeds else []) +
        ([f"--methods {shlex.quote(args.methods)}"] if args.methods else []))
    meta = {"preset": preset.name, "num_seeds": len(preset.seeds), "num_eval_prompts": preset.num_eval_prompts}
    markdown = results_markdown(summary, preset.temperatures, command, meta)
    extra = {}
    for name, target in EXTRA_SECTIONS.items():
        mod, fn = target.split(":")
        section = getattr(importlib.import_module(mod), fn)(setup, out)
        extra[name] = section["json"]
        markdown += "\n" + section["markdown"]
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    entries.append({"command": command, "seconds": round(elapsed, 1),
                    "cpu_seconds": round(cpu, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_text(log, "".join(json.dumps(e) + "\n" for e in entries))
    markdown += (f"\nWall time of this invocation: {elapsed:.0f} s; of all {len(entries)} invocations into this "
                 f"folder: {sum(e['seconds'] for e in entries):.0f} s (`invocations.jsonl`; finished runs are "
                 "reused on a rerun).\n")
    runs_s = sum(r.get("seconds", 0.0) for by_seed in results.values() for r in by_seed.values())
    markdown += (f"Train + evaluation time recorded by the {sum(map(len, results.values()))} (method, seed) runs "
                 f"when they ran: {runs_s:.0f} s (`runs/*/seed*/result.json`).\n")
    atomic_write_json(out / "results.json", {"command": command, "setup": describe(setup), "summary": summary,
                                             "results": results, "seconds": elapsed,
                                             "cpu_seconds": cpu, **extra})
    atomic_write_text(out / "results.md", markdown)
    plot(summary, results, preset.temperatures, out)
    print(markdown)
    print(f"imdb: wrote {out / 'results.md'}, results.json and plots", file=sys.stderr)
    return 0
