"""vrpo train: the packed loss equals an independent per-sequence computation; the run
folder, metrics, TensorBoard, resume, provenance checks, LoRA and bad input."""
import json
import math

import pytest
import torch

from tests.pipeline_helpers import tiny_model_dir, write_pairs, write_scored
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


def test_packed_vrpo_loss_equals_an_independent_loop(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from vrpo.data import load_preferences
    from vrpo.train.collator import PreferenceCollator, build_features
    from vrpo.train.methods import METHODS
    from vrpo.train.reference import compute_reference_logps
    from vrpo.train.trainer import VRPOTrainer

    path, K, beta = tiny_model_dir(), 3, 0.5
    tok = AutoTokenizer.from_pretrained(path)
    rows = load_preferences(write_scored(tmp_path / "d.jsonl", n=2, k=K)).to_list()
    cfg = VRPOConfig(method="vrpo", beta=beta, **{k: v for k, v in FAST.items() if k.startswith("max")})
    feats = build_features(rows, tok, cfg, with_reference=True, num_ref_samples=K)
    ref = AutoModelForCausalLM.from_pretrained(path)
    lp = compute_reference_logps(ref, feats, tok.pad_token_id, batch_size=4)
    for i, f in enumerate(feats):
        f.update(ref_chosen_logps=lp["chosen"][i], ref_rejected_logps=lp["rejected"][i], ref_logps=lp["samples"][str(i)])
    batch = PreferenceCollator(tok.pad_token_id, True)(feats)
    assert batch["input_ids"].shape[0] == 2 * (2 + K) and batch["ref_aux_prob"].shape == (2, K, K)

    policy = _perturbed(path)
    trainer = VRPOTrainer(model=policy, args=TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none",
                                                                use_cpu=True), method=METHODS["vrpo"], vrpo_config=cfg)
    packed = trainer.compute_loss(policy, batch).item()

    # independent: one unpadded forward per sequence, the VRPO formula written out with loops
    f = lambda z: math.log1p(math.exp(-z))  # noqa: E731  -log sigmoid(z)
    soft = lambda z, p: p * f(z) + (1 - p) * f(-z)  # noqa: E731
    ref.eval()
    total = 0.0
    with torch.no_grad():
        for feat in feats:
            r = lambda pid, cid: beta * float(_loop_logp(policy, pid, cid) - _loop_logp(ref, pid, cid))  # noqa: E731
            z = r(feat["prompt_ids"], feat["chosen_ids"]) - r(feat["prompt_ids"], feat["rejected_ids"])
            rr = [r(feat["ref_prompt_ids"], ids) for ids in feat["ref_ids"]]
            pairs = [(j, k) for j in range(K) for k in range(j + 1, K)]
            ref_term = sum(soft(rr[j] - rr[k], feat["ref_aux_prob"][j][k]) for j, k in pairs) / len(pairs)
            total += f(z) - soft(z, feat["aux_prob"]) + ref_term
    assert packed == pytest.approx(total / len(feats), abs=1e-5)


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
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.data import tokenize_completions
    from vrpo.provenance import write_manifest
    from vrpo.sampling import sequence_logps_under

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    table = []
    for r in rows:
        p, cs = tokenize_completions(tok, r["prompt"], r["ref_samples"], max_length=64, max_prompt_length=32)
        lps = sequence_logps_under(model, [p] * len(cs), cs, tok.pad_token_id)
        table.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "samples": r["ref_samples"],
                      "ref_logps": [x + logps_shift for x in lps]})
    folder = tmp_path / f"samples-{fingerprint[:4]}-{logps_shift}-{from_ref}"
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table), folder / "samples.parquet")
    write_manifest(folder, {"model_fingerprint": fingerprint, "from_reference_policy": from_ref,
                            "not_reference_reason": None if from_ref else "temperature 0.7"})
    return folder


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
        (["--method", "nope", "--data", str(pairs)], "--method nope: unknown"),
        (["--method", "dpo", "--data", str(pairs), "--max-prompt-length", "2"], "row 0: prompt has"),
    ]
    capsys.readouterr()  # drop the tiny model's build output
    for extra, message in cases:
        argv = ["train", "--model", model, "--out", str(tmp_path / "o"), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may precede it
        assert err.startswith("vrpo train: error: ") and message in err, (extra, err)


def test_config_file_and_flag_precedence(tmp_path):
    import argparse

    from vrpo.train.cli import add_arguments, config_from_args

    (tmp_path / "c.yaml").write_text("method: dpo\nbeta: 0.3\nmax-length: 128\nreport_to: [tensorboard]\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(tmp_path / "c.yaml"), "--beta", "0.2", "--model", "m",
                                         "--data", "d", "--out", "o", "--no-disable-dropout"]))
    assert (cfg.method, cfg.beta, cfg.max_length, cfg.report_to, cfg.disable_dropout) == ("dpo", 0.2, 128, ["tensorboard"], False)
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
