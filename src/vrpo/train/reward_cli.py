"""``vrpo train-rm``: fit a reward model r(x, y) with the Bradley-Terry or the VRPO loss.

    vrpo train-rm --method bt   --model PATH --data pairs.jsonl --out RM_BT
    vrpo train-rm --method vrpo --model PATH --data SCORED_DIR [--samples SAMPLES_DIR] --out RM_VRPO

Every field of :class:`vrpo.train.reward_model.RewardModelConfig` is a flag (``--field-name``);
``--config FILE.yaml`` sets any of them, flags given on the command line win.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

# dataclass annotation (a string under postponed evaluation) -> argparse keyword arguments
_FLAG_KINDS = {
    "str": {"type": str},
    "Optional[str]": {"type": str},
    "int": {"type": int},
    "Optional[int]": {"type": int},
    "float": {"type": float},
    "list": {"nargs": "*"},
    "dict": {"type": json.loads},
}
_HELP = {
    "model": "initialisation: a causal LM folder (a scalar head is added) or a reward model",
    "data": "preference pairs (JSONL/Parquet/CSV/saved folder) or a `vrpo score` folder (needed by vrpo)",
    "out": "run folder; it is also the reward-model folder `vrpo rl --reward-model` takes",
    "method": "bt (Bradley-Terry) or vrpo",
    "samples": "a `vrpo sample` folder: reference samples joined by prompt_id; its manifest is checked",
    "ref_model": "pi_ref, to check the samples' provenance against; its chat template renders conversational rows "
                 "(default: the model the --samples manifest names, else --model)",
    "training_args": "JSON object of further transformers.TrainingArguments",
}


def _config_fields():
    from vrpo.train.reward_model import RewardModelConfig

    return dataclasses.fields(RewardModelConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    for f in _config_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(f.name))
        else:
            parser.add_argument(flag, default=None, help=_HELP.get(f.name), **_FLAG_KINDS[f.type])


def run(args: argparse.Namespace) -> int:
    from vrpo.train.config import read_yaml
    from vrpo.train.reward_model import RewardModelConfig, train_reward_model

    values = read_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in _config_fields() if getattr(args, f.name) is not None})
    # flags are always known settings, so an unknown one can only come from the YAML file
    config = RewardModelConfig.from_dict(values, source=f"--config {args.config}")
    out = train_reward_model(config, resume=args.resume)
    print(f"reward model saved to {out}")
    return 0
