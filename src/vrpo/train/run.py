"""``train(config)``: one training run from a preference file to a saved model, read top to bottom.

    data -> (reference samples) -> provenance check -> features -> reference log-probs (cached)
         -> VRPOTrainer (resumes from the last checkpoint) -> model + model card + run record
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vrpo._warnings import third_party_deprecations_silenced
from vrpo.provenance import (atomic_write_json, atomic_write_text, check_reference, fingerprint_data, fingerprint_model,
                             fingerprint_tokenizer, package_versions, read_manifest)
from vrpo.train.config import VRPOConfig
from vrpo.train.methods import METHODS

LABELLED_PAIRS = "pairs.jsonl"  # what `vrpo label` writes
SAMPLE_LOGP_TOLERANCE = 1e-3  # nats; stored vs recomputed reference log-probs of the same sequence


def load_training_rows(cfg: VRPOConfig, tokenizer) -> tuple[list[dict], dict]:
    """Canonical rows (a `vrpo score` folder or any preference file) and the manifests met."""
    from vrpo.data import load_preferences

    data = Path(cfg.data)
    manifests: dict = {}
    if data.is_dir() and (data / "data.parquet").exists():  # a `vrpo score` folder
        rows = load_preferences(data / "data.parquet", tokenizer).to_list()
        if (data / "manifest.json").exists():
            manifests["scored_data"] = read_manifest(data)
            if manifests["scored_data"].get("samples_manifest"):
                manifests["samples"] = manifests["scored_data"]["samples_manifest"]
    else:
        if data.is_dir() and (data / LABELLED_PAIRS).exists():  # a `vrpo label` folder
            data = data / LABELLED_PAIRS
        rows = load_preferences(data, tokenizer).to_list()
        labelled = labelled_pairs_manifest(data)
        if labelled:
            manifests["labelled_pairs"] = labelled
    if cfg.samples and METHODS[cfg.method].needs_reference_samples:
        from vrpo.sampling import read_samples
        from vrpo.data import attach_reference_samples

        rows = attach_reference_samples(rows, read_samples(cfg.samples), f"--samples {cfg.samples}")
        manifests["samples"] = read_manifest(cfg.samples)
    return rows, manifests


def labelled_pairs_manifest(data: Path) -> dict | None:
    """The sampling manifest of the responses in labelled pairs, when a manifest sits beside
    them (``vrpo label`` writes the samples' manifest into its own)."""
    folder = data if data.is_dir() else data.parent
    if not (folder / "manifest.json").exists():
        return None
    manifest = read_manifest(folder)
    return manifest.get("samples_manifest") or (manifest if "model_fingerprint" in manifest else None)


def check_provenance(cfg: VRPOConfig, manifests: dict, ref_fp: str, tok_fp: str) -> list[str]:
    """Refuse data not drawn from the reference model unless --allow-reference-mismatch."""
    problems = []
    if "samples" in manifests and METHODS[cfg.method].needs_reference_samples:
        problems += check_reference(manifests["samples"], ref_fp, tok_fp, allow_mismatch=cfg.allow_reference_mismatch,
                                    what="reference samples")
    if "labelled_pairs" in manifests:
        problems += check_reference(manifests["labelled_pairs"], ref_fp, tok_fp,
                                    allow_mismatch=cfg.allow_reference_mismatch, what="labelled pairs")
    return problems


def _disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _apply_lora(model, cfg: VRPOConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-r: needs peft (pip install 'vrpo[peft]')") from None
    from transformers.pytorch_utils import Conv1D

    # GPT-2-style Conv1D layers store their weight transposed; peft needs to be told (else it warns and fixes it)
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=cfg.lora_target_modules or "all-linear", fan_in_fan_out=conv1d)
    with third_party_deprecations_silenced():
        return get_peft_model(model, lora)


def prepare(cfg: VRPOConfig, targs) -> dict:
    """Everything before the optimiser: tokenizer, features with reference log-probs, provenance."""
    from vrpo.sampling import load_tokenizer
    from vrpo.train.collator import build_features, default_num_ref_samples
    from vrpo.train.reference import attach_reference_logps

    method = METHODS[cfg.method]
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    rows, manifests = load_training_rows(cfg, tokenizer)
    ref_path = cfg.ref_model or cfg.model
    ref_fp, tok_fp = fingerprint_model(ref_path), fingerprint_tokenizer(ref_path)
    problems = check_provenance(cfg, manifests, ref_fp, tok_fp)
    k = None
    if method.needs_reference_samples:
        k = cfg.num_ref_samples or default_num_ref_samples(rows, cfg.data)
    features = build_features(rows, tokenizer, cfg, with_reference=method.needs_reference_samples, num_ref_samples=k,
                              source=cfg.data)
    with targs.main_process_first(local=False, desc="reference log-probs"):
        features, ref_info = attach_reference_logps(
            features, ref_path, ref_fp, tokenizer.pad_token_id, cfg.cache_dir or Path(cfg.out) / "cache",
            cfg.ref_batch_size, cfg.trust_remote_code, device=targs.device,  # the GPU when training on one
            share_prompt=cfg.share_prompt)
    err = ref_info["stored_sample_logp_error"]
    if err is not None and err > SAMPLE_LOGP_TOLERANCE:
        msg = (f"stored reference log-probs of the samples differ from the reference model's by {err:.3g} nats "
               "(another model or tokenisation)")
        if not cfg.allow_reference_mismatch:
            raise ValueError(msg + "; pass --allow-reference-mismatch to train anyway")
        problems.append(msg)
    provenance = {"reference_model": ref_path, "reference_model_fingerprint": ref_fp, "tokenizer_fingerprint": tok_fp,
                  "data": cfg.data, "data_fingerprint": fingerprint_data(cfg.data), "num_examples": len(features),
                  "num_ref_samples": k, "allowed_mismatches": problems, "reference_logps": ref_info}
    return {"tokenizer": tokenizer, "features": features, "manifests": manifests, "provenance": provenance, "k": k}


def write_run_record(cfg: VRPOConfig, prep: dict) -> None:
    import yaml

    out = Path(cfg.out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    atomic_write_json(out / "versions.json", package_versions())
    for name, manifest in prep["manifests"].items():
        atomic_write_json(out / "manifests" / f"{name}.json", manifest)
    atomic_write_json(out / "manifests" / "provenance.json", prep["provenance"])


def build_trainer(cfg: VRPOConfig, targs, prep: dict, callbacks: Sequence = ()):
    from datasets import Dataset

    from vrpo.sampling import load_model_and_tokenizer
    from vrpo.train.collator import PreferenceCollator
    from vrpo.train.trainer import MetricsJsonlCallback, VRPOTrainer

    method = METHODS[cfg.method]
    model, _ = load_model_and_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)  # float32 master weights
    if cfg.disable_dropout:
        _disable_dropout(model)
    if cfg.lora_r > 0:
        model = _apply_lora(model, cfg)
    tokenizer = prep["tokenizer"]
    return VRPOTrainer(
        model=model, args=targs, train_dataset=Dataset.from_list(prep["features"]),
        data_collator=PreferenceCollator(tokenizer.pad_token_id, method.needs_reference_samples, cfg.share_prompt),
        processing_class=tokenizer, callbacks=[MetricsJsonlCallback(Path(cfg.out) / "metrics.jsonl"), *callbacks],
        method=method, vrpo_config=cfg)


def last_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out)) if out.is_dir() else None


