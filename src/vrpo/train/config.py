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
from typing import Any, NamedTuple, Optional, TypeVar

from vrpo.cli_args import (HALF_OPEN_RATE, MAX_STEPS, NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT,
                           RATE_BELOW_ONE, SEED, ArgKind, int_at_least, json_object)

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

    Not a config of its own: ``method`` names a method of the subclass's registry
    (``_method_registry``). Each setting's kind, help and group is in ``SETTINGS``.
    """

    # what to train, on what, where
    model: str = ""  # the initialisation (a save_pretrained folder); `vrpo train`: also pi_ref unless ref_model
    data: str = ""  # preference data (JSONL/Parquet/CSV/saved folder) or a `vrpo score` folder
    out: str = ""  # run folder
    samples: Optional[str] = None  # a `vrpo sample` folder (reference samples + manifest; joined by prompt_id)
    ref_model: Optional[str] = None  # pi_ref when it differs from the initialisation (default: model)
    method: str = "vrpo"  # the objective: a name of the subclass's registry
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

    # ``vrpo.train.methods.Method`` of ``method`` (the subclass knows its registry)
    def _method(self):
        raise NotImplementedError

    def applied_settings(self) -> dict[str, Any]:
        """The settings that apply to this run, ``method`` and its own settings first: a setting
        another method declares (``vrpo.train.methods.Method.settings``: cDPO's label_smoothing,
        rDPO's flip_rate, VRPO's samples, K and c) is left out. What config.yaml, the model
        card and the reuse record of ``out`` hold."""
        values = self.to_dict()
        own = [name for name in self._method().settings if name in values]
        others = method_specific_settings(self._method_registry()) - set(own)
        first = ["method", *own]
        return {**{k: values[k] for k in first}, **{k: v for k, v in values.items() if k not in first and k not in others}}

    def _method_registry(self) -> dict:
        raise NotImplementedError

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
            hint = ("; a rerun resumes by itself when its inputs are the same (--overwrite starts over)"
                    if unknown[0] == "resume" else "")
            raise ValueError(f"{source}: unknown setting {unknown[0]!r}; expected one of {sorted(known)}{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls: type[_Settings], path: str | Path) -> _Settings:
        return cls.from_dict(read_yaml(path), source=str(path))

    def validate(self: _Settings) -> _Settings:
        """Each value checked as its flag is (``SETTINGS``' kinds), so a config file or the
        Python API obeys the same rules with the same one-line messages."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{flag_name(name)}: required")
        for f in dataclasses.fields(self):
            value = check_setting(f.name, getattr(self, f.name), self._method_registry())
            setattr(self, f.name, value)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"--max-prompt-length {self.max_prompt_length}: expected less than --max-length "
                             f"{self.max_length} (room for the response)")
        _check_scheduler(self.lr_scheduler_type)
        return self


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

    def _method_registry(self) -> dict:
        from vrpo.train.methods import METHODS

        return METHODS

    def _method(self):
        return self._method_registry()[self.method]


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


# --------------------------------------------------------------------------------------
# Every setting's kind, help and group: the CLI flags of `vrpo train` and `vrpo train-rm`
# are generated from this table, and validate() checks config-file and API values with it
# --------------------------------------------------------------------------------------
class Setting(NamedTuple):
    """How a setting is checked and shown. ``kind``: a ``vrpo.cli_args`` kind, ``bool``,
    ``str``, ``list`` (of strings), or a tuple of choices (a callable returning them when they
    depend on the stage: the method names)."""

    kind: Any
    help: str
    group: str


_DATA, _OBJECTIVE, _TOKENS, _OPTIM, _LOGS, _LORA, _REF, _SAFETY = (
    "data and models", "objective", "tokenisation (vrpo.data.tokenize_completions)",
    "optimisation (transformers.TrainingArguments)", "logging and checkpoints (do not change the result)",
    "LoRA (peft; --lora-r > 0 turns it on)", "reference log-probs", "provenance and safety")
_COST = "the cost of a step (docs/cost.md)"


def _base_losses() -> tuple:
    from vrpo.losses import BASE_LOSSES

    return tuple(sorted(BASE_LOSSES))


