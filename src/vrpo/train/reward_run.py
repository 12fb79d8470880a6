"""Run-folder pieces shared by the two stages of two-stage VRPO (``vrpo train-rm``, ``vrpo rl``):
where to resume, the reward model's card. Metrics logging is ``vrpo train``'s
(``vrpo.train.trainer.MetricsJsonlCallback``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def resume_point(folder: str | Path, resume: bool, metrics: str | Path, *, main_process: bool = True):
    """The checkpoint to resume from (or None). The main process also cuts ``metrics.jsonl``
    back to it, so a resumed run's metrics read like an uninterrupted run's
    (``vrpo.train.trainer.truncate_metrics``)."""
    from vrpo.train.trainer import truncate_metrics

    ckpt = last_checkpoint(folder) if resume else None
    if main_process:
        truncate_metrics(metrics, int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0)
    return ckpt


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
    allowed = provenance.get("allowed_mismatches") or []
    samples = (provenance.get("manifests") or {}).get("samples") or {}
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
- Reference policy checked against: `{provenance.get('reference_model')}`
- Samples: `{cfg.samples}` from model {str(samples.get('model_fingerprint'))[:16]}, drawn as pi_ref draws: {samples.get('from_reference_policy')}
- Provenance problems allowed (--allow-reference-mismatch): {'; '.join(allowed) if allowed else 'none'}
- Learning rate {cfg.learning_rate}, batch {cfg.per_device_train_batch_size} prompts per device, seed {cfg.seed}

Made with `vrpo train-rm` (see config.yaml, versions.json and manifests/ in this folder).
"""