def train(config: VRPOConfig | dict, callbacks: Sequence = ()) -> Path:
    """Train and save a model into ``config.out``; resumes from its last checkpoint. Returns the run folder."""
    from vrpo.train.trainer import truncate_metrics

    cfg = (VRPOConfig.from_dict(config) if isinstance(config, dict) else config).validate()
    out = Path(cfg.out)
    targs = cfg.training_arguments(cfg.out)
    prep = prepare(cfg, targs)
    if targs.process_index == 0:
        write_run_record(cfg, prep)
    trainer = build_trainer(cfg, targs, prep, callbacks)
    ckpt = last_checkpoint(out) if cfg.resume else None
    if targs.process_index == 0:
        truncate_metrics(out / "metrics.jsonl", int(ckpt.rsplit("-", 1)[1]) if ckpt else 0)
    trainer.train(resume_from_checkpoint=ckpt)
    save_model(trainer, cfg, prep)
    return out


def save_model(trainer, cfg: VRPOConfig, prep: dict) -> None:
    """safetensors model (LoRA merged; the adapter kept in OUT/adapter), tokenizer, model card."""
    from vrpo.train.model_card import model_card

    out = Path(cfg.out)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_world_process_zero():
        return
    if cfg.lora_r > 0:
        model.save_pretrained(out / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    prep["tokenizer"].save_pretrained(out)
    final = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    atomic_write_text(out / "README.md", model_card(cfg, prep, final))
