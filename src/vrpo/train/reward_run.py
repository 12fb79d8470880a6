"""Run-folder pieces shared by the two stages of two-stage VRPO (``vrpo train-rm``, ``vrpo rl``):
metrics.jsonl logging that survives resumption, the last checkpoint, model cards."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class MetricsJsonl(_callback_base()):
    """Appends every log line of a Trainer (ours or TRL's) to ``metrics.jsonl``, one JSON object per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")

    @staticmethod
    def truncate_after(path: str | Path, checkpoint: Path | None) -> None:
        """Before resuming from ``checkpoint``, drop lines logged after it (they will be logged
        again), so a resumed run's metrics.jsonl reads like an uninterrupted one."""
        path = Path(path)
        if not path.is_file():
            return
        step = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        from vrpo.provenance import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` folder of a Trainer output folder, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def reward_model_card(cfg: Any, num_ref_samples: int | None, provenance: dict) -> str:
    objective = {"bt": "Bradley-Terry: f(z+-), vrpo.losses.preference_loss",
                 "vrpo": "VRPO: f(z+-) - l(z+-, g+-) + mean_{j<k} l(z~_jk, g~_jk), vrpo.losses.vrpo_loss"}
    allowed = provenance.get("allowed_problems") or []
    samples = provenance.get("samples_manifest") or {}
    return f"""---
library_name: transformers
tags: [vrpo, reward-model, {cfg.method}]
---
# Reward model r(x, y) ({cfg.method})

A sequence-classification model with one output: its value on prompt + response is the
reward. Use it with `vrpo rl --reward-model THIS_FOLDER` or `vrpo best-of-n`.

- Objective: {objective.get(cfg.method, cfg.method)}; base loss `{cfg.base_loss}`
- Initialised from: `{cfg.model}`
- Data: `{cfg.data}` (sha256 {str(provenance.get('data_fingerprint'))[:16]})
- Reference samples per prompt: {num_ref_samples or 'none (not used by this method)'}
- Samples: `{cfg.samples}` from model {str(samples.get('model_fingerprint'))[:16]}, from pi_ref: {samples.get('from_reference_policy')}
- Provenance problems allowed (--allow-reference-mismatch): {'; '.join(allowed) if allowed else 'none'}
- Learning rate {cfg.learning_rate}, batch {cfg.per_device_train_batch_size} prompts per device, seed {cfg.seed}

Made with `vrpo train-rm` (see config.yaml, versions.json and manifests/ in this folder).
"""
