"""vrpo train: the packed loss equals an independent per-sequence computation; the run
folder, metrics, TensorBoard, resume, provenance checks, LoRA and bad input."""
import json
import math

import pytest
import torch

from tests.pipeline_helpers import tiny_model_dir, write_pairs, write_samples_folder, write_scored
from vrpo.train import VRPOConfig, train

FAST = dict(per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, max_length=64, max_prompt_length=32)


def _perturbed(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _loop_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[t - 1, ids[0, t]] for t in range(len(prompt_ids), ids.shape[1]))


def test_packed_vrpo_loss_and_gradients_equal_an_independent_loop(tmp_path):
    """B = 4 prompts, K = 3 reference samples, one sample masked out: the trainer's loss on one
    packed, padded forward pass and its gradient w.r.t. every policy parameter equal those of
    the VRPO formula written out with loops over unpadded sequences (one forward each)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from vrpo.data import load_preferences
    from vrpo.train.collator import PreferenceCollator, build_features
    from vrpo.train.methods import METHODS
    from vrpo.train.reference import compute_reference_logps
    from vrpo.train.trainer import VRPOTrainer

    path, B, K, beta = tiny_model_dir(), 4, 3, 0.5
    tok = AutoTokenizer.from_pretrained(path)
    rows = load_preferences(write_scored(tmp_path / "d.jsonl", n=B, k=K)).to_list()
    cfg = VRPOConfig(method="vrpo", beta=beta, **{k: v for k, v in FAST.items() if k.startswith("max")})
    feats = build_features(rows, tok, cfg, with_reference=True, num_ref_samples=K)
    ref = AutoModelForCausalLM.from_pretrained(path)
    lp = compute_reference_logps(ref, feats, tok.pad_token_id, batch_size=4)
    for i, f in enumerate(feats):
        f.update(ref_chosen_logps=lp["chosen"][i], ref_rejected_logps=lp["rejected"][i], ref_logps=lp["samples"][str(i)])
    batch = PreferenceCollator(tok.pad_token_id, True)(feats)
    assert batch["input_ids"].shape[0] == B * (2 + K) and batch["ref_aux_prob"].shape == (B, K, K)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[2, 1] = False  # row 2 has only samples 0 and 2: one pair
    batch["ref_mask"] = mask

    policy = _perturbed(path)
    trainer = VRPOTrainer(model=policy, args=TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none",
                                                                use_cpu=True), method=METHODS["vrpo"], vrpo_config=cfg)
    packed = trainer.compute_loss(policy, batch)
    packed_grads = torch.autograd.grad(packed, list(policy.parameters()), allow_unused=True)

    # independent: one unpadded forward per sequence, the VRPO formula written out with loops
    f = lambda z: torch.nn.functional.softplus(-z)  # noqa: E731  -log sigmoid(z)
    soft = lambda z, p: p * f(z) + (1 - p) * f(-z)  # noqa: E731
    ref.eval()
    with torch.no_grad():
        ref_lp = {}
        for i, feat in enumerate(feats):
            ref_lp[i] = ([_loop_logp(ref, feat["prompt_ids"], feat["chosen_ids"]),
                          _loop_logp(ref, feat["prompt_ids"], feat["rejected_ids"])],
                         [_loop_logp(ref, feat["ref_prompt_ids"], ids) for ids in feat["ref_ids"]])
    total = 0.0
    for i, feat in enumerate(feats):
        r = lambda pid, cid, ref_value: beta * (_loop_logp(policy, pid, cid) - ref_value)  # noqa: E731
        z = r(feat["prompt_ids"], feat["chosen_ids"], ref_lp[i][0][0]) - r(feat["prompt_ids"], feat["rejected_ids"],
                                                                            ref_lp[i][0][1])
        rr = [r(feat["ref_prompt_ids"], ids, ref_lp[i][1][j]) for j, ids in enumerate(feat["ref_ids"])]
        pairs = [(j, k) for j in range(K) for k in range(j + 1, K) if mask[i, j] and mask[i, k]]
        ref_term = sum(soft(rr[j] - rr[k], feat["ref_aux_prob"][j][k]) for j, k in pairs) / len(pairs)
        total = total + f(z) - soft(z, feat["aux_prob"]) + ref_term
    loop = total / B
    loop_grads = torch.autograd.grad(loop, list(policy.parameters()), allow_unused=True)
    assert packed.item() == pytest.approx(loop.item(), abs=1e-5)
    checked = 0
    for (name, _), a, b in zip(policy.named_parameters(), packed_grads, loop_grads):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked > 10 and max(g.abs().max().item() for g in packed_grads if g is not None) > 1e-4


def test_run_folder_metrics_tensorboard_and_model(tmp_path):
    out = tmp_path / "run"
    train(VRPOConfig(method="dpo", model=str(tiny_model_dir()), data=str(write_pairs(tmp_path / "d.jsonl", n=4)),
                     out=str(out), max_steps=2, report_to=["tensorboard"], **FAST))
    for name in ("config.yaml", "versions.json", "manifests/provenance.json", "model.safetensors", "README.md",
                 "tokenizer.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = pi_ref at step 1: all rewards 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in first
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"
    card = (out / "README.md").read_text()
    assert "--method dpo" in card and "sha256" in card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)


def test_resume_gives_the_same_loss_trajectory(tmp_path):
    data = write_scored(tmp_path / "d.jsonl", n=8)
    cfg = lambda out: VRPOConfig(method="vrpo", model=str(tiny_model_dir()), data=str(data), out=str(out),  # noqa: E731
                                 max_steps=4, save_steps=2, cache_dir=str(tmp_path / "cache"), **FAST)
    train(cfg(tmp_path / "straight"))
    from transformers import TrainerCallback

    class KillAt3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "killed"), callbacks=[KillAt3()])
    assert (tmp_path / "killed" / "checkpoint-2").exists()
    train(cfg(tmp_path / "killed"))
    read = lambda d: [(r["step"], r["loss"], r["vrpo/control_variate"])  # noqa: E731
                      for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    straight, resumed = read("straight"), read("killed")
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
    for (s1, l1, c1), (s2, l2, c2) in zip(straight, resumed):
        assert l1 == pytest.approx(l2, abs=1e-6) and c1 == pytest.approx(c2, abs=1e-6)


def _samples_dir(tmp_path, rows, fingerprint, logps_shift=0.0, from_ref=True):
    """A samples folder as `vrpo sample` writes it, with exact log-probs (shifted to corrupt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.data import tokenize_completions
    from vrpo.sampling import sequence_logps_under

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    table = []
    for r in rows:
        p, cs = tokenize_completions(tok, r["prompt"], r["ref_samples"], max_length=64, max_prompt_length=32)
        lps = sequence_logps_under(model, [p] * len(cs), cs, tok.pad_token_id)
        table.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "samples": r["ref_samples"],
                      "ref_logps": [x + logps_shift for x in lps]})
    return write_samples_folder(tmp_path / f"samples-{fingerprint[:4]}-{logps_shift}-{from_ref}", table,
                                model_fingerprint=fingerprint, from_reference_policy=from_ref,
                                not_reference_reason=None if from_ref else "temperature 0.7")


