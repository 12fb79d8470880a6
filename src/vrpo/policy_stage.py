"""The policy stage of two-stage VRPO: optimise a policy against a trained reward model.

Stage one (:mod:`vrpo.train.reward_model`) fits a scalar reward r_phi(x, y) with the
Bradley-Terry loss or the VRPO loss. Stage two, here, hands r_phi to an existing RL engine
(TRL's ``RLOOTrainer`` or ``GRPOTrainer``, both public in TRL >= 1.0) as a plain reward
function, and offers best-of-n selection as the cheap baseline:

    best-of-n(x) = argmax_{y in {y_1..y_n} ~ pi(.|x)} r_phi(x, y)

The reward model sees the same token sequence in both stages: :func:`reward_inputs`
builds it with :func:`vrpo.data.tokenize_completions` (the tokenisation every stage
shares) and the reward model's own truncation settings, and :class:`RewardModelScorer`
is what the RL engine calls, so no engine-specific tokenisation (TRL's own joins the
strings, without EOS) can shift the reward.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from vrpo._warnings import third_party_deprecations_silenced

__all__ = [
    "RL_ENGINES",
    "RLConfig",
    "RewardModelScorer",
    "best_of_n",
    "load_reward_model",
    "load_prompts",
    "reward_inputs",
    "reward_tokenisation",
    "run_rl",
]


# --------------------------------------------------------------------------------------
# The reward model
# --------------------------------------------------------------------------------------
def _check_reward_model_dir(path: Path) -> dict:
    """One-line errors for a folder that is not a one-output sequence-classification model."""
    if not path.is_dir():
        raise ValueError(f"reward model: {path} is not a folder; expected a model folder written by `vrpo train-rm`")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"reward model: {path} has no config.json; expected a model folder written by `vrpo train-rm`")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"reward model: {path} holds a {'/'.join(archs) or 'model of unknown architecture'}; expected a "
            "sequence-classification model with one output (a folder written by `vrpo train-rm`)"
        )
    num_labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    if num_labels != 1:
        raise ValueError(f"reward model: {path} has {num_labels} outputs; expected a scalar reward head (num_labels=1)")
    return cfg


def load_reward_model(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a reward-model folder (safetensors only), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    _check_reward_model_dir(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def reward_tokenisation(folder: str | os.PathLike) -> dict:
    """The tokenisation settings a reward model was trained with (its run's config.yaml),
    with long prompts cut on the left instead of refused: RL prompts are not ours to check."""
    from vrpo.provenance import read_run_config

    cfg = read_run_config(folder, "--reward-model") or {}
    return {"max_length": int(cfg.get("max_length", 512)), "max_prompt_length": int(cfg.get("max_prompt_length", 256)),
            "prompt_truncation": "left"}


def reward_inputs(tokenizer, prompts: Sequence[str], completions: Sequence[str], tokenisation: dict | None = None) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` [N, T] for r(x, y), x = prompt, y = completion.

    The token sequence is :func:`vrpo.data.tokenize_completions` (prompt, then the
    completion and EOS), exactly what ``vrpo train-rm`` fed the model, with the same
    truncation settings (``tokenisation``; see :func:`reward_tokenisation`).
    """
    from vrpo.data import sequence_batch, tokenize_completions

    if len(prompts) != len(completions):
        raise ValueError(f"reward inputs: {len(prompts)} prompts but {len(completions)} completions; expected equal")
    settings = tokenisation or {"max_length": 512, "max_prompt_length": 256, "prompt_truncation": "left"}
    pairs = []
    for i, (x, y) in enumerate(zip(prompts, completions)):
        if isinstance(x, list):  # a conversation (TRL passes message lists): render it as vrpo.data does
            from vrpo.data import _render_chat

            row = _render_chat({"prompt": x, "chosen": y, "rejected": y}, tokenizer, "reward inputs", i)
            x, y = row["prompt"], row["chosen"]
        if not isinstance(x, str) or not isinstance(y, str):
            raise ValueError(f"reward inputs: pair {i} is not text; expected prompt and completion strings "
                             "or message lists")
        prompt_ids, (completion_ids,) = tokenize_completions(tokenizer, x, [y], where=f"pair {i}", **settings)
        pairs.append((prompt_ids, completion_ids))
    batch = sequence_batch([p for p, _ in pairs], [c for _, c in pairs], tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def sequence_rewards(model, input_ids, attention_mask):
    """r(x, y) [N] from a one-output sequence-classification model.

    transformers' heads pool at each row's rightmost token that is not the pad token, so
    right padding (``reward_inputs``) reads the reward at the completion's last token.
    """
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


class RewardModelScorer:
    """r_phi(x, y) for lists of prompts and completions, batched, without gradients.

    Also a TRL reward function: ``scorer(prompts=..., completions=..., **kw) -> list[float]``
    (the engine's extra keyword arguments are ignored).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, tokenisation: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.tokenisation = int(batch_size), tokenisation
        self.__name__ = "reward_model"  # TRL names the logged metric after it: rewards/reward_model/mean

    @classmethod
    def from_pretrained(cls, path, *, batch_size: int = 32, trust_remote_code: bool = False):
        model, tokenizer = load_reward_model(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, batch_size=batch_size, tokenisation=reward_tokenisation(path))

    def score(self, prompts: Sequence, completions: Sequence):
        import torch

        device = next(self.model.parameters()).device
        chunks = []
        with torch.inference_mode():
            for s in range(0, len(prompts), self.batch_size):
                enc = reward_inputs(self.tokenizer, prompts[s : s + self.batch_size],
                                    completions[s : s + self.batch_size], self.tokenisation)
                enc = {k: v.to(device) for k, v in enc.items()}
                chunks.append(sequence_rewards(self.model, **enc).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def __call__(self, prompts, completions, **_engine_kwargs) -> list[float]:
        self._follow_engine_device()
        return self.score(list(prompts), list(completions)).tolist()

    def _follow_engine_device(self) -> None:
        """Under an RL engine, sit on this process's accelerator (the engine does not move us)."""
        from accelerate import PartialState

        device = PartialState().device
        if next(self.model.parameters()).device != device:
            self.model.to(device)


# --------------------------------------------------------------------------------------
# Best-of-n: the cheap baseline
# --------------------------------------------------------------------------------------
def best_of_n(reward: Callable[[list, list], Sequence[float]], prompts: Sequence, candidates: Sequence[Sequence]) -> list[dict]:
    """For each prompt x_i and its candidates y_i1..y_in, keep argmax_j r(x_i, y_ij).

    ``reward(prompts, completions) -> rewards`` is called once on all flattened pairs (a
    :class:`RewardModelScorer`, or any callable). Ties go to the first candidate. Returns
    one dict per prompt: ``best`` (the kept completion), ``best_index``, ``best_reward``,
    ``rewards`` (all n).
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"best-of-n: {len(prompts)} prompts but {len(candidates)} candidate lists; expected equal")
    flat_p, flat_c = [], []
    for i, (x, ys) in enumerate(zip(prompts, candidates)):
        if len(ys) == 0:
            raise ValueError(f"best-of-n: prompt {i} has no candidates; expected at least 1")
        flat_p += [x] * len(ys)
        flat_c += list(ys)
    flat_r = [float(r) for r in reward(flat_p, flat_c)]
    if len(flat_r) != len(flat_c):
        raise ValueError(f"best-of-n: the reward returned {len(flat_r)} values for {len(flat_c)} completions")
    rows, start = [], 0
    for ys in candidates:
        rs = flat_r[start : start + len(ys)]
        start += len(ys)
        if any(math.isnan(r) for r in rs):
            raise ValueError("best-of-n: the reward returned NaN; expected finite rewards")
        j = max(range(len(rs)), key=rs.__getitem__)  # first maximiser
        rows.append({"best": ys[j], "best_index": j, "best_reward": rs[j], "rewards": rs})
    return rows


# --------------------------------------------------------------------------------------
# RL on the reward model, through an existing engine
# --------------------------------------------------------------------------------------
def _trl(trainer_name: str, config_name: str):
    def load():
        import trl

        return getattr(trl, trainer_name), getattr(trl, config_name)

    return load


# engine name -> loader of (Trainer class, Config class); both take the reward as `reward_funcs`
RL_ENGINES: dict[str, Callable[[], tuple[type, type]]] = {
    "rloo": _trl("RLOOTrainer", "RLOOConfig"),
    "grpo": _trl("GRPOTrainer", "GRPOConfig"),
}


@dataclass
class RLConfig:
    """Everything ``vrpo rl`` needs; saved resolved into the run folder as config.yaml.

    Defaults are sized for a first CPU run; ``engine_args`` passes any further field of the
    engine's own config (e.g. ``{"epsilon": 0.1}`` for RLOOConfig) unchanged.
    """

    model: str  # the policy to start from (usually pi_ref or the SFT model)
    reward_model: str  # folder written by `vrpo train-rm`
    prompts: str  # JSONL / Parquet / CSV / datasets folder with a `prompt` column
    out: str
    engine: str = "rloo"
    num_generations: int = 4  # completions per prompt: RLOO's leave-one-out baseline needs >= 2
    max_completion_length: int = 48
    batch_size: int = 8  # completions per optimiser step and device (a multiple of num_generations)
    learning_rate: float = 1e-5
    beta: float = 0.05  # KL(pi || pi_ref) penalty; 0 skips the reference copy
    temperature: float = 1.0
    max_steps: int = -1  # -1: num_epochs over the prompts
    num_epochs: float = 1.0
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 50
    reward_batch_size: int = 32
    report_to: list[str] = field(default_factory=list)
    engine_args: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False


def load_prompts(path: str | os.PathLike, tokenizer=None):
    """The distinct prompts of a prompts or preference file (:func:`vrpo.data.load_prompts`) as a
    ``datasets.Dataset`` with ``prompt_id`` and ``prompt`` columns, the engines' input."""
    from datasets import Dataset

    from vrpo.data import load_prompts as read_prompts

    return Dataset.from_list(read_prompts(path, tokenizer))


def _engine_config(cfg: RLConfig, config_cls, resume_dir: Path):
    import torch

    from vrpo.train.config import engine_device_defaults

    kwargs = dict(
        output_dir=str(resume_dir), per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        learning_rate=cfg.learning_rate, beta=cfg.beta, temperature=cfg.temperature,
        max_steps=cfg.max_steps, num_train_epochs=cfg.num_epochs, seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, report_to=cfg.report_to or "none",
        # TRL's defaults assume a GPU (bf16, activation checkpointing): follow the hardware instead
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), **engine_device_defaults(),
    )
    # newer transformers renamed gradient_checkpointing (a deprecated alias that warns on every run)
    names = {f.name for f in fields(config_cls)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    kwargs.update(cfg.engine_args)
    try:
        return config_cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"engine args: {e}") from None


# RLConfig fields that cannot change the result: left out of the reuse record of ``out``
RL_NOT_RESULT_SETTINGS = ("out", "logging_steps", "save_steps", "report_to")


def rl_inputs(cfg: RLConfig) -> dict:
    """Everything that determines an RL run (the reuse record of ``out``): its settings, the
    policy, reward model and prompts by fingerprint, and the number of processes."""
    from vrpo.errors import check_readable
    from vrpo.provenance import fingerprint_data, fingerprint_model, fingerprint_tokenizer
    from vrpo.sampling import check_model_folder

    values = {k: v for k, v in asdict(cfg).items() if k not in RL_NOT_RESULT_SETTINGS}
    values["model"] = fingerprint_model(check_model_folder(cfg.model, "--model"))
    values["tokenizer"] = fingerprint_tokenizer(cfg.model)
    values["reward_model"] = fingerprint_model(check_model_folder(cfg.reward_model, "--reward-model"))
    values["prompts"] = fingerprint_data(check_readable(cfg.prompts, "--prompts", "a prompts file"))
    values["num_processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    return values


def run_rl(cfg: RLConfig, *, overwrite: bool = False) -> Path:
    """Optimise ``cfg.model`` against the reward model with the chosen engine; return the run folder.

    The folder gets config.yaml, versions.json, metrics.jsonl, the engine's checkpoints
    (``checkpoints/``), the final policy (``save_pretrained``, safetensors) and a model card.
    A folder made from the same inputs (``rl_inputs``) resumes from its last checkpoint; one
    made from others is refused in one line unless ``overwrite`` (then it starts over).
    """
    import contextlib

    from vrpo.outputs import claim_output, folder_lock

    inputs = rl_inputs(cfg)
    main = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(cfg.out, "rl") if main else contextlib.nullcontext():
        claim_output(cfg.out, "rl", inputs, overwrite=overwrite)
        return _run_rl_into(cfg)


def _run_rl_into(cfg: RLConfig) -> Path:
    from transformers import AutoTokenizer

    from vrpo.train.reward_run import check_checkpoint, last_checkpoint, resume_point
    from vrpo.train.trainer import MetricsJsonlCallback

    if cfg.engine not in RL_ENGINES:
        raise ValueError(f"--engine: unknown engine {cfg.engine!r}; expected one of {sorted(RL_ENGINES)}")
    if cfg.batch_size % cfg.num_generations:
        raise ValueError(f"--batch-size {cfg.batch_size}: expected a multiple of --num-generations {cfg.num_generations}")
    if not Path(cfg.model).is_dir():
        raise ValueError(f"--model: {cfg.model} is not a model folder")
    scorer = RewardModelScorer.from_pretrained(cfg.reward_model, batch_size=cfg.reward_batch_size,
                                               trust_remote_code=cfg.trust_remote_code)
    out = Path(cfg.out)
    trainer_cls, config_cls = RL_ENGINES[cfg.engine]()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, padding_side="left", trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = load_prompts(cfg.prompts, tokenizer)
    engine_cfg = _engine_config(cfg, config_cls, out / "checkpoints")
    engine_cfg.model_init_kwargs = {"use_safetensors": True}
    main = engine_cfg.process_index == 0  # under `accelerate launch`, one process writes the run record
    if main:
        _write_run_header(out, asdict(cfg))
    trainer = trainer_cls(model=str(cfg.model), reward_funcs=scorer, args=engine_cfg, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=[MetricsJsonlCallback(out / "metrics.jsonl")])
    if last_checkpoint(out / "checkpoints"):
        check_checkpoint(last_checkpoint(out / "checkpoints"))
    last = resume_point(out / "checkpoints", True, out / "metrics.jsonl", main_process=main)
    with third_party_deprecations_silenced():
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    trainer.save_model(str(out))  # safetensors; only the main process writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        _write_model_card(out, cfg)
    return out


# --------------------------------------------------------------------------------------
# Run folder: resolved config, versions, provenance of the reward model, metrics, card
# --------------------------------------------------------------------------------------
def _write_run_header(out: Path, config: dict) -> None:
    import yaml

    from vrpo.provenance import atomic_write_json, atomic_write_text, fingerprint_model, package_versions

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump({**config, "stage": "rl"}, sort_keys=False))
    atomic_write_json(out / "versions.json", package_versions())
    provenance = {
        "reward_model": str(config["reward_model"]),
        "reward_model_fingerprint": fingerprint_model(config["reward_model"]),
        "initial_policy": str(config["model"]),
        "initial_policy_fingerprint": fingerprint_model(config["model"]),
    }
    rm_config = Path(config["reward_model"]) / "config.yaml"  # the reward model's own run, if `vrpo train-rm` made it
    if rm_config.is_file():
        provenance["reward_model_config"] = yaml.safe_load(rm_config.read_text())
    atomic_write_json(out / "provenance.json", provenance)


def _write_model_card(out: Path, cfg: RLConfig) -> None:
    card = f"""---
library_name: transformers
tags: [vrpo, two-stage, {cfg.engine}]
---
# Policy optimised on a reward model ({cfg.engine.upper()}, TRL)

- Initial policy: `{cfg.model}`
- Reward model: `{cfg.reward_model}` (see provenance.json for its fingerprint and training config)
- Engine: TRL `{cfg.engine}`; {cfg.num_generations} completions per prompt, KL coefficient beta = {cfg.beta},
  learning rate {cfg.learning_rate}, seed {cfg.seed}
- Prompts: `{cfg.prompts}`

Made with `vrpo rl` (two-stage VRPO: the variance reduction sits in the reward model).
"""
    from vrpo.provenance import atomic_write_text

    atomic_write_text(out / "README.md", card)
