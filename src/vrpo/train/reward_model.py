"""Stage one of two-stage VRPO: a scalar reward model r_phi(x, y) fitted with the
Bradley-Terry loss or with the VRPO loss.

A reward model is ``AutoModelForSequenceClassification(num_labels=1)``; its output on
prompt + response is r(x, y). With margins z = r(x, a) - r(x, b) (docs/method.md):

    bt:    L = f(z+-)                                              (vrpo.losses.preference_loss)
    vrpo:  L = f(z+-) - l(z+-, g+-) + mean_{j<k} l(z~_jk, g~_jk)    (vrpo.losses.vrpo_loss)

Unlike DPO no reference log-probs are needed: the reward is the head's output itself. The
chosen, rejected and K reference responses of every prompt go through the model in one
forward pass (or two with ``sequences_per_pass``; with ``share_prompt`` the prompt once and
the score read at each completion's last token); the tokenisation is
:func:`vrpo.data.tokenize_completions`, the one every stage shares (the policy stage scores with the same settings, read from this run's
config.yaml).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from vrpo.train.config import TrainingSettings

__all__ = [
    "RM_METHOD_NAMES",
    "RewardModelConfig",
    "rm_method",
    "train_reward_model",
    "load_reward_features",
    "check_reward_provenance",
    "pair_margins",
    "reward_accuracy",
    "margin_variance_across_seeds",
]


# --------------------------------------------------------------------------------------
# Objectives: the adapters of `vrpo train` (vrpo.train.methods), which do not care whether
# the rewards are implicit (DPO) or a scalar head's (here). Bradley-Terry is "dpo"'s f(z+-).
# --------------------------------------------------------------------------------------
RM_METHOD_NAMES: dict[str, str] = {"bt": "dpo", "vrpo": "vrpo"}  # train-rm --method -> vrpo.train.METHODS key


def rm_method(name: str):
    """The ``vrpo.train.methods.Method`` behind ``train-rm --method NAME``."""
    from vrpo.train.methods import METHODS

    if name not in RM_METHOD_NAMES:
        raise ValueError(f"--method: unknown reward-model method {name!r}; expected one of {sorted(RM_METHOD_NAMES)}")
    return METHODS[RM_METHOD_NAMES[name]]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
@dataclass
class RewardModelConfig(TrainingSettings):
    """Everything ``vrpo train-rm`` needs; saved resolved into the run folder as config.yaml.

    The settings are ``vrpo train``'s (:class:`vrpo.train.config.TrainingSettings`: the same
    names, meaning and checks); ``model`` is a causal LM folder (a fresh scalar head is added)
    or a reward model, and for vrpo ``data`` is scored (aux_prob, ref_samples, ref_aux_prob:
    `vrpo score`). Only these defaults differ from ``vrpo train``'s:
    """

    method: str = "bt"  # bt (Bradley-Terry) or vrpo
    per_device_train_batch_size: int = 8  # prompts per step and device; each brings 2 + K sequences
    # logging and checkpoints as `vrpo train`'s (the same console and metrics.jsonl lines)

    def _engine_settings(self) -> dict:
        return {"data_seed": self.seed}

    def _method_registry(self) -> dict:
        from vrpo.train.methods import METHODS

        return {name: METHODS[key] for name, key in RM_METHOD_NAMES.items()}

    def _method(self):
        return rm_method(self.method)


# --------------------------------------------------------------------------------------
# Data and provenance: `vrpo train`'s plumbing (vrpo.train.run, vrpo.train.collator), unchanged
# --------------------------------------------------------------------------------------
def pipeline_view(cfg: "RewardModelConfig"):
    """``cfg`` as vrpo.train.run's data and provenance helpers read a ``VRPOConfig``: the same
    field names, with ``method`` mapped to its ``vrpo.train.METHODS`` key."""
    from types import SimpleNamespace

    return SimpleNamespace(data=cfg.data, samples=cfg.samples, method=RM_METHOD_NAMES[cfg.method],
                           allow_reference_mismatch=cfg.allow_reference_mismatch)


def reference_chat_template(cfg: "RewardModelConfig"):
    """The chat template that renders conversational rows: pi_ref's, as `vrpo sample` and
    `vrpo train` rendered them (prompt ids must match the samples'): the model the samples'
    manifest names, else ``ref_model``, else the initialisation ``model``. The reward model's
    own tokenizer then tokenises the rendered text."""
    from vrpo.data import chat_template_source

    if cfg.samples:
        return chat_template_source(samples=cfg.samples)
    return chat_template_source(tokenizer=cfg.ref_model or cfg.model,
                                tokenizer_flag="--ref-model" if cfg.ref_model else "--model")


def load_reward_features(cfg: "RewardModelConfig", tokenizer) -> tuple[list[dict], int | None, dict]:
    """Tokenised features of the preference data (``build_features``), K, and the manifests met.

    Data as ``vrpo train`` reads it (``vrpo.train.run.load_training_rows``): a preference
    file, a `vrpo score` folder or a `vrpo label` folder; for vrpo the rows need
    ``aux_prob``, ``ref_samples`` (in the data, or joined from ``cfg.samples`` by prompt_id)
    and ``ref_aux_prob``.
    """
    from vrpo.train.collator import build_features, default_num_ref_samples
    from vrpo.train.run import load_training_rows

    method = rm_method(cfg.method)
    rows, manifests = load_training_rows(pipeline_view(cfg), reference_chat_template(cfg))
    k = None
    if method.needs_reference_samples:
        k = cfg.num_ref_samples or default_num_ref_samples(rows, cfg.data)
    features = build_features(rows, tokenizer, cfg, with_reference=method.needs_reference_samples,
                              num_ref_samples=k, source=cfg.data)
    for f in features:  # a reward model needs no reference log-probs: NaN marks them unused
        if k and f.get("ref_logps") is None:
            f["ref_logps"] = [math.nan] * k
    return features, k, manifests


def check_reward_provenance(cfg: "RewardModelConfig", manifests: dict) -> dict:
    """``vrpo train``'s check (``vrpo.train.run.check_provenance``) against pi_ref =
    ``cfg.ref_model`` or, as there, the initialisation: reference samples and labelled pairs
    must come from it, else a one-line refusal unless ``allow_reference_mismatch``."""
    from vrpo.provenance import fingerprint_data, fingerprint_model, fingerprint_tokenizer
    from vrpo.train.run import check_provenance

    ref_path = cfg.ref_model or cfg.model
    problems = check_provenance(pipeline_view(cfg), manifests, fingerprint_model(ref_path), fingerprint_tokenizer(ref_path))
    return {"reference_model": ref_path, "manifests": manifests, "allowed_mismatches": problems,
            "data_fingerprint": fingerprint_data(cfg.data), "data_checks": manifests.get("data_checks")}


def unpack_rewards(rewards, batch_size: int, k: int | None):
    """Split the [B (2 + K)] rewards of a packed batch (chosen, rejected, then each prompt's
    K references) back into ``vrpo.train.methods.Rewards``: chosen, rejected [B], reference [B, K]."""
    from vrpo.train.methods import Rewards

    chosen, rejected = rewards[:batch_size], rewards[batch_size : 2 * batch_size]
    return Rewards(chosen, rejected, rewards[2 * batch_size :].view(batch_size, k) if k else None)


# --------------------------------------------------------------------------------------
# The trainer: transformers.Trainer, public compute_loss only
# --------------------------------------------------------------------------------------
def _trainer_class():
    import torch

    from vrpo.sequences import sequence_scores
    from vrpo.train.trainer import SequenceLossTrainer

    class RewardModelTrainer(SequenceLossTrainer):
        """``transformers.Trainer`` whose loss is the ``train-rm --method`` adapter on packed batches
        (the step of ``vrpo.train.trainer.SequenceLossTrainer``: one pass, or two with
        ``sequences_per_pass``)."""

        def __init__(self, *args, rm_config: RewardModelConfig, num_ref_samples: int | None, **kwargs):
            super().__init__(*args, sequences_per_pass=rm_config.sequences_per_pass, **kwargs)
            self.rm_config, self.num_ref_samples = rm_config, num_ref_samples
            self.method = rm_method(rm_config.method)
            if rm_config.share_prompt and self.train_dataset is not None and len(self.train_dataset):
                self.check_shared_prompt(sequence_scores)

        def sequence_values(self, model, chunk: dict):
            return sequence_scores(model, chunk)

        def loss_from_values(self, rewards, inputs: dict):
            b = rewards.shape[0] // (2 + (self.num_ref_samples or 0))
            r = unpack_rewards(rewards, b, self.num_ref_samples)
            per_example, extra = self.method.loss(r, inputs, self.rm_config)
            self._record(r, extra)
            return per_example.mean(), {"rewards_chosen": r.chosen, "rewards_rejected": r.rejected}

        def _record(self, r, extra: dict) -> None:
            # the metric names TRL users know, averaged over the steps between two log lines
            # (each a mean over the micro-batch, then over all processes under DDP)
            with torch.no_grad():
                margin = r.chosen - r.rejected
                values = {"rewards/chosen": r.chosen.mean(), "rewards/rejected": r.rejected.mean(),
                          "rewards/margins": margin.mean(), "rewards/accuracies": (margin > 0).float().mean(),
                          **extra}
                self._record_metrics(values)

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs:  # a training log line: attach the averages since the last one
                logs.update(self._pop_metric_averages())
            super().log(logs, *args, **kwargs)

    return RewardModelTrainer


def _load_tokenizer(cfg: RewardModelConfig):
    from vrpo.sampling import load_tokenizer

    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)


def _build_model(cfg: RewardModelConfig, tokenizer=None):
    """A one-output sequence-classification model on ``cfg.model`` (safetensors only) and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    tokenizer = tokenizer or _load_tokenizer(cfg)
    set_seed(cfg.seed)  # the fresh scalar head is drawn from the global RNG: seed it, or runs differ
    model = AutoModelForSequenceClassification.from_pretrained(  # float32 master weights (--bf16: autocast)
        cfg.model, num_labels=1, use_safetensors=True, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model, tokenizer


def reward_inputs_record(cfg: RewardModelConfig) -> dict:
    """Everything that determines a reward model (the reuse record of ``out``): ``vrpo train``'s
    (``vrpo.train.run.run_inputs``: applied settings, fingerprints, processes)."""
    from vrpo.train.run import run_inputs

    return run_inputs(cfg)


def train_reward_model(cfg: RewardModelConfig, *, overwrite: bool = False, callbacks: Sequence = ()) -> Path:
    """Fit r_phi with ``cfg.method``; return the run folder (a reward-model folder for ``vrpo rl``).

    The folder holds config.yaml (the settings that applied), versions.json, manifests/
    (provenance of the data and samples), metrics.jsonl, checkpoints/, the model
    (``save_pretrained``, safetensors) with its tokenizer, and README.md. As with ``vrpo
    train``, a folder made from the same inputs resumes from its last checkpoint, one made
    from others is refused unless ``overwrite``.
    """
    import contextlib
    import os

    from vrpo.outputs import claim_output, folder_lock

    cfg.validate()
    out = Path(cfg.out)
    inputs = reward_inputs_record(cfg)  # before anything heavy: a bad path is a one-line error now
    main = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(out, "train-rm") if main else contextlib.nullcontext():
        claim_output(out, "train-rm", inputs, overwrite=overwrite)
        return _train_reward_model_into(cfg, out, callbacks)


def _train_reward_model_into(cfg: RewardModelConfig, out: Path, callbacks: Sequence = ()) -> Path:
    import yaml

    from vrpo.provenance import atomic_write_json, atomic_write_text, package_versions
    from vrpo.sampling import context_length
    from vrpo.train.collator import PreferenceCollator
    from vrpo.train.reward_run import check_checkpoint, last_checkpoint, resume_point, reward_model_card
    from vrpo.train.run import check_features_fit
    from vrpo.train.trainer import MetricsJsonlCallback

    tokenizer = _load_tokenizer(cfg)
    features, k, manifests = load_reward_features(cfg, tokenizer)  # bad data fails here, before any model loads
    check_features_fit(features, context_length(cfg.model, trust_remote_code=cfg.trust_remote_code), cfg.data)
    provenance = check_reward_provenance(cfg, manifests)
    ckpt = last_checkpoint(out / "checkpoints")
    if ckpt:
        check_checkpoint(ckpt)
    model, _ = _build_model(cfg, tokenizer)
    args = cfg.training_arguments(out / "checkpoints")
    main = args.process_index == 0  # under `accelerate launch`, one process writes the run record
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**cfg.applied_settings(), "stage": "reward_model",
                                                               "num_ref_samples": k}, sort_keys=False))
        atomic_write_json(out / "versions.json", package_versions())
        atomic_write_json(out / "manifests" / "provenance.json", provenance)

    trainer = _trainer_class()(
        model=model, args=args, train_dataset=features, processing_class=tokenizer,
        data_collator=PreferenceCollator(tokenizer.pad_token_id, with_reference=k is not None,
                                         share_prompt=cfg.share_prompt),
        callbacks=[MetricsJsonlCallback(out / "metrics.jsonl"), *callbacks], rm_config=cfg, num_ref_samples=k,
    )
    ckpt = resume_point(out / "checkpoints", True, out / "metrics.jsonl", main_process=main)
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    trainer.save_model(str(out))  # safetensors; only the main process writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        atomic_write_text(out / "README.md", reward_model_card(cfg, k, provenance))
    return out