def test_provenance_mismatch_refused_unless_allowed(tmp_path):
    from vrpo.data import load_preferences
    from vrpo.provenance import fingerprint_model

    data = write_scored(tmp_path / "d.jsonl", n=2)
    rows = load_preferences(data).to_list()
    fp = fingerprint_model(tiny_model_dir())
    base = dict(method="vrpo", model=str(tiny_model_dir()), data=str(data), max_steps=1, **FAST)
    with pytest.raises(ValueError, match="reference samples were drawn from model 0000"):
        train(VRPOConfig(out=str(tmp_path / "a"), samples=str(_samples_dir(tmp_path, rows, "0" * 64)), **base))
    with pytest.raises(ValueError, match="not drawn from pi_ref itself .temperature 0.7"):
        train(VRPOConfig(out=str(tmp_path / "b"), samples=str(_samples_dir(tmp_path, rows, fp, from_ref=False)), **base))
    with pytest.raises(ValueError, match="stored reference log-probs of the samples differ"):
        train(VRPOConfig(out=str(tmp_path / "c"), samples=str(_samples_dir(tmp_path, rows, fp, logps_shift=0.5)), **base))
    out = train(VRPOConfig(out=str(tmp_path / "d"), samples=str(_samples_dir(tmp_path, rows, "0" * 64)),
                           allow_reference_mismatch=True, **base))
    allowed = json.loads((out / "manifests" / "provenance.json").read_text())["allowed_mismatches"]
    assert allowed and "0000" in allowed[0] and "0000" in (out / "README.md").read_text()


