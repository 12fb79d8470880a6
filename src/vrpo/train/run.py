"""``train(config)``: one training run from a preference file to a saved model, read top to bottom.

    claim OUT (reused only for the same inputs) -> data -> (reference samples) -> provenance check
         -> features (each fits the model's context) -> reference log-probs (cached)
         -> VRPOTrainer (resumes from the last checkpoint) -> model + model card + run record
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vrpo._warnings import third_party_deprecations_silenced
from vrpo.provenance import (atomic_write_json, atomic_write_text, check_reference, fingerprint_data, fingerprint_model,
                             fingerprint_tokenizer, package_versions, read_manifest)
from vrpo.sampling import context_length
from vrpo.train.config import NOT_RESULT_SETTINGS, VRPOConfig
from vrpo.train.methods import METHODS

LABELLED_PAIRS = "pairs.jsonl"  # what `vrpo label` writes
SAMPLE_LOGP_TOLERANCE = 1e-3  # nats; stored vs recomputed reference log-probs of the same sequence


def load_training_rows(cfg: VRPOConfig, tokenizer) -> tuple[list[dict], dict]:
    """Canonical rows (a `vrpo score` folder, a `vrpo label` folder or any preference file)
    and the manifests met. Rows whose chosen == rejected are dropped (counted in
    ``manifests["data_checks"]``, with the reference samples that hit the sampler's length limit)."""
    from vrpo.data import drop_identical_pairs, load_preferences
    from vrpo.errors import check_readable

    data = check_readable(cfg.data, "--data", "a preference file or a `vrpo score` / `vrpo label` folder")
    manifests: dict = {}
    if data.is_dir() and (data / "data.parquet").exists():  # a `vrpo score` folder
        manifests["scored_data"] = check_scored_folder(data)
        rows = load_preferences(data / "data.parquet", tokenizer).to_list()
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
    total = len(rows)
    rows, dropped = drop_identical_pairs(rows, str(cfg.data))
    truncated = sum(sum(bool(t) for t in (r.get("ref_truncated") or [])) for r in rows)
    manifests["data_checks"] = {"pairs": total, "dropped_identical_pairs": dropped,
                                "truncated_reference_samples": truncated}
    return rows, manifests


def check_scored_folder(folder: Path) -> dict:
    """The manifest of a `vrpo score` folder, once its table is checked against the sha256 the
    manifest recorded: the reference log-probs of the samples travel in that table."""
    from vrpo.errors import UserError
    from vrpo.provenance import file_sha256

    manifest = read_manifest(folder)
    recorded = manifest.get("table_sha256")
    if not recorded:
        raise UserError(f"--data {folder}: its manifest.json records no table_sha256 (written by hand or by an older "
                        "vrpo); rerun `vrpo score`")
    actual = file_sha256(folder / "data.parquet")
    if actual != recorded:
        raise UserError(f"--data {folder}: data.parquet has sha256 {actual[:12]}, its manifest recorded {recorded[:12]} "
                        "when `vrpo score` wrote it (edited or damaged since); score again")
    return manifest


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
    for path in dict.fromkeys((cfg.model, ref_path)):  # before any model runs: IndexError in the embedding otherwise
        check_features_fit(features, context_length(path, trust_remote_code=cfg.trust_remote_code), cfg.data)
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
                  "num_ref_samples": k, "allowed_mismatches": problems, "reference_logps": ref_info,
                  "data_checks": manifests["data_checks"]}
    return {"tokenizer": tokenizer, "features": features, "manifests": manifests, "provenance": provenance, "k": k}


def check_features_fit(features: list[dict], context: int | None, source: str) -> None:
    """Every prompt + response (chosen, rejected, reference samples) fits the model's context,
    or a one-line error naming the row, before any forward pass."""
    from vrpo.sampling import check_fits_context

    hint = "lower --max-length (responses are then cut) or --max-prompt-length (with --prompt-truncation left)"
    for i, f in enumerate(features):
        for prompt, key in (("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids"), ("ref_prompt_ids", "ref_ids")):
            if key not in f:
                continue
            completions = f[key] if key == "ref_ids" else [f[key]]
            longest = max(len(c) for c in completions) if completions else 0
            check_fits_context(len(f[prompt]) + longest, context, f"{source}: row {i} ({key[:-4]})", hint)