# --------------------------------------------------------------------------------------
# Evaluation: accuracy against the true preference, spread across seeds
# --------------------------------------------------------------------------------------
def pair_margins(scorer, prompts: Sequence, chosen: Sequence, rejected: Sequence):
    """z = r(x, y+) - r(x, y-) [N] for a reward scorer (``vrpo.policy_stage.RewardModelScorer``
    or any ``score(prompts, completions) -> tensor``)."""
    import torch

    r = scorer.score(list(prompts) * 2, list(chosen) + list(rejected))
    r = torch.as_tensor(r, dtype=torch.float64)
    return r[: len(prompts)] - r[len(prompts) :]


def reward_accuracy(margins, true_prob=None) -> float:
    """Agreement of the reward model with the true preference on held-out pairs.

    Without ``true_prob``: the fraction of pairs with z > 0 (chosen is the truly preferred
    response). With ``true_prob`` p* = P(chosen > rejected): the expected agreement
    mean(p* 1[z > 0] + (1 - p*) 1[z < 0]) (ties count half), so noisy truths are not
    rounded away.
    """
    import torch

    z = torch.as_tensor(margins, dtype=torch.float64)
    win = (z > 0).double() + 0.5 * (z == 0).double()
    if true_prob is None:
        return float(win.mean())
    p = torch.as_tensor(true_prob, dtype=torch.float64)
    return float((p * win + (1 - p) * (1 - win)).mean())