def test_bad_input_one_line_errors(tmp_path, capsys):
    from vrpo.cli import main

    model, pairs, scored = str(tiny_model_dir()), write_pairs(tmp_path / "p.jsonl", aux=False), write_scored(tmp_path / "s.jsonl")
    cases = [
        (["--method", "vrpo", "--data", str(scored), "--num-ref-samples", "5"], "fewer than --num-ref-samples 5"),
        (["--method", "vrpo", "--data", str(pairs)], "row 0 has 0 reference samples"),
        (["--method", "dpo", "--data", str(pairs), "--model", str(tmp_path / "nowhere")], "not a local model folder"),
        (["--method", "nope", "--data", str(pairs)], "argument --method: invalid choice: 'nope'"),
        (["--method", "dpo", "--data", str(pairs), "--max-prompt-length", "2"], "row 0: prompt has"),
        # training that trains nothing, and numbers that make no sense, stop at the flag
        (["--method", "dpo", "--data", str(pairs), "--max-steps", "0"], "argument --max-steps: '0': expected a positive"),
        (["--method", "dpo", "--data", str(pairs), "--num-train-epochs", "0"], "argument --num-train-epochs: '0'"),
        (["--method", "dpo", "--data", str(pairs), "--learning-rate", "-1e-5"], "argument --learning-rate"),
        (["--method", "dpo", "--data", str(pairs), "--training-args", "[1]"], "expected a JSON object"),
        (["--method", "cdpo", "--data", str(pairs), "--label-smoothing", "0.5"], "expected a rate in [0, 0.5)"),
    ]
    capsys.readouterr()  # drop the tiny model's build output
    for extra, message in cases:
        argv = ["train", "--model", model, "--out", str(tmp_path / "o"), *extra]
        try:
            code = main(argv)
        except SystemExit as e:  # the argument parser's own one-line errors
            code = e.code
        assert code == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may precede it
        assert err.startswith("vrpo train: error: ") and message in err, (extra, err)


def test_config_file_and_flag_precedence(tmp_path):
    import argparse

    from vrpo.train.cli import add_arguments, config_from_args

    (tmp_path / "c.yaml").write_text("method: dpo\nbeta: 0.3\nmax-length: 384\nreport_to: [tensorboard]\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(tmp_path / "c.yaml"), "--beta", "0.2", "--model", "m",
                                         "--data", "d", "--out", "o", "--no-disable-dropout"]))
    assert (cfg.method, cfg.beta, cfg.max_length, cfg.report_to, cfg.disable_dropout) == ("dpo", 0.2, 384, ["tensorboard"], False)
    (tmp_path / "bad.yaml").write_text("betta: 0.3\n")
    with pytest.raises(ValueError, match="unknown setting 'betta'"):
        config_from_args(p.parse_args(["--config", str(tmp_path / "bad.yaml")]))


@pytest.mark.filterwarnings("error::FutureWarning", "error:fan_in_fan_out:UserWarning")  # no per-run noise
def test_lora_saves_adapter_and_merged_model(tmp_path):
    pytest.importorskip("peft")
    out = train(VRPOConfig(method="dpo", model=str(tiny_model_dir()), data=str(write_pairs(tmp_path / "d.jsonl", n=2)),
                           out=str(tmp_path / "lora"), max_steps=1, lora_r=4, lora_target_modules=["c_attn"], **FAST))
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_labelled_pairs_from_another_model_are_refused(tmp_path):
    from vrpo.provenance import write_manifest

    folder = tmp_path / "labelled"
    folder.mkdir()
    write_pairs(folder / "pairs.jsonl", n=2)
    write_manifest(folder, {"kind": "labelled_pairs", "samples_manifest": {"model_fingerprint": "f" * 64,
                                                                            "from_reference_policy": True}})
    with pytest.raises(ValueError, match="labelled pairs were drawn from model ffff"):
        train(VRPOConfig(method="dpo", model=str(tiny_model_dir()), data=str(folder), out=str(tmp_path / "o"),
                         max_steps=1, **FAST))


