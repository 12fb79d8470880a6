"""``VRPOConfig``: every setting of a training run, with its default and the reason for it.

The same dataclass backs ``vrpo train`` (flags and ``--config FILE.yaml``) and the Python
API (``vrpo.train.train(VRPOConfig(...))``); the resolved values are written to the run
folder as ``config.yaml``.

The settings ``vrpo train-rm`` shares (``vrpo.train.reward_model.RewardModelConfig``) live
once in :class:`TrainingSettings`, the base of both; a subclass overrides a default where
its stage needs another.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

_Settings = TypeVar("_Settings", bound="TrainingSettings")


def engine_device_defaults() -> dict[str, Any]:
    """TrainingArguments for the hardware (the Trainer's and TRL's defaults assume a GPU):
    none with a GPU; on CPU, ``use_cpu``, no pinned memory, and ``gloo`` across processes."""
    import os

    import torch

    if torch.cuda.is_available():
        return {}
    values: dict[str, Any] = {"use_cpu": True, "dataloader_pin_memory": False}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        values["ddp_backend"] = "gloo"  # CPU processes (tests, laptops)
    return values


@dataclass
class TrainingSettings:
    """The settings ``vrpo train`` (:class:`VRPOConfig`) and ``vrpo train-rm``
    (``RewardModelConfig``) share, with one name, meaning and check each.

    Not a config of its own: ``method`` and ``validate``'s method check are the subclass's.
    """

    # what to train, on what, where
    model: str = ""  # the initialisation (a save_pretrained folder); `vrpo train`: also pi_ref unless ref_model
    data: str = ""  # preference data (JSONL/Parquet/CSV/saved folder) or a `vrpo score` folder
    out: str = ""  # run folder
    samples: Optional[str] = None  # a `vrpo sample` folder (reference samples + manifest; joined by prompt_id)
    ref_model: Optional[str] = None  # pi_ref when it differs from the initialisation (default: model)
    method: str = "vrpo"  # the objective; the subclass's _check_method says which names it knows
    # the objective
    base_loss: str = "sigmoid"  # f in l(z, p); "ramp" is the paper code's bounded choice
    num_ref_samples: Optional[int] = None  # K reference samples per prompt (default: as many as the data holds)
    control_variate_coef: float = 1.0  # c; 1 is the paper's estimator
    # tokenisation (vrpo.data.tokenize_completions); a reward model's policy stage scores with the same
    max_length: int = 512
    max_prompt_length: int = 256
    prompt_truncation: str = "error"  # "error" or "left" (keep the prompt's end)
    # optimisation (passed to transformers.TrainingArguments)
    learning_rate: float = 1e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    report_to: list = field(default_factory=lambda: ["none"])
    # the policy's log-probs should be as deterministic as the reference's, and a reward model's pair
    # should differ by the text only, not by dropout noise
    disable_dropout: bool = True
    training_args: dict = field(default_factory=dict)  # any other TrainingArguments (deepspeed, fsdp, ...)
    # the cost of a step (docs/cost.md); the loss and gradients are the same whatever these are
    sequences_per_pass: Optional[int] = None  # at most N sequences per forward/backward (the exact two-pass
    #   step: memory set by N, not by the batch's B (2 + K)); None: the whole batch in one pass (fastest when it fits)
    share_prompt: bool = False  # each prompt once per row, followed by its 2 + K completions (a block mask):
    #   faster for long prompts; off by default, since with short prompts the longer row costs more (docs/cost.md)
    bf16: bool = False  # autocast to bfloat16 over float32 master weights (CPU and CUDA)
    # provenance and safety
    allow_reference_mismatch: bool = False
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _engine_settings(self) -> dict[str, Any]:
        """TrainingArguments that only a subclass has (``data_seed``)."""
        return {}

    def training_arguments(self, output_dir: str | Path):
        """``transformers.TrainingArguments`` of this run: the shared optimisation settings, CPU
        defaults when no GPU is visible (``use_cpu``, no pinned memory, ``gloo`` for several
        processes), then ``training_args``, which wins."""
        from transformers import TrainingArguments

        values = dict(
            output_dir=str(output_dir), learning_rate=self.learning_rate, num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps, per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, lr_scheduler_type=self.lr_scheduler_type, seed=self.seed,
            logging_steps=self.logging_steps, save_strategy="steps", save_steps=self.save_steps,
            save_total_limit=self.save_total_limit, report_to=list(self.report_to), bf16=self.bf16,
            remove_unused_columns=False,  # the collator's features are ours, not the model's inputs
            **self._engine_settings())
        values.update(engine_device_defaults())
        values.update(self.training_args)
        try:
            return TrainingArguments(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--training-args: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_dict(cls: type[_Settings], values: dict[str, Any], source: str = "config") -> _Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting {unknown[0]!r}; expected one of {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls: type[_Settings], path: str | Path) -> _Settings:
        return cls.from_dict(read_yaml(path), source=str(path))

    def _check_method(self) -> None:
        """Raise ValueError unless ``method`` names an objective of this stage."""
        raise NotImplementedError

    def validate(self: _Settings) -> _Settings:
        from vrpo.losses import BASE_LOSSES

        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: required")
        self._check_method()
        if self.base_loss not in BASE_LOSSES:
            raise ValueError(f"--base-loss {self.base_loss}: unknown; expected one of {sorted(BASE_LOSSES)}")
        if self.num_ref_samples is not None and self.num_ref_samples < 2:
            raise ValueError(f"--num-ref-samples {self.num_ref_samples}: expected at least 2")
        if self.prompt_truncation not in ("error", "left"):
            raise ValueError(f"--prompt-truncation {self.prompt_truncation}: expected 'error' or 'left'")
        self._check_step_settings()
        return self

    def _check_step_settings(self) -> None:
        from vrpo.cli_args import POSITIVE_INT

        POSITIVE_INT.check(self.sequences_per_pass, "--sequences-per-pass", allow_none=True)


@dataclass
class VRPOConfig(TrainingSettings):
    """Everything ``vrpo train`` needs: :class:`TrainingSettings` and the policy stage's own settings."""

    method: str = "vrpo"  # a key of vrpo.train.METHODS: dpo, vrpo, cdpo, rdpo
    # the objective, continued
    beta: float = 0.1  # r = beta * (log pi - log pi_ref); 0.1 as in DPO and the paper
    label_smoothing: float = 0.1  # cDPO's epsilon
    flip_rate: float = 0.1  # rDPO's label-flip rate
    # LoRA (peft): lora_r > 0 turns it on
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Optional[list] = None  # default: peft's "all-linear"
    # reference log-probs
    ref_batch_size: int = 8
    cache_dir: Optional[str] = None  # default: OUT/cache
    # the run
    resume: bool = True  # continue from the last checkpoint in OUT when there is one

    def _check_method(self) -> None:
        from vrpo.train.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: unknown; expected one of {sorted(METHODS)}")

    def validate(self) -> "VRPOConfig":
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"--beta {self.beta}: expected a positive number")
        return self


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--config {p}: no such file")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {p}: expected a mapping of setting: value")
    return {k.replace("-", "_"): v for k, v in values.items()}
