"""``VRPOConfig``: every setting of a training run, with its default and the reason for it.

The same dataclass backs ``vrpo train`` (flags and ``--config FILE.yaml``) and the Python
API (``vrpo.train.train(VRPOConfig(...))``); the resolved values are written to the run
folder as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class VRPOConfig:
    # what to train, on what, where
    model: str = ""  # policy initialisation AND reference model pi_ref (a save_pretrained folder)
    data: str = ""  # preference data (JSONL/Parquet/CSV/saved folder) or a `vrpo score` folder
    out: str = ""  # run folder
    samples: Optional[str] = None  # a `vrpo sample` folder (reference samples + their ref log-probs)
    ref_model: Optional[str] = None  # pi_ref when it differs from the initialisation (default: model)
    method: str = "vrpo"  # a key of vrpo.train.METHODS: dpo, vrpo, cdpo, rdpo
    # the objective
    base_loss: str = "sigmoid"  # f in l(z, p); "ramp" is the paper code's bounded choice
    beta: float = 0.1  # r = beta * (log pi - log pi_ref); 0.1 as in DPO and the paper
    num_ref_samples: Optional[int] = None  # K reference samples per prompt (default: as many as the data holds)
    control_variate_coef: float = 1.0  # c; 1 is the paper's estimator
    label_smoothing: float = 0.1  # cDPO's epsilon
    flip_rate: float = 0.1  # rDPO's label-flip rate
    # tokenisation (vrpo.data.tokenize_completions)
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
    bf16: bool = False
    disable_dropout: bool = True  # reference log-probs are deterministic; the policy's should be too
    training_args: dict = field(default_factory=dict)  # any other TrainingArguments (deepspeed, fsdp, ...)
    # LoRA (peft): lora_r > 0 turns it on
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Optional[list] = None  # default: peft's "all-linear"
    # reference log-probs
    ref_batch_size: int = 8
    cache_dir: Optional[str] = None  # default: OUT/cache
    # provenance and safety
    allow_reference_mismatch: bool = False
    trust_remote_code: bool = False
    resume: bool = True  # continue from the last checkpoint in OUT when there is one

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "VRPOConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting {unknown[0]!r}; expected one of {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "VRPOConfig":
        return cls.from_dict(read_yaml(path), source=str(path))

    def validate(self) -> "VRPOConfig":
        from vrpo.losses import BASE_LOSSES
        from vrpo.train.methods import METHODS

        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: required")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: unknown; expected one of {sorted(METHODS)}")
        if self.base_loss not in BASE_LOSSES:
            raise ValueError(f"--base-loss {self.base_loss}: unknown; expected one of {sorted(BASE_LOSSES)}")
        if self.num_ref_samples is not None and self.num_ref_samples < 2:
            raise ValueError(f"--num-ref-samples {self.num_ref_samples}: expected at least 2")
        if self.prompt_truncation not in ("error", "left"):
            raise ValueError(f"--prompt-truncation {self.prompt_truncation}: expected 'error' or 'left'")
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
