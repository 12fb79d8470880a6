"""The ``vrpo`` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. They are imported only when called, so ``vrpo --help`` stays fast
(torch and transformers are not loaded to print help). To add a command, add one line to
``COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module defining add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {  # in workflow order (the order `vrpo --help` lists them)
    "sample": ("vrpo.sampling", "draw K reference samples per prompt from pi_ref with exact log-probs (resumable)"),
    "score": ("vrpo.scoring", "attach auxiliary probabilities g to observed and reference pairs"),
    "fit-aux": ("vrpo.fit_aux", "fit an auxiliary preference model g (GPM / Bradley-Terry) by cross-fitting; report calibration"),
    "audit": ("vrpo.audit", "rank labelled pairs by how strongly g disagrees with the label (noisy or disputed), by slice"),
    "diagnose": ("vrpo.diagnostics", "estimate the share of loss-gradient variance VRPO can remove for each K (label noise vs pair)"),
    "train": ("vrpo.train.cli", "train a causal LM with --method dpo|vrpo|cdpo|rdpo (transformers.Trainer)"),
    "train-rm": ("vrpo.train.reward_cli", "fit a reward model r(x, y) with the Bradley-Terry or the VRPO loss"),
    "rl": ("vrpo.rl", "policy stage of two-stage VRPO: RLOO/GRPO (TRL) on a reward model"),
    "best-of-n": ("vrpo.best_of_n", "keep the reference sample a reward model scores highest, per prompt"),
    "label": ("vrpo.label", "label pairs of reference samples with a simulated reviewer panel (p* kept for evaluation)"),
    "gate": ("vrpo.gate", "deployment gate: fail when any slice's rubric pass rate or win rate regresses vs a baseline"),
    "reproduce": ("vrpo.experiments.reproduce", "reproduce an experiment: bandit (the statistical testbed), imdb, lm-regimes, scheduling"),
    "demo": ("vrpo.experiments.demo", "run the main demonstration (what `make demo` runs)"),
    "tiny-model": ("vrpo.tiny_model", "build a tiny random GPT-2 + tokenizer offline (quickstart, tests)"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    from vrpo.cli_args import OneLineParser

    parser = OneLineParser(
        prog="vrpo",
        description="Variance-reduced preference optimization: DPO / reward modelling with a control "
        "variate built from reference-policy samples and an auxiliary preference model.",
    )
    from vrpo import __version__

    parser.add_argument("--version", action="version", version=f"vrpo {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message "
                        "(also: environment variable VRPO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # import only the module that will run (or show its help)
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("VRPO_DEBUG", "") not in ("", "0")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vrpo {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # UserError (a ValueError) and our other validation errors name the file, row or flag;
        # OSError is the file system's (a full disk, a permission): its message names the path
        if debug:  # a bug that happens to raise one of these keeps its traceback here
            raise
        print(f"vrpo {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: BaseException) -> str:
    from vrpo.errors import one_line

    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        return one_line(f"{where}: {e.strerror}" if where else e.strerror, limit=500)
    return one_line(e, limit=500)