SETTINGS: dict[str, Setting] = {
    "model": Setting(str, "initialisation (a save_pretrained folder, safetensors); for `vrpo train` also pi_ref "
                     "unless --ref-model (required)", _DATA),
    "data": Setting(str, "preference data (JSONL/Parquet/CSV/saved datasets folder), a `vrpo score` folder or a "
                    "`vrpo label` folder (required)", _DATA),
    "out": Setting(str, "run folder (checkpoints, metrics.jsonl, config.yaml, model, model card); rerun the same "
                   "command to resume (required)", _DATA),
    "samples": Setting(str, "a `vrpo sample` folder: reference samples joined by prompt_id, its checksum and "
                       "manifest checked (default: none; not needed when --data is a `vrpo score` folder)", _DATA),
    "ref_model": Setting(str, "pi_ref when it differs from --model (default: --model)", _DATA),
    "method": Setting(lambda registry: tuple(sorted(registry)), "the objective", _OBJECTIVE),
    "base_loss": Setting(_base_losses, "f in the soft-label loss: sigmoid (DPO and Bradley-Terry; recommended), "
                         "ramp (the paper code's; drifted far in KL in the IMDb paper preset), hinge, ipo", _OBJECTIVE),
    "num_ref_samples": Setting(int_at_least(2), "K reference samples per prompt (default: all the data holds). "
                               "Efficient K: 8 (88-92%% of the exact expectation's MSE reduction in the testbed; "
                               "K=4: 69-78%%; K=2 with coefficient 1 removes nothing: see docs/variance.md)", _OBJECTIVE),
    "control_variate_coef": Setting(NONNEGATIVE_FLOAT, "c in f - c l(z,g) + c mean l(z~,g~); 1 is the paper's. With "
                                    "only K=2, use 0.5 (halves the pair variance instead of removing none)", _OBJECTIVE),
    "beta": Setting(POSITIVE_FLOAT, "r = beta * (log pi - log pi_ref); 0.1 as in DPO and the paper", _OBJECTIVE),
    "label_smoothing": Setting(HALF_OPEN_RATE, "cDPO's epsilon: the label is trusted with probability 1 - epsilon",
                               _OBJECTIVE),
    "flip_rate": Setting(HALF_OPEN_RATE, "rDPO's label-flip rate epsilon (the loss is unbiased under it)", _OBJECTIVE),
    "max_length": Setting(POSITIVE_INT, "longest prompt + response in tokens (a longer response is cut on the "
                          "right; a sequence longer than the model's context is refused)", _TOKENS),
    "max_prompt_length": Setting(POSITIVE_INT, "longest prompt in tokens", _TOKENS),
    "prompt_truncation": Setting(("error", "left"), "a prompt longer than --max-prompt-length: error, or left "
                                 "(keep its end)", _TOKENS),
    "learning_rate": Setting(POSITIVE_FLOAT, "peak learning rate", _OPTIM),
    "num_train_epochs": Setting(POSITIVE_FLOAT, "passes over the data (when --max-steps is -1)", _OPTIM),
    "max_steps": Setting(MAX_STEPS, "optimiser steps; -1: --num-train-epochs passes (0 would train nothing)", _OPTIM),
    "per_device_train_batch_size": Setting(POSITIVE_INT, "prompts per step and device (each brings 2 sequences, "
                                           "2 + K with reference samples)", _OPTIM),
    "gradient_accumulation_steps": Setting(POSITIVE_INT, "steps whose gradients make one update", _OPTIM),
    "warmup_steps": Setting(NONNEGATIVE_INT, "linear warm-up steps", _OPTIM),
    "weight_decay": Setting(NONNEGATIVE_FLOAT, "AdamW weight decay", _OPTIM),
    "lr_scheduler_type": Setting(str, "transformers scheduler: linear, cosine, constant, "
                                 "constant_with_warmup, polynomial, ...", _OPTIM),
    "seed": Setting(SEED, "seed of initialisation, data order and dropout", _OPTIM),
    "disable_dropout": Setting(bool, "no dropout in the trained model: the policy's log-probs are then as "
                               "deterministic as the reference's, a reward model's pair differs by text only", _OPTIM),
    "training_args": Setting(json_object, "JSON object of further transformers.TrainingArguments (deepspeed, fsdp, "
                             "...); they win over the flags", _OPTIM),
    "logging_steps": Setting(POSITIVE_INT, "steps between log lines (console, metrics.jsonl)", _LOGS),
    "save_steps": Setting(POSITIVE_INT, "steps between checkpoints (where a killed run resumes)", _LOGS),
    "save_total_limit": Setting(POSITIVE_INT, "checkpoints kept (default 2; none: all)", _LOGS),
    "report_to": Setting(list, "Trainer integrations, e.g. tensorboard wandb", _LOGS),
    "lora_r": Setting(NONNEGATIVE_INT, "LoRA rank (0 = full fine-tuning)", _LORA),
    "lora_alpha": Setting(POSITIVE_INT, "LoRA scaling alpha", _LORA),
    "lora_dropout": Setting(RATE_BELOW_ONE, "dropout on the LoRA branch", _LORA),
    "lora_target_modules": Setting(list, "module names to adapt (default: peft's all-linear)", _LORA),
    "sequences_per_pass": Setting(POSITIVE_INT, "at most N sequences per forward/backward pass: the exact two-pass "
                                  "step, memory set by N instead of the batch's B(2+K) sequences, for one more forward "
                                  "pass (default: the whole batch in one pass)", _COST),
    "share_prompt": Setting(bool, "each prompt once per row followed by its 2+K completions (a block attention "
                            "mask): faster for prompts as long as the completions or longer", _COST),
    "bf16": Setting(bool, "bfloat16 autocast over float32 master weights (CPU and CUDA)", _COST),
    "ref_batch_size": Setting(POSITIVE_INT, "sequences per forward pass of the one reference log-prob pass", _REF),
    "cache_dir": Setting(str, "where the reference log-probs are cached (default: OUT/cache)", _LOGS),
    "allow_reference_mismatch": Setting(bool, "train although samples/pairs were not drawn from this reference "
                                        "model (recorded in the model card)", _SAFETY),
    "trust_remote_code": Setting(bool, "allow the model folder's own code", _SAFETY),
}