def test_training_arguments_are_built_once_for_both_stages(tmp_path):
    """vrpo train and vrpo train-rm share one TrainingArguments builder: same CPU defaults,
    their own extras, --training-args wins, and a bad one is a one-line error naming the flag."""
    from vrpo.train import VRPOConfig
    from vrpo.train.reward_model import RewardModelConfig

    policy = VRPOConfig(learning_rate=3e-4, seed=7, bf16=False).training_arguments(tmp_path / "a")
    reward = RewardModelConfig(learning_rate=3e-4, seed=7).training_arguments(tmp_path / "b")
    for targs in (policy, reward):
        assert targs.learning_rate == 3e-4 and targs.seed == 7 and targs.remove_unused_columns is False
        if not torch.cuda.is_available():
            assert targs.use_cpu and targs.dataloader_pin_memory is False
    assert reward.data_seed == 7 and policy.data_seed is None  # the policy's data order is unchanged
    assert VRPOConfig(training_args={"optim": "sgd"}).training_arguments(tmp_path).optim == "sgd"
    with pytest.raises(ValueError, match="^--training-args: ") as e:
        VRPOConfig(training_args={"no_such_argument": 1}).training_arguments(tmp_path)
    assert "\n" not in str(e.value)


def test_reference_pass_runs_on_the_training_device(tmp_path, monkeypatch):
    """The one reference pass runs where the process trains (its GPU under accelerate/DDP,
    here the CPU), not wherever from_pretrained left the model."""
    import vrpo.sampling
    from vrpo.train.run import prepare

    seen = []
    original = vrpo.sampling.sequence_logps_under

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).device)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(vrpo.sampling, "sequence_logps_under", spy)
    import vrpo.train.reference as reference

    asked, attach = [], reference.attach_reference_logps
    monkeypatch.setattr(reference, "attach_reference_logps",
                        lambda *a, **kw: asked.append(kw.get("device")) or attach(*a, **kw))
    cfg = VRPOConfig(model=str(tiny_model_dir()), data=str(write_scored(tmp_path / "d.jsonl", n=2, k=2)),
                     out=str(tmp_path / "run"), method="vrpo", **FAST).validate()
    targs = cfg.training_arguments(cfg.out)
    prepare(cfg, targs)
    assert asked == [targs.device]  # the process's device is passed on (a GPU on a GPU machine)
    assert seen and all(d == targs.device for d in seen)


