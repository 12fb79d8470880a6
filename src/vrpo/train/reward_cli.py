"""``vrpo train-rm``: fit a reward model r(x, y) with the Bradley-Terry or the VRPO loss.

    vrpo train-rm --method bt   --model PATH --data pairs.jsonl --out RM_BT
    vrpo train-rm --method vrpo --model PATH --data SCORED_DIR [--samples SAMPLES_DIR] --out RM_VRPO

Every field of :class:`vrpo.train.reward_model.RewardModelConfig` is a flag (``--field-name``),
generated, checked and grouped exactly as ``vrpo train``'s (``vrpo.train.cli.add_setting_flags``);
``--config FILE.yaml`` sets any of them, flags given on the command line win. A rerun of the
same command resumes from the last checkpoint; ``--overwrite`` starts over.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.train.cli import add_setting_flags
    from vrpo.train.reward_model import RewardModelConfig

    add_setting_flags(parser, RewardModelConfig)


def run(args: argparse.Namespace) -> int:
    from vrpo.train.cli import settings_from_args
    from vrpo.train.reward_model import RewardModelConfig, train_reward_model
    from vrpo.train.run import summary_line

    out = train_reward_model(settings_from_args(args, RewardModelConfig), overwrite=args.overwrite)
    print(f"reward model saved to {out}")
    print(summary_line(out))
    return 0
