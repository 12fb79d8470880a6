"""``VRPOTrainer``: a ``transformers.Trainer`` that only overrides the public ``compute_loss``
(and ``log``, to add the averaged preference metrics). Data, reference log-probs and losses
live elsewhere: the collator packs the batch, ``vrpo.train.reference`` fixed the reference
log-probs, ``vrpo.train.methods`` turns rewards into a loss.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from vrpo.losses import implicit_rewards, sequence_logps
from vrpo.train.methods import Method, Rewards


def policy_logps(model, batch: dict) -> torch.Tensor:
    """log pi_theta(y|x) of every packed sequence [N], from ONE forward pass."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])


def split_packed(values: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N] -> chosen [B], rejected [B], reference samples [B, K] (None when K = 0)."""
    chosen, rejected, rest = values[:batch_size], values[batch_size:2 * batch_size], values[2 * batch_size:]
    return chosen, rejected, (rest.view(batch_size, -1) if rest.numel() else None)


class VRPOTrainer(Trainer):
    """Trains a causal LM with any method of ``vrpo.train.METHODS`` (DPO, VRPO, ...)."""

    def __init__(self, *args, method: Method, vrpo_config, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.vrpo_config = vrpo_config
        # our loss is a per-example mean: the Trainer must scale it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self._metric_values: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        B = inputs["ref_chosen_logps"].shape[0]
        logps = policy_logps(model, inputs)
        chosen, rejected, samples = split_packed(logps, B)
        beta = self.vrpo_config.beta
        rewards = Rewards(
            implicit_rewards(chosen, inputs["ref_chosen_logps"], beta),
            implicit_rewards(rejected, inputs["ref_rejected_logps"], beta),
            None if samples is None else implicit_rewards(samples, inputs["ref_sample_logps"], beta),
        )
        per_example, extra = self.method.loss(rewards, inputs, self.vrpo_config)
        loss = per_example.mean()
        self._record(rewards, chosen, rejected, samples, extra)
        return (loss, {"rewards_chosen": rewards.chosen, "rewards_rejected": rewards.rejected}) if return_outputs else loss

    def _record(self, rewards: Rewards, chosen, rejected, samples, extra: dict) -> None:
        margins = rewards.chosen - rewards.rejected
        values = {"rewards/chosen": rewards.chosen, "rewards/rejected": rewards.rejected, "rewards/margins": margins,
                  "rewards/accuracies": (margins > 0).float(), "logps/chosen": chosen, "logps/rejected": rejected}
        if samples is not None:
            values["logps/reference_samples"] = samples.mean(-1)
        values.update(extra)
        for name, v in values.items():
            v = self.accelerator.gather_for_metrics(v.detach().float().reshape(-1))
            self._metric_values[name].append(v.mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for name, vals in self._metric_values.items():
            logs[name] = sum(vals) / len(vals)
        self._metric_values.clear()
        super().log(logs, start_time)


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log record (with its step) to ``metrics.jsonl`` (see ``truncate_metrics``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records past ``step`` (the checkpoint a run resumes from), so the file holds one trajectory."""
    from vrpo.provenance import atomic_write_text

    path = Path(path)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
