"""``vrpo demo`` (what ``make demo`` runs): the statistical testbed's quick reproduction,
then the IMDb experiment's quick preset, each printing its table. Each step is an ordinary
``vrpo reproduce ...`` command, listed here so the demo is exactly what a user can rerun.

The terminal shows, per step, what it is, its progress bar, its table and one line with its
time and where its files are; what the training runs print goes to their log files
(``train.log`` beside each run)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

# Each step: (the argv of a `vrpo` command, what it is); "{out}" is replaced by the demo's output folder.
DEMO_STEPS: list[tuple[list[str], str]] = [
    (["reproduce", "bandit", "--quick", "--out", "{out}/bandit"],
     "the statistical testbed, QUICK version: 60 replicates per setting, no one-stage model, a short n-sweep. "
     "The full run (`vrpo reproduce bandit`: 200 replicates, every table) is what the README and "
     "docs/testbed.md quote; this one prints tables of the same kind with wider intervals."),
    (["reproduce", "imdb", "--preset", "quick", "--out", "{out}/imdb"],
     "the IMDb experiment, quick preset: 3 seeds, 256 labelled pairs per seed, a tiny GPT pre-trained here as "
     "pi_ref. The paper preset's tables (`vrpo reproduce imdb --preset paper`, about an hour) are in docs/imdb.md."),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo); rerun to resume")
    parser.add_argument("--overwrite", action="store_true",
                        help="start each step's folder over (passed to every step; default: resume a folder made "
                             "from the same inputs, refuse one made from others)")


def run(args: argparse.Namespace) -> int:
    from vrpo.cli import main

    out = Path(args.out)
    for i, (step, what) in enumerate(DEMO_STEPS, start=1):
        argv = [a.replace("{out}", str(out)) for a in step] + (["--overwrite"] if args.overwrite else [])
        print(f"\n=== [{i}/{len(DEMO_STEPS)}] vrpo {' '.join(argv)}\n    {what}", flush=True)
        t = time.perf_counter()
        rc = main(argv)
        folder = argv[argv.index("--out") + 1]
        print(f"=== [{i}/{len(DEMO_STEPS)}] done in {time.perf_counter() - t:.0f} s (exit {rc}); tables in "
              f"{folder}/results.md", flush=True)
        if rc:
            return rc
    return 0
