"""The training step: the two-pass step (``sequences_per_pass``) and shared-prompt rows give the
one-pass step's loss, metrics and every parameter's gradient (to 1e-6 relative, float64,
dropout off) for DPO and VRPO with reference-sample masks, K = 2..8, LoRA and full
fine-tuning, gradient accumulation, the reward-model trainer, and 2 CPU processes; dropout
masks are replayed; float32 master weights for bf16 checkpoints and --bf16 autocast."""
import functools
import json
import os
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pipeline_helpers import tiny_model_dir, write_pairs, write_scored
from vrpo.errors import UserError
from vrpo.train import VRPOConfig, train

SHORT = dict(max_length=64, max_prompt_length=32)


def _features(tmp_path, method: str, k: int | None, n: int = 4):
    feats, tok = _cached_features(method, k, n)
    return [dict(f) for f in feats], tok


@functools.lru_cache(maxsize=None)
def _cached_features(method: str, k: int | None, n: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.data import load_preferences
    from vrpo.train.collator import build_features
    from vrpo.train.reference import compute_reference_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    folder = Path(tempfile.mkdtemp(prefix="vrpo-step-"))
    data = write_scored(folder / "d.jsonl", n=n, k=k) if k else write_pairs(folder / "d.jsonl", n=n)
    cfg = VRPOConfig(method=method, **SHORT)
    feats = build_features(load_preferences(data).to_list(), tok, cfg, with_reference=k is not None,
                           num_ref_samples=k)
    lp = compute_reference_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir()), feats, tok.pad_token_id, 64)
    for i, f in enumerate(feats):
        f.update(ref_chosen_logps=lp["chosen"][i], ref_rejected_logps=lp["rejected"][i])
        if k:
            f["ref_logps"] = lp["samples"][str(i)]
    return feats, tok


def _policy(lora: bool, dropout: bool = False):
    """The tiny GPT-2 in float64, moved away from pi_ref (LoRA's B included, else its A has no gradient)."""
    from transformers import AutoModelForCausalLM

    from vrpo.train.run import _apply_lora, _disable_dropout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    if not dropout:
        _disable_dropout(model)
    if lora:
        model = _apply_lora(model, VOCAB_LORA)
    model = model.double()
    with torch.no_grad():
        for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype))
    return model


VOCAB_LORA = VRPOConfig(lora_r=4, lora_target_modules=["c_attn", "c_fc"])


def _trainer(model, method: str, tmp_path, **cfg):
    from transformers import TrainingArguments

    from vrpo.train.methods import METHODS
    from vrpo.train.trainer import VRPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    return VRPOTrainer(model=model, args=args, method=METHODS[method], vrpo_config=VRPOConfig(method=method, **cfg))


def _step(trainer, batches, sequences_per_pass):
    """Gradients, losses and metric averages of one optimisation step over ``batches``
    (gradient accumulation when there are several)."""
    trainer.sequences_per_pass = sequences_per_pass
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = len(batches)
    losses = [float(trainer.training_step(trainer.model, dict(b))) for b in batches]
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return grads, losses, trainer._pop_metric_averages()


def _assert_same_step(a, b, rel=1e-6):
    grads_a, losses_a, metrics_a = a
    grads_b, losses_b, metrics_b = b
    assert losses_a == pytest.approx(losses_b, rel=1e-9)
    assert metrics_a.keys() == metrics_b.keys() and metrics_a == pytest.approx(metrics_b, rel=1e-9)
    assert grads_a.keys() == grads_b.keys()
    # the batch trains (nearly) every parameter (a reward model's final bias moves all scores alike: none)
    assert sum(bool(g.abs().max() > 0) for g in grads_a.values()) >= len(grads_a) - 1
    for name in grads_a:
        assert (grads_b[name] - grads_a[name]).abs().max() <= rel * grads_a[name].abs().max(), name


def _collate(feats, tok, k, share_prompt=False):
    from vrpo.train.collator import PreferenceCollator

    batch = PreferenceCollator(tok.pad_token_id, k is not None, share_prompt)(feats)
    if k:  # a reference-sample mask: the last sample of every other prompt is invalid (K > 2)
        mask = torch.ones(len(feats), k, dtype=torch.bool)
        if k > 2:
            mask[::2, -1] = False
        batch["ref_mask"] = mask
    return batch