# --------------------------------------------------------------------------- nothing silently wrong
def test_a_run_folder_is_resumed_only_by_the_same_inputs(tmp_path, capsys):
    """A VRPO run's folder, then `--method dpo --learning-rate 1e-3` into it: refused in one line
    naming what differs (it used to resume the VRPO checkpoint under the DPO name). --overwrite
    starts over; config.yaml and the model card then hold only what applies to DPO."""
    from vrpo.cli import main

    out = tmp_path / "run"
    data = write_scored(tmp_path / "d.jsonl", n=4)
    common = ["--model", str(tiny_model_dir()), "--data", str(data), "--out", str(out), "--max-steps", "1",
              "--per-device-train-batch-size", "2", "--max-length", "64", "--max-prompt-length", "32"]
    assert main(["train", "--method", "vrpo", *common]) == 0
    capsys.readouterr()
    assert main(["train", "--method", "dpo", "--learning-rate", "1e-3", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "method: vrpo -> dpo; learning_rate: 1e-05 -> 0.001" in err and "--overwrite" in err, err
    assert main(["train", "--method", "dpo", "--learning-rate", "1e-3", "--overwrite", *common]) == 0
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "dpo" and config["learning_rate"] == 1e-3
    assert not {"flip_rate", "label_smoothing", "control_variate_coef", "num_ref_samples", "samples"} & set(config)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "flip" not in card and "# DPO fine-tune" in card
    capsys.readouterr()
    assert main(["train", "--method", "dpo", "--learning-rate", "1e-3", "--logging-steps", "5", *common]) == 0  # resumes


def test_cdpo_card_states_its_epsilon(tmp_path):
    out = train(VRPOConfig(method="cdpo", label_smoothing=0.2, model=str(tiny_model_dir()),
                           data=str(write_pairs(tmp_path / "d.jsonl", n=2)), out=str(tmp_path / "c"), max_steps=1, **FAST))
    card = (out / "README.md").read_text()
    assert "- label_smoothing = 0.2: cDPO's epsilon" in card and "flip_rate" not in card
    assert "label_smoothing: 0.2" in (out / "config.yaml").read_text()


def test_config_values_are_checked_like_flags():
    """The Python API and config files obey the flags' rules: no run that trains nothing."""
    for bad, message in [(dict(max_steps=0), "--max-steps 0: expected a positive number of optimiser steps, or -1"),
                         (dict(num_train_epochs=0), "--num-train-epochs 0"), (dict(learning_rate=-1.0), "--learning-rate"),
                         (dict(training_args=[1]), "--training-args"), (dict(flip_rate=0.5), "--flip-rate 0.5"),
                         (dict(lr_scheduler_type="sometimes"), "--lr-scheduler-type sometimes: unknown"),
                         (dict(method="ppo"), "--method ppo: unknown"), (dict(max_length=128), "--max-prompt-length 256")]:
        with pytest.raises(ValueError, match=message):
            VRPOConfig(model="m", data="d", out="o", **bad).validate()
    from vrpo.train.reward_model import RewardModelConfig

    with pytest.raises(ValueError, match="--max-steps 0"):
        RewardModelConfig(model="m", data="d", out="o", max_steps=0).validate()


def test_identical_pairs_are_dropped_counted_and_reported(tmp_path, capsys):
    from vrpo.cli import main

    rows = [json.loads(line) for line in write_pairs(tmp_path / "d.jsonl", n=4).read_text().splitlines()]
    rows[1]["rejected"] = rows[1]["chosen"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--method", "dpo", "--model", str(tiny_model_dir()), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--max-length", "64", "--max-prompt-length", "32"]) == 0
    assert "trained on 3 pairs; dropped 1 of 4 whose chosen and rejected responses are identical" in capsys.readouterr().out
    prov = json.loads((tmp_path / "run" / "manifests" / "provenance.json").read_text())
    assert prov["data_checks"]["dropped_identical_pairs"] == 1 and prov["num_examples"] == 3


def test_a_sequence_longer_than_the_model_context_is_refused_before_any_forward_pass(tmp_path, capsys):
    """The tiny model has 128 positions; --max-length 512 (the default) lets a long prompt
    through the tokeniser, but not into the model."""
    from vrpo.cli import main

    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "The movie was great. " * 30, "chosen": " yes",
                                                  "rejected": " no"}) + "\n")
    rc = main(["train", "--method", "dpo", "--model", str(tiny_model_dir()), "--data", str(tmp_path / "d.jsonl"),
               "--out", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "row 0 (chosen): " in err and "exceed the model's context of 128 positions" in err, err


def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path, capsys):
    from vrpo.cli import main

    argv = ["train", "--method", "dpo", "--model", str(tiny_model_dir()), "--data", str(write_pairs(tmp_path / "d.jsonl",
            n=4)), "--out", str(tmp_path / "run"), "--max-steps", "2", "--save-steps", "1", "--max-length", "64",
            "--max-prompt-length", "32", "--per-device-train-batch-size", "2"]
    assert main(argv) == 0
    weights = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-2: model.safetensors is damaged" in err and "--overwrite" in err, err


def test_stored_log_probs_are_spot_checked_across_the_whole_table():
    from vrpo.train.reference import spot_check_positions

    picked = spot_check_positions(1000, 8, seed=3)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 999 and len(set(picked)) == 8
    assert max(picked) - min(picked) == 999 and sum(p > 500 for p in picked) >= 2  # not just the first rows
    assert spot_check_positions(5, 8) == [0, 1, 2, 3, 4]