# settings that cannot change what a run computes: left out of the reuse record of OUT, so a
# killed run can be resumed with other values (more logging, another cache folder)
NOT_RESULT_SETTINGS = frozenset({"out", "logging_steps", "save_steps", "save_total_limit", "report_to", "cache_dir",
                                 # the same loss and gradients to float rounding (docs/cost.md): a run that ran
                                 # out of memory resumes with --sequences-per-pass
                                 "sequences_per_pass", "share_prompt"})


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def method_specific_settings(registry: dict) -> set[str]:
    """The settings some method declares as its own (``Method.settings``)."""
    return {name for method in registry.values() for name in method.settings}


def choices_of(name: str, registry: dict) -> tuple | None:
    kind = SETTINGS[name].kind
    if callable(kind) and not isinstance(kind, (type, ArgKind)):
        kind = kind(registry) if name == "method" else kind()
    return kind if isinstance(kind, tuple) else None


def check_setting(name: str, value: Any, registry: dict) -> Any:
    """``value`` checked as ``--NAME`` is, or a one-line UserError naming the flag."""
    from vrpo.errors import UserError

    if name not in SETTINGS:
        return value  # a setting a subclass added without a row here: not checked
    flag, kind, optional = "--" + flag_name(name), SETTINGS[name].kind, _default_of(name) is None
    if value is None and optional:
        return None
    choices = choices_of(name, registry)
    if choices is not None:
        if value not in choices:
            raise UserError(f"{flag} {value}: unknown; expected one of {list(choices)}")
        return value
    if isinstance(kind, ArgKind):
        return kind.check(value, flag)
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{flag} {value!r}: expected true or false")
    if kind is str and not isinstance(value, str):
        raise UserError(f"{flag} {value!r}: expected text")
    if kind is list and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        raise UserError(f"{flag} {value!r}: expected a list of names")
    return list(value) if kind is list else value


def _default_of(name: str) -> Any:
    for cls in (VRPOConfig, TrainingSettings):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return None


def _check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    known = [s.value for s in SchedulerType]
    if name not in known:
        from vrpo.errors import UserError

        raise UserError(f"--lr-scheduler-type {name}: unknown; expected one of {known}")
