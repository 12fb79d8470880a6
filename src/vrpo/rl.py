"""``vrpo rl``: the policy stage of two-stage VRPO on TRL's RLOO/GRPO, the reward model as its reward.

    vrpo rl --reward-model RM_DIR --model POLICY_DIR --prompts prompts.jsonl --out RUN_DIR

See :mod:`vrpo.policy_stage` for the Python API (``RLConfig``, ``run_rl``).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.policy_stage import RLConfig

    d = RLConfig(model="", reward_model="", prompts="", out="")
    parser.add_argument("--reward-model", required=True, help="reward-model folder written by `vrpo train-rm`")
    parser.add_argument("--model", required=True, help="policy to start from (a local model folder)")
    parser.add_argument("--prompts", required=True, help="JSONL / Parquet / CSV / datasets folder with a `prompt` column")
    parser.add_argument("--out", required=True, help="run folder (created)")
    parser.add_argument("--engine", default=d.engine, help="TRL engine: rloo (default) or grpo")
    parser.add_argument("--num-generations", type=int, default=d.num_generations, help="completions per prompt (>= 2)")
    parser.add_argument("--max-completion-length", type=int, default=d.max_completion_length)
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="completions per step and device; a multiple of --num-generations")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--beta", type=float, default=d.beta, help="KL(pi || pi_ref) coefficient; 0 keeps no reference copy")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="-1: --num-epochs passes over the prompts")
    parser.add_argument("--num-epochs", type=float, default=d.num_epochs)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--save-steps", type=int, default=d.save_steps)
    parser.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard")
    parser.add_argument("--engine-args", default="{}", help="JSON object of further engine config fields, passed unchanged")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from vrpo.policy_stage import RLConfig, run_rl

    try:
        engine_args = json.loads(args.engine_args)
    except json.JSONDecodeError as e:
        raise ValueError(f"--engine-args: not valid JSON ({e.msg}); expected an object such as '{{\"epsilon\": 0.1}}'") from None
    if not isinstance(engine_args, dict):
        raise ValueError("--engine-args: expected a JSON object")
    cfg = RLConfig(
        model=args.model, reward_model=args.reward_model, prompts=args.prompts, out=args.out, engine=args.engine,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        batch_size=args.batch_size, learning_rate=args.learning_rate, beta=args.beta, temperature=args.temperature,
        max_steps=args.max_steps, num_epochs=args.num_epochs, seed=args.seed, save_steps=args.save_steps,
        report_to=list(args.report_to), engine_args=engine_args, trust_remote_code=args.trust_remote_code,
    )
    out = run_rl(cfg, resume=args.resume)
    print(f"policy saved to {out}")
    return 0