CASES = [("dpo", None), ("vrpo", 2), ("vrpo", 3), ("vrpo", 5), ("vrpo", 8)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method,k", CASES, ids=[f"{m}-K{k}" for m, k in CASES])
def test_two_passes_and_shared_prompts_give_the_one_pass_gradients(tmp_path, method, k, lora):
    feats, tok = _features(tmp_path, method, k)
    trainer = _trainer(_policy(lora), method, tmp_path)
    plain, shared = _collate(feats, tok, k), _collate(feats, tok, k, share_prompt=True)
    one_pass = _step(trainer, [plain], None)
    assert one_pass[2]["rewards/margins"] != 0
    per_prompt = 2 + (k or 0)
    _assert_same_step(one_pass, _step(trainer, [plain], per_prompt + 1))  # 4 chunks, cut inside prompts
    _assert_same_step(one_pass, _step(trainer, [shared], None))
    _assert_same_step(one_pass, _step(trainer, [shared], 2 * per_prompt - 1))  # whole prompts: one per chunk


def test_two_passes_with_gradient_accumulation(tmp_path):
    feats, tok = _features(tmp_path, "vrpo", 3, n=6)
    trainer = _trainer(_policy(False), "vrpo", tmp_path)
    batches = [_collate(feats[:4], tok, 3), _collate(feats[4:], tok, 3)]
    one_pass = _step(trainer, batches, None)
    _assert_same_step(one_pass, _step(trainer, batches, 4))
    trainer.accelerator.gradient_state._set_sync_gradients(False)  # a non-final micro-batch of a DDP step
    try:
        _assert_same_step(one_pass, _step(trainer, batches, 4))
    finally:
        trainer.accelerator.gradient_state._set_sync_gradients(True)


def test_dropout_masks_are_replayed_in_the_gradient_pass(tmp_path, monkeypatch):
    """With dropout on, the two-pass gradient is the gradient of the loss of the first pass's
    values (the same masks, replayed per chunk); without the replay the run is refused."""
    from vrpo.sequences import assemble, row_chunks

    feats, tok = _features(tmp_path, "vrpo", 3)
    trainer = _trainer(_policy(False, dropout=True), "vrpo", tmp_path)
    batch = _collate(feats, tok, 3)
    torch.manual_seed(7)
    two_pass = _step(trainer, [batch], 4)
    # independent: the same chunks, with gradients, in the same order from the same seed, one backward
    trainer.model.zero_grad()
    torch.manual_seed(7)
    values = assemble([(c["sequence_ids"], trainer.sequence_values(trainer.model, c)) for c in row_chunks(batch, 4)])
    trainer.loss_from_values(values, batch)[0].backward()
    trainer._pop_metric_averages()
    for n, p in trainer.model.named_parameters():
        assert (p.grad - two_pass[0][n]).abs().max() <= 1e-6 * p.grad.abs().max(), n
    import vrpo.train.trainer as step

    trainer._replay_checked = False
    monkeypatch.setattr(step, "_set_rng_state", lambda state: None)
    with pytest.raises(UserError, match="--sequences-per-pass: the gradient pass recomputed other values"):
        _step(trainer, [batch], 4)


@pytest.mark.parametrize("method", ["bt", "vrpo"])
def test_reward_model_two_passes_and_shared_prompts(tmp_path, method):
    from transformers import AutoTokenizer

    from vrpo.train.collator import PreferenceCollator
    from vrpo.train.reward_model import RewardModelConfig, _build_model, _trainer_class, load_reward_features

    data = write_scored(tmp_path / "d.jsonl", n=4, k=3) if method == "vrpo" else write_pairs(tmp_path / "d.jsonl", 4)
    cfg = RewardModelConfig(method=method, model=str(tiny_model_dir()), data=str(data), out=str(tmp_path / "rm"),
                            **SHORT)
    model, tok = _build_model(cfg, AutoTokenizer.from_pretrained(tiny_model_dir()))
    model = model.double()
    feats, k, _ = load_reward_features(cfg, tok)
    trainer = _trainer_class()(model=model, args=cfg.training_arguments(tmp_path / "ck"), rm_config=cfg,
                               num_ref_samples=k)
    plain = PreferenceCollator(tok.pad_token_id, k is not None)(feats)
    shared = PreferenceCollator(tok.pad_token_id, k is not None, share_prompt=True)(feats)
    one_pass = _step(trainer, [plain], None)
    _assert_same_step(one_pass, _step(trainer, [plain], 3))
    _assert_same_step(one_pass, _step(trainer, [shared], 3))


def test_reference_pass_with_shared_prompts(tmp_path):
    from transformers import AutoModelForCausalLM

    from vrpo.train.reference import compute_reference_logps

    feats, tok = _features(tmp_path, "vrpo", 4)
    for f in feats[::2]:
        f["ref_logps"] = None  # these prompts' samples are scored by the pass too
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    plain = compute_reference_logps(model, feats, tok.pad_token_id, 5)
    shared = compute_reference_logps(model, feats, tok.pad_token_id, 5, share_prompt=True)
    assert set(plain["samples"]) == {"0", "2"} and plain.keys() == shared.keys()
    for key in ("chosen", "rejected"):
        assert shared[key] == pytest.approx(plain[key], abs=1e-5)
    for i in plain["samples"]:
        assert shared["samples"][i] == pytest.approx(plain["samples"][i], abs=1e-5)


def _saved(folder: Path, dtype) -> Path:
    """The tiny model's weights, rounded to bfloat16, saved in ``dtype`` (the same values either way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).to(torch.bfloat16).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(folder)
    return folder


def _changed_fraction(out: Path, init: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(init / "model.safetensors"))
    changed = sum(int((a[k].float() != b[k].float()).sum()) for k in a)
    return changed / sum(v.numel() for v in a.values())


def test_a_bfloat16_checkpoint_trains_with_float32_master_weights(tmp_path):
    """4 steps at lr 1e-5 from a bf16 checkpoint change as many weights as from the same
    weights stored in float32 (in pure bf16 most updates round away); --bf16 autocasts over
    float32 weights; the reference log-probs' dtype is recorded."""
    from transformers import TrainerCallback

    seen = []

    class Dtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.append({p.dtype for p in model.parameters()})

    data = write_pairs(tmp_path / "d.jsonl", n=4)
    fractions = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        init = _saved(tmp_path / f"init-{name}", dtype)
        out = train(VRPOConfig(method="dpo", model=str(init), data=str(data), out=str(tmp_path / name), max_steps=4,
                               learning_rate=1e-5, per_device_train_batch_size=2, **SHORT), callbacks=[Dtypes()])
        fractions[name] = _changed_fraction(out, init)
    assert seen == [{torch.float32}, {torch.float32}]
    assert fractions["fp32"] > 0.5 and abs(fractions["bf16"] - fractions["fp32"]) < 0.01, fractions
    out = train(VRPOConfig(method="dpo", model=str(tmp_path / "init-bf16"), data=str(data), out=str(tmp_path / "ac"),
                           max_steps=2, bf16=True, per_device_train_batch_size=2, **SHORT), callbacks=[Dtypes()])
    assert seen[-1] == {torch.float32}
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(abs(x) < 10 for x in losses)
    ref = json.loads((out / "manifests" / "provenance.json").read_text())["reference_logps"]
    assert ref["dtype"] == "float32" and ref["share_prompt"] is False


def test_gradient_accumulation_end_to_end_gives_the_same_weights(tmp_path):
    """Trainer.train with 2 micro-batches per step: one pass vs two passes with shared prompts.
    SGD, not Adam: Adam turns float32 noise in a gradient that is zero in exact arithmetic (the
    attention keys' bias) into full-size updates of either sign."""
    from safetensors.torch import load_file

    data = write_scored(tmp_path / "d.jsonl", n=8, k=3)
    common = dict(method="vrpo", model=str(tiny_model_dir()), data=str(data), max_steps=2, learning_rate=1.0,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, cache_dir=str(tmp_path / "c"),
                  training_args={"optim": "sgd"}, **SHORT)
    a = train(VRPOConfig(out=str(tmp_path / "a"), **common))
    b = train(VRPOConfig(out=str(tmp_path / "b"), sequences_per_pass=4, share_prompt=True, **common))
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    init = load_file(str(tiny_model_dir() / "model.safetensors"))
    assert max((wa[k] - init[k]).abs().max().item() for k in wa) > 1e-3  # training moved the parameters
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)
    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert [r["loss"] for r in la if "loss" in r] == pytest.approx([r["loss"] for r in lb if "loss" in r], abs=1e-6)


@pytest.mark.slow
def test_two_cpu_processes_two_passes_shared_prompts_equal_one_process_one_pass(tmp_path):
    from safetensors.torch import load_file

    data = write_scored(tmp_path / "d.jsonl", n=8)
    common = ["-m", "vrpo", "train", "--method", "vrpo", "--model", str(tiny_model_dir()), "--data", str(data),
              "--max-steps", "2", "--learning-rate", "1.0", "--max-length", "64", "--max-prompt-length", "32",
              "--cache-dir", str(tmp_path / "cache"), "--training-args", '{"optim": "sgd"}']  # see the test above
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one"), "--per-device-train-batch-size", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common, "--out",
                          str(tmp_path / "two"), "--per-device-train-batch-size", "2", "--sequences-per-pass", "3",
                          "--share-prompt"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b, init = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "one", tmp_path / "two", tiny_model_dir()))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