def margin_variance_across_seeds(margins_by_seed) -> dict:
    """How much the fitted reward changes with the training seed (the estimator's variance).

    ``margins_by_seed`` [S, N]: margins of the same N evaluation pairs under S reward models
    trained on different seeds/data draws. Margins, not rewards, because a reward model is
    identified only up to a per-prompt constant. Returns the mean over pairs of the
    across-seed variance (``margin_variance``), the same after scaling each model's margins
    to unit RMS (``normalized_margin_variance``: immune to a seed merely scaling rewards), and
    the mean rate at which two seeds disagree on the sign of a pair (``sign_disagreement``).
    """
    import torch

    m = torch.as_tensor(margins_by_seed, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] < 2:
        raise ValueError(f"margins_by_seed: shape {tuple(m.shape)}; expected [S, N] with at least 2 seeds")
    scaled = m / m.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    s = (m > 0).double()
    agree_pos = s.mean(0)  # fraction of seeds with z > 0, per pair
    S = m.shape[0]
    disagree = 2 * agree_pos * (1 - agree_pos) * S / (S - 1)  # P(two distinct seeds differ), unbiased
    return {"margin_variance": float(m.var(0).mean()), "normalized_margin_variance": float(scaled.var(0).mean()),
            "sign_disagreement": float(disagree.mean()), "num_seeds": S, "num_pairs": m.shape[1]}
