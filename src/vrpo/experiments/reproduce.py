"""``vrpo reproduce NAME``: each experiment registers here as ``name -> module``. An
experiment module defines ``add_arguments(parser)`` and ``run(args) -> int`` and keeps its
top-level imports light (heavy imports inside ``run``) so ``--help`` stays fast."""
from __future__ import annotations

import argparse
import importlib

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "bandit": ("vrpo.simulate.reproduce", "the statistical testbed: simulated preferences with known truth"),
    "imdb": ("vrpo.experiments.imdb", "IMDb sentiment generation on CPU: tiny GPT, gold reward, simulated reviewers"),
    "lm-regimes": ("vrpo.experiments.lm_regimes", "where VRPO helps on a language model: the diagnostic's prediction vs the measured gradient variance, per reviewer regime, and DPO vs VRPO training"),
    "scheduling": ("vrpo.experiments.scheduling.workflow", "clinic scheduling assistant on SmolLM2: slices, reviewer panel, DPO vs VRPO, deployment gate"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, (module, help_text) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_experiment_module=module)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._experiment_module).run(args) or 0)
