"""``vrpo rl``: the policy stage of two-stage VRPO on TRL's RLOO/GRPO, the reward model as its reward.

    vrpo rl --reward-model RM_DIR --model POLICY_DIR --prompts prompts.jsonl --out RUN_DIR

See :mod:`vrpo.policy_stage` for the Python API (``RLConfig``, ``run_rl``). A rerun of the
same command resumes from the last checkpoint; ``--overwrite`` starts over.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import (MAX_STEPS, NONNEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, SEED, add_overwrite_flag,
                               int_at_least, json_object)
    from vrpo.policy_stage import RL_ENGINES, RLConfig

    d = RLConfig(model="", reward_model="", prompts="", out="")
    parser.add_argument("--reward-model", required=True, help="reward-model folder written by `vrpo train-rm`")
    parser.add_argument("--model", required=True, help="policy to start from (a local model folder, safetensors)")
    parser.add_argument("--prompts", required=True, help="JSONL / Parquet / CSV / datasets folder with a `prompt` column")
    parser.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
    parser.add_argument("--engine", default=d.engine, choices=sorted(RL_ENGINES), help="TRL engine")
    parser.add_argument("--num-generations", type=int_at_least(2), default=d.num_generations,
                        help="completions per prompt (RLOO's leave-one-out baseline needs >= 2)")
    parser.add_argument("--max-completion-length", type=POSITIVE_INT, default=d.max_completion_length,
                        help="longest completion in tokens")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size,
                        help="completions per step and device; a multiple of --num-generations")
    parser.add_argument("--learning-rate", type=POSITIVE_FLOAT, default=d.learning_rate, help="peak learning rate")
    parser.add_argument("--beta", type=NONNEGATIVE_FLOAT, default=d.beta,
                        help="KL(pi || pi_ref) coefficient; 0 keeps no reference copy")
    parser.add_argument("--temperature", type=POSITIVE_FLOAT, default=d.temperature, help="sampling temperature")
    parser.add_argument("--max-steps", type=MAX_STEPS, default=d.max_steps,
                        help="optimiser steps; -1: --num-epochs passes over the prompts")
    parser.add_argument("--num-epochs", type=POSITIVE_FLOAT, default=d.num_epochs, help="passes over the prompts")
    parser.add_argument("--seed", type=SEED, default=d.seed, help="seed of sampling and initialisation")
    parser.add_argument("--save-steps", type=POSITIVE_INT, default=d.save_steps,
                        help="steps between checkpoints (does not change the result)")
    parser.add_argument("--report-to", nargs="*", default=[], metavar="NAME",
                        help="Trainer integrations, e.g. tensorboard (default: none)")
    parser.add_argument("--engine-args", type=json_object, default={},
                        help="JSON object of further engine config fields, passed unchanged, e.g. '{\"epsilon\": 0.1}' "
                             "(default: none)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code")
    add_overwrite_flag(parser, "the run folder")


def run(args: argparse.Namespace) -> int:
    from vrpo.policy_stage import RLConfig, run_rl

    cfg = RLConfig(
        model=args.model, reward_model=args.reward_model, prompts=args.prompts, out=args.out, engine=args.engine,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        batch_size=args.batch_size, learning_rate=args.learning_rate, beta=args.beta, temperature=args.temperature,
        max_steps=args.max_steps, num_epochs=args.num_epochs, seed=args.seed, save_steps=args.save_steps,
        report_to=list(args.report_to), engine_args=args.engine_args, trust_remote_code=args.trust_remote_code,
    )
    out = run_rl(cfg, overwrite=args.overwrite)
    print(f"policy saved to {out}")
    return 0