def write_run_record(cfg: VRPOConfig, prep: dict) -> None:
    import yaml

    out = Path(cfg.out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.applied_settings(), sort_keys=False))
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


def run_inputs(cfg: VRPOConfig) -> dict:
    """Everything that determines a run's result (the reuse record of ``out``): the settings
    that apply to its method (``applied_settings``) but those that cannot change the result
    (``NOT_RESULT_SETTINGS``), the model, tokenizer, data and samples by fingerprint, and the
    number of processes (it sets the global batch)."""
    import os

    from vrpo.sampling import check_model_folder, samples_fingerprint

    settings = {k: v for k, v in cfg.applied_settings().items() if k not in NOT_RESULT_SETTINGS}
    check_model_folder(cfg.model, "--model")
    settings["model"] = fingerprint_model(cfg.model)
    settings["tokenizer"] = fingerprint_tokenizer(cfg.model)
    if cfg.ref_model:
        settings["ref_model"] = fingerprint_model(check_model_folder(cfg.ref_model, "--ref-model"))
    from vrpo.errors import check_readable

    settings["data"] = fingerprint_data(check_readable(cfg.data, "--data", "a preference file or folder"))
    if settings.get("samples"):
        settings["samples"] = samples_fingerprint(cfg.samples)
    settings["num_processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    return settings


def train(config: VRPOConfig | dict, callbacks: Sequence = (), *, overwrite: bool = False) -> Path:
    """Train and save a model into ``config.out``. A folder made from the same inputs
    (``run_inputs``) resumes from its last checkpoint; one made from others is refused in one
    line naming what differs, unless ``overwrite`` (then it starts over). Returns the run folder."""
    import contextlib
    import os

    from vrpo.outputs import claim_output, folder_lock

    cfg = (VRPOConfig.from_dict(config) if isinstance(config, dict) else config).validate()
    out = Path(cfg.out)
    main = int(os.environ.get("RANK", "0")) == 0
    inputs = run_inputs(cfg)  # before anything heavy: a bad path or folder is a one-line error now
    with folder_lock(out, "train") if main else contextlib.nullcontext():
        claim_output(out, "train", inputs, overwrite=overwrite)
        return _train_into(cfg, out, callbacks)


def _train_into(cfg: VRPOConfig, out: Path, callbacks: Sequence) -> Path:
    from vrpo.train.reward_run import check_checkpoint
    from vrpo.train.trainer import truncate_metrics

    targs = cfg.training_arguments(cfg.out)
    prep = prepare(cfg, targs)
    if targs.process_index == 0:
        write_run_record(cfg, prep)
    ckpt = last_checkpoint(out)
    if ckpt:
        check_checkpoint(ckpt)
    trainer = build_trainer(cfg, targs, prep, callbacks)
    if targs.process_index == 0:
        truncate_metrics(out / "metrics.jsonl", int(ckpt.rsplit("-", 1)[1]) if ckpt else 0)
    trainer.train(resume_from_checkpoint=ckpt)
    save_model(trainer, cfg, prep)
    return out


def summary_line(out: str | Path) -> str:
    """One line on what the data checks did (for the command's output)."""
    import json

    checks = json.loads((Path(out) / "manifests" / "provenance.json").read_text()).get("data_checks") or {}
    n, dropped, cut = checks.get("pairs", 0), checks.get("dropped_identical_pairs", 0), \
        checks.get("truncated_reference_samples", 0)
    parts = [f"trained on {n - dropped} pairs"]
    parts.append(f"dropped {dropped} of {n} whose chosen and rejected responses are identical (no preference)"
                 if dropped else "none dropped")
    if cut:
        parts.append(f"{cut} reference samples had hit the sampler's length limit without EOS and were used as "
                     "drawn, without EOS")
    return "; ".join(parts)


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
