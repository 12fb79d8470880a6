"""``vrpo reproduce lm-regimes``: where VRPO helps on a language model, predicted and measured.

For each regime (a reviewer with an exact p*, on the IMDb tiny GPT or on SmolLM2; see
``worlds``), at a fixed checkpoint (seed 0's DPO run, and pi_ref itself in ``full``):

1. the diagnostic's prediction from ONE dataset, before any VRPO training: the
   decomposition of the checkpoint's own per-example loss gradients (``vrpo diagnose
   --model``) on one dataset the checkpoint never saw (labelled pairs and their 8 reference
   samples on prompts no run trained on);
2. the measured variance ratio Var(VRPO_K gradient) / Var(DPO gradient), K = 2, 4, 8, 16,
   over fresh datasets (fresh pairs from pi_ref, fresh labels from the reviewer, fresh
   reference samples) at the same checkpoint: the truth the prediction is judged against;
3. in the regimes with the largest and the smallest predicted gain, DPO vs VRPO (sigmoid,
   K = 8, oracle g and cross-fitted g) over several seeds, under the regime's truth.

Writes to ``--out`` (default ``runs/lm-regimes-PRESET``): ``results.json`` (per regime
``predicted_ratio`` and ``measured_ratio`` keyed by K, the training comparison),
``results.md``, ``predicted_vs_measured.png``, and every stage's files (samples,
preference files, runs, gradient tables), reused on a rerun. See docs/lm_regimes.md.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, add_overwrite_flag

    parser.add_argument("--preset", default="quick", help="quick (about 9 CPU minutes, one thread; the IMDb regimes), full "
                        "(the measurement, with the scheduling panel on SmolLM2; about 90 CPU minutes) or micro (the tests' smoke run)")
    parser.add_argument("--out", default=None, help="output folder (default runs/lm-regimes-PRESET); rerun to resume")
    parser.add_argument("--regimes", default=None, help="comma-separated regimes (default: the preset's); "
                        "mixture, sharp, cycle, target, scheduling. A rerun into the same --out with more "
                        "regimes or seeds reuses every finished stage")
    parser.add_argument("--seeds", type=POSITIVE_INT, default=None, help="training seeds (default: the preset's)")
    parser.add_argument("--scheduling-model", default=None,
                        help="pi_ref of the scheduling regime (default: SmolLM2-135M-Instruct, converted and cached)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite_flag(parser)


def _preset(args):
    from vrpo.experiments.lm_regimes.presets import get_preset
    from vrpo.experiments.lm_regimes.worlds import get_regimes

    overrides = {}
    if args.regimes:
        names = tuple(n.strip() for n in args.regimes.split(",") if n.strip())
        get_regimes(names)
        overrides["regimes"] = names
    if args.seeds:
        overrides["seeds"] = tuple(range(args.seeds))
    return get_preset(args.preset, **overrides)


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from dataclasses import asdict
    from pathlib import Path

    import torch
    from transformers.utils import logging as hf_logging

    from vrpo.experiments.lm_regimes.experiment import Experiment
    from vrpo.experiments.lm_regimes.report import plot, results_markdown
    from vrpo.outputs import claim_output, folder_lock
    from vrpo.provenance import atomic_write_json, atomic_write_text, package_versions

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    preset = _preset(args)
    # The folder's record leaves out which regimes and seeds run: every stage's files are named by
    # its regime and seed, so a rerun with more of either adds stages and reuses the rest (run the
    # IMDb regimes and the SmolLM2 one as two processes into two folders, copy one world folder
    # into the other, rerun with every regime: it assembles one results.json). Sizes must match.
    record = {k: v for k, v in asdict(preset).items() if k not in ("regimes", "seeds")}
    out = claim_output(args.out or f"runs/lm-regimes-{preset.name}", "reproduce lm-regimes",
                       {"preset": record, "scheduling_model": args.scheduling_model}, overwrite=args.overwrite)
    torch.set_num_threads(preset.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    with folder_lock(out, "reproduce lm-regimes"):
        results = Experiment(preset, Path(out), progress=not args.no_progress,
                             scheduling_model=args.scheduling_model).run()
        command = f"vrpo reproduce lm-regimes --preset {preset.name}" + (f" --regimes {args.regimes}" if args.regimes else "") \
            + (f" --seeds {args.seeds}" if args.seeds else "")
        results.update(command=command, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                       versions=package_versions())
        atomic_write_json(Path(out) / "results.json", results)
        markdown = results_markdown(results)
        atomic_write_text(Path(out) / "results.md", markdown)
        plot(results, Path(out) / "predicted_vs_measured.png")
    print(markdown)
    print(f"lm-regimes: wrote {Path(out) / 'results.md'}, results.json and predicted_vs_measured.png", file=sys.stderr)
    return 0
