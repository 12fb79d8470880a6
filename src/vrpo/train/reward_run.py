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


def check_checkpoint(ckpt: str | Path) -> None:
    """A checkpoint the Trainer can resume from, or a one-line error naming it (a killed
    write or a full disk leaves a damaged one; the Trainer would fail deep inside)."""
    from vrpo.errors import UserError

    problem = _checkpoint_problem(Path(ckpt))
    if problem:
        raise UserError(f"checkpoint {ckpt}: {problem}; delete that folder to resume from the checkpoint before it, "
                        "or pass --overwrite to start over")


def _checkpoint_problem(ckpt: Path) -> str | None:
    import json
    import zipfile

    state = ckpt / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is damaged"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for w in weights:
        if not _safetensors_intact(w):
            return f"{w.name} is damaged (its size does not match its header)"
    for f in sorted(ckpt.glob("*.pt")) + sorted(ckpt.glob("*.pth")):  # optimizer, scheduler, RNG states
        if not zipfile.is_zipfile(f):
            return f"{f.name} is damaged"
    return None


def _safetensors_intact(path: Path) -> bool:
    """The file is exactly header + the tensors its header lists (truncation or garbage shows)."""
    import json
    import struct

    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False


def reward_model_card(cfg: Any, num_ref_samples: int | None, provenance: dict) -> str:
    from vrpo.train.model_card import card_header, hub_id, method_settings_lines

    objective = {"bt": "Bradley-Terry: f(z+-), vrpo.losses.preference_loss",
                 "vrpo": "VRPO: f(z+-) - c l(z+-, g+-) + c mean_{j<k} l(z~_jk, g~_jk), vrpo.losses.vrpo_loss"}
    allowed = provenance.get("allowed_mismatches") or []
    samples = (provenance.get("manifests") or {}).get("samples") or {}
    base = hub_id(cfg.model)
    lines = card_header(["vrpo", "reward-model", cfg.method], base_model=base, datasets=[hub_id(cfg.data)])
    lines += [
        f"# Reward model r(x, y) ({cfg.method})", "",
        "A sequence-classification model with one output: its value on prompt + response is the",
        "reward. Use it with `vrpo rl --reward-model THIS_FOLDER` or `vrpo best-of-n`.", "",
        f"- Objective: {objective.get(cfg.method, cfg.method)}; base loss `{cfg.base_loss}`",
        *method_settings_lines(cfg, cfg._method()),
        f"- Initialised from: `{cfg.model}`" + ("" if base else " (a local folder)"),
        f"- Data: `{cfg.data}` (sha256 {str(provenance.get('data_fingerprint'))[:16]})",
    ]
    if num_ref_samples:
        lines += [f"- Reference samples per prompt: {num_ref_samples}",
                  f"- Reference policy checked against: `{provenance.get('reference_model')}`",
                  f"- Samples from model {str(samples.get('model_fingerprint'))[:16]}, drawn as pi_ref draws: "
                  f"{samples.get('from_reference_policy')}"]
    lines += [f"- Provenance problems allowed (--allow-reference-mismatch): {'; '.join(allowed) if allowed else 'none'}",
              f"- Learning rate {cfg.learning_rate}, batch {cfg.per_device_train_batch_size} prompts per device, "
              f"seed {cfg.seed}", "",
              "Made with `vrpo train-rm` (see config.yaml, versions.json and manifests/ in this folder).", ""]
    return "\n".join(lines)
