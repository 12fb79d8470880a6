"""``VRPOTrainer``: a ``transformers.Trainer`` that only overrides the public ``compute_loss``
(and ``log``, to add the averaged preference metrics). Data, reference log-probs and losses
live elsewhere: the collator packs the batch, ``vrpo.train.reference`` fixed the reference
log-probs, ``vrpo.train.methods`` turns rewards into a loss, ``vrpo.sequences`` runs the
forward pass.

The step (``SequenceLossTrainer``, shared with the reward-model trainer). Every loss here
depends on the model only through one value v_s per sequence (a log-prob, a reward model's
score), so its gradient is exactly ``sum_s dL/dv_s * grad v_s``. With
``sequences_per_pass = N`` smaller than the batch's sequences, a step runs in two passes:

1. a forward pass without gradients over the batch, N sequences (whole rows) at a time: every v_s;
2. the loss, its metrics and w_s = dL/dv_s from the detached values;
3. per chunk of N sequences: a forward pass with gradients and the backward pass of
   ``sum_s w_s v_s``.

Memory is then set by N, not by the batch's B (2 + K) sequences; the cost is one more forward
pass. The backward of every chunk but the last goes through ``accelerator.backward`` here
(scaled for gradient accumulation as the Trainer scales its loss; gradient synchronisation
across processes deferred to the last chunk); the last chunk's is the one the Trainer runs on
the returned loss, so optimizer steps, loss scaling and logging are the Trainer's own.
"""
from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from vrpo.errors import UserError
from vrpo.losses import implicit_rewards
from vrpo.sequences import assemble, check_shared_prompt, row_chunks, sequence_logps
from vrpo.train.methods import Method, Rewards

REPLAY_TOLERANCE = 1e-3  # the two passes must see the same function: values may differ by float noise only


def policy_logps(model, batch: dict, **kwargs) -> torch.Tensor:
    """log pi_theta(y|x) of every sequence of the batch [N], from ONE forward pass."""
    return sequence_logps(model, batch, **kwargs)


