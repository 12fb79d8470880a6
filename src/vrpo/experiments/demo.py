"""``vrpo demo`` (what ``make demo`` runs): the statistical testbed's quick reproduction,
then the IMDb experiment's quick preset, each printing its table. Each step is an ordinary
``vrpo reproduce ...`` command, listed here so the demo is exactly what a user can rerun."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

# Each step: the argv of a `vrpo` command; "{out}" is replaced by the demo's output folder.
DEMO_STEPS: list[list[str]] = [
    ["reproduce", "bandit", "--quick", "--out", "{out}/bandit"],
    ["reproduce", "imdb", "--preset", "quick", "--out", "{out}/imdb"],
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo); rerun to resume")
    parser.add_argument("--overwrite", action="store_true",
                        help="start each step's folder over (passed to every step; default: resume a folder made "
                             "from the same inputs, refuse one made from others)")


def run(args: argparse.Namespace) -> int:
    from vrpo.cli import main

    out = Path(args.out)
    for step in DEMO_STEPS:
        argv = [a.replace("{out}", str(out)) for a in step] + (["--overwrite"] if args.overwrite else [])
        print(f"\n=== vrpo {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        rc = main(argv)
        print(f"=== done in {time.perf_counter() - t:.0f} s (exit {rc})", flush=True)
        if rc:
            return rc
    return 0
