"""``vrpo train``: flags mirror ``VRPOConfig`` one to one; precedence defaults < --config FILE.yaml < flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from vrpo.train.config import VRPOConfig, read_yaml

HELP = {
    "model": "policy initialisation and reference model pi_ref (a save_pretrained folder)",
    "data": "preference data (JSONL/Parquet/CSV/saved datasets folder) or a `vrpo score` folder",
    "out": "run folder (checkpoints, metrics.jsonl, config.yaml, model, model card); rerun to resume",
    "samples": "a `vrpo sample` folder (not needed when --data is a `vrpo score` folder)",
    "method": "dpo, vrpo, cdpo or rdpo (vrpo.train.METHODS)",
    "base_loss": "f in the soft-label loss: sigmoid (DPO; the default, recommended), ramp (paper code; drifted far "
                 "in KL in the IMDb paper preset), hinge, ipo",
    "num_ref_samples": "K reference samples per prompt (default: all the data holds). Efficient K: 8 "
                       "(88-92%% of the exact expectation's MSE reduction in the testbed; K=4: 69-78%%; "
                       "K=2 with coefficient 1 removes nothing: see docs/variance.md)",
    "control_variate_coef": "c in f - c l(z,g) + c mean l(z~,g~); 1 is the paper's. With only K=2, use 0.5 "
                            "(halves the pair variance instead of removing none)",
    "prompt_truncation": "a prompt longer than --max-prompt-length: error (default) or left (keep its end)",
    "report_to": "Trainer integrations, e.g. tensorboard (default none)",
    "training_args": "JSON object of extra transformers.TrainingArguments (deepspeed, fsdp, ...)",
    "allow_reference_mismatch": "train although samples/pairs were not drawn from this reference model (recorded)",
    "trust_remote_code": "allow the model folder's own code (off by default)",
    "lora_r": "LoRA rank (0 = full fine-tuning)",
    # the cost of a step: the same loss and gradients whatever they are (docs/cost.md)
    "sequences_per_pass": "at most N sequences per forward/backward pass: the exact two-pass step, memory set by N "
                          "instead of the batch's B(2+K) sequences, one more forward pass (default: all in one)",
    "share_prompt": "pack each prompt once with its 2+K completions (block attention mask): faster for long prompts "
                    "(default off)",
    "bf16": "bfloat16 autocast over float32 weights (CPU and CUDA)",
}


def _field_type(field: dataclasses.Field):
    hint = field.type if not isinstance(field.type, str) else eval(field.type, vars(typing))  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (keys as the flags, - or _)")
    for f in dataclasses.fields(VRPOConfig):
        flag, kind = "--" + f.name.replace("_", "-"), _field_type(f)
        kw = {"dest": f.name, "default": None, "help": HELP.get(f.name, f"default {f.default if f.default is not dataclasses.MISSING else f.default_factory()}")}
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind in (list, typing.List) or typing.get_origin(kind) is list:
            p.add_argument(flag, nargs="+", **kw)
        elif kind is dict:
            p.add_argument(flag, type=json.loads, **kw)
        else:
            p.add_argument(flag, type=kind, **kw)


def config_from_args(args: argparse.Namespace) -> VRPOConfig:
    values = read_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(VRPOConfig)
                   if getattr(args, f.name, None) is not None})
    return VRPOConfig.from_dict(values, source=args.config or "flags").validate()


def run(args: argparse.Namespace) -> int:
    from vrpo.train.run import train

    out = train(config_from_args(args))
    print(f"saved the model, model card and run record in {out}")
    return 0