def split_packed(values: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N] -> chosen [B], rejected [B], reference samples [B, K] (None when K = 0)."""
    chosen, rejected, rest = values[:batch_size], values[batch_size:2 * batch_size], values[2 * batch_size:]
    return chosen, rejected, (rest.view(batch_size, -1) if rest.numel() else None)


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class SequenceLossTrainer(Trainer):
    """A Trainer whose loss depends on the model through one value per sequence (module docstring).

    Subclasses give ``sequence_values(model, chunk) -> [S_chunk]`` and
    ``loss_from_values(values [S], inputs) -> (loss, outputs)`` (which records the metrics).
    """

    def __init__(self, *args, sequences_per_pass: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequences_per_pass = sequences_per_pass
        # our loss is a per-example mean: the Trainer must scale it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self._metric_means: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._replay_checked = False

    # -- the step -------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chunks = row_chunks(inputs, self.sequences_per_pass)
        if len(chunks) == 1 or not torch.is_grad_enabled():  # one pass: the graph of the whole batch
            values = assemble([(c["sequence_ids"], self.sequence_values(model, c)) for c in chunks])
            loss, outputs = self.loss_from_values(values, inputs)
            return (loss, outputs) if return_outputs else loss
        loss, outputs = self._two_pass_loss(model, inputs, chunks)
        return (loss, outputs) if return_outputs else loss

    def _two_pass_loss(self, model, inputs: dict, chunks: list[dict]):
        states, parts = [], []
        with torch.no_grad():  # pass 1: every value, no graph kept
            for chunk in chunks:
                states.append(_rng_state())  # pass 3 replays the same dropout masks
                parts.append((chunk["sequence_ids"], self.sequence_values(model, chunk)))
        values = assemble(parts).detach().requires_grad_()
        loss, outputs = self.loss_from_values(values, inputs)  # pass 2: the loss sees values only
        (weights,) = torch.autograd.grad(loss, values)  # w_s = dL/dv_s
        loss = loss.detach()
        for i, chunk in enumerate(chunks):  # pass 3: grad L = sum_s w_s grad v_s, one chunk at a time
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else self._inside_step(model):
                _set_rng_state(states[i])
                fresh = self.sequence_values(model, chunk)
                self._check_replay(fresh, values.detach()[chunk["sequence_ids"]])
                surrogate = (weights[chunk["sequence_ids"]] * fresh).sum()
                if not last:  # scaled as Trainer.training_step scales its loss (ours is never pre-scaled)
                    loss_part = surrogate / getattr(self, "current_gradient_accumulation_steps", 1)
                    self.accelerator.backward(loss_part, **self._backward_kwargs())
        # the value of the loss; its gradient is the last chunk's, for the Trainer's own backward
        return loss + (surrogate - surrogate.detach()), outputs

    def _backward_kwargs(self) -> dict:
        from accelerate.utils import DistributedType

        # as Trainer.training_step: DeepSpeed must not scale again for gradient accumulation
        return {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}

    @contextlib.contextmanager
    def _inside_step(self, model):
        """Forward and backward of a chunk that is not the step's last: no gradient
        synchronisation across processes (the last chunk's backward synchronises the sum),
        and under DeepSpeed no optimizer step (accelerate steps the engine after every
        backward at an accumulation boundary)."""
        from accelerate.utils import DistributedType

        state = self.accelerator.gradient_state
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            boundary = state.sync_gradients
            state._set_sync_gradients(False)
            try:
                yield
            finally:
                state._set_sync_gradients(boundary)
        elif state.sync_gradients:  # else the Trainer already runs this micro-batch without synchronisation
            with self.accelerator.no_sync(model):
                yield
        else:
            yield

    def _check_replay(self, fresh: torch.Tensor, first: torch.Tensor) -> None:
        """Once per run: the gradient pass must recompute the values of the first pass."""
        if self._replay_checked:
            return
        worst = float((fresh.detach().float() - first.float()).abs().max()) if fresh.numel() else 0.0
        if not worst <= REPLAY_TOLERANCE:
            raise UserError(f"--sequences-per-pass: the gradient pass recomputed other values than the first pass "
                            f"(max difference {worst:.3g}): the model's forward pass is not deterministic; "
                            "train without --sequences-per-pass")
        self._replay_checked = True

    def _chunked_head(self) -> bool:
        """The LM head runs chunk by chunk on our side unless the model is sharded (FSDP, ZeRO-3),
        whose head weight exists whole only inside the model's forward pass."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        return not (self.is_fsdp_enabled or is_deepspeed_zero3_enabled())

    def check_shared_prompt(self, values) -> None:
        """``vrpo.sequences.check_shared_prompt`` on the first example, before accelerate wraps the
        forward pass (in autocast): the check runs in the model's own precision."""
        batch = self.data_collator([self.train_dataset[0]])
        batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        check_shared_prompt(self.model, batch, self.data_collator.pad_token_id, values)

    # -- metrics --------------------------------------------------------------------------
    def _record_metrics(self, values: dict[str, torch.Tensor]) -> None:
        """One gather for all metrics of a micro-batch (not one per metric), kept on the device:
        the averages become floats when a line is logged, one sync per line instead of one per
        metric and step. Each value is averaged over examples and processes as before."""
        by_shape: dict[tuple, list[str]] = defaultdict(list)  # one gather per shape ([B], [1], ...)
        for name, v in values.items():
            by_shape[tuple(v.reshape(-1).shape)].append(name)
        for names in by_shape.values():
            cols = torch.stack([values[n].detach().float().reshape(-1) for n in names], 1)  # [B, M]
            for name, m in zip(names, self.accelerator.gather_for_metrics(cols).mean(0).unbind()):
                self._metric_means[name].append(m)

    def _pop_metric_averages(self) -> dict[str, float]:
        """Averages of the recorded micro-batch means, as floats (one transfer)."""
        if not self._metric_means:
            return {}
        names = list(self._metric_means)
        averages = torch.stack([torch.stack(self._metric_means[n]).double().mean() for n in names]).tolist()
        self._metric_means.clear()
        return dict(zip(names, averages))


class VRPOTrainer(SequenceLossTrainer):
    """Trains a causal LM with any method of ``vrpo.train.METHODS`` (DPO, VRPO, ...)."""

    def __init__(self, *args, method: Method, vrpo_config, **kwargs):
        super().__init__(*args, sequences_per_pass=getattr(vrpo_config, "sequences_per_pass", None), **kwargs)
        self.method = method
        self.vrpo_config = vrpo_config
        if getattr(vrpo_config, "share_prompt", False) and self.train_dataset is not None and len(self.train_dataset):
            self.check_shared_prompt(sequence_logps)

    def sequence_values(self, model, chunk: dict) -> torch.Tensor:
        return policy_logps(model, chunk, autocast=self.accelerator.autocast, chunked_head=self._chunked_head())

    def loss_from_values(self, logps: torch.Tensor, inputs: dict):
        B = inputs["ref_chosen_logps"].shape[0]
        chosen, rejected, samples = split_packed(logps, B)
        beta = self.vrpo_config.beta
        rewards = Rewards(
            implicit_rewards(chosen, inputs["ref_chosen_logps"], beta),
            implicit_rewards(rejected, inputs["ref_rejected_logps"], beta),
            None if samples is None else implicit_rewards(samples, inputs["ref_sample_logps"], beta),
        )
        per_example, extra = self.method.loss(rewards, inputs, self.vrpo_config)
        self._record(rewards, chosen, rejected, samples, extra)
        return per_example.mean(), {"rewards_chosen": rewards.chosen, "rewards_rejected": rewards.rejected}

    def _record(self, rewards: Rewards, chosen, rejected, samples, extra: dict) -> None:
        margins = rewards.chosen - rewards.rejected
        values = {"rewards/chosen": rewards.chosen, "rewards/rejected": rewards.rejected, "rewards/margins": margins,
                  "rewards/accuracies": (margins > 0).float(), "logps/chosen": chosen, "logps/rejected": rejected}
        if samples is not None:
            values["logps/reference_samples"] = samples.mean(-1)
        values.update(extra)
        self._record_metrics(values)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self._pop_metric_averages())
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
