"""Stage one of two-stage VRPO: reward models fitted with the Bradley-Terry or the VRPO loss."""
import json

import pytest
import torch

from vrpo import losses
from vrpo.cli import main
from vrpo.policy_stage import RewardModelScorer, load_reward_model
from vrpo.testing import build_tiny_causal_lm
from tests.pipeline_helpers import write_samples_folder
from vrpo.train.reward_model import (
    RewardModelConfig, load_reward_features, margin_variance_across_seeds, pair_margins, reward_accuracy,
    train_reward_model, unpack_rewards, _build_model, _trainer_class,
)

ROWS = [
    ("The movie was", " wonderful and great.", " terrible and boring.", [" great.", " bad.", " the worst."]),
    ("I think the film", " was beautiful.", " was the worst.", [" was fine.", " moved me.", " was bad."]),
    ("The acting was", " excellent.", " bad.", [" great.", " boring.", " wonderful."]),
    ("The story", " moved me.", " bored me.", [" was great.", " was terrible.", " was long."]),
]


def _scored_rows(n=8):
    """Scored data as `vrpo score` writes it: aux_prob and an antisymmetric K x K ref_aux_prob."""
    out = []
    for i in range(n):
        p, c, r, refs = ROWS[i % len(ROWS)]
        g = [[0.5, 0.7, 0.6], [0.3, 0.5, 0.45], [0.4, 0.55, 0.5]]
        out.append({"prompt": f"{p}" if i < len(ROWS) else f"{p} ({i})", "chosen": c, "rejected": r,
                    "aux_prob": 0.6 + 0.05 * (i % 4), "ref_samples": refs, "ref_aux_prob": g})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    model = build_tiny_causal_lm(root / "base", n_positions=128)
    scored = root / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in _scored_rows()))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                         for r in _scored_rows()))
    return {"model": model, "scored": scored, "pairs": pairs}


def _cfg(setup, tmp_path, **kw):
    base = dict(model=str(setup["model"]), data=str(setup["scored"]), out=str(tmp_path / "rm"), max_length=64,
                max_prompt_length=32, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, seed=0)
    return RewardModelConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["bt", "vrpo"])
def test_packed_loss_equals_the_loss_on_one_sequence_at_a_time(setup, tmp_path, method):
    """Independent check of packing: the trainer's loss on a collated batch equals the
    vrpo.losses function applied to rewards from separate, unpadded forward passes."""
    from vrpo.train.collator import PreferenceCollator

    cfg = _cfg(setup, tmp_path, method=method)
    model, tok = _build_model(cfg)
    model.eval()
    feats, k, _ = load_reward_features(cfg, tok)
    trainer = _trainer_class()(model=model, args=cfg.training_arguments(tmp_path / "ck"), train_dataset=feats,
                               rm_config=cfg, num_ref_samples=k)
    batch = PreferenceCollator(tok.pad_token_id, with_reference=k is not None)(feats[:3])
    with torch.no_grad():
        packed = trainer.compute_loss(model, batch)

        def r(prompt, response):
            ids = tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            return model(input_ids=torch.tensor([ids])).logits[0, 0]

        rows = _scored_rows()[:3]
        chosen = torch.stack([r(x["prompt"], x["chosen"]) for x in rows])
        rejected = torch.stack([r(x["prompt"], x["rejected"]) for x in rows])
        if method == "bt":
            expected = losses.preference_loss(chosen, rejected).mean()
        else:
            refs = torch.stack([torch.stack([r(x["prompt"], y) for y in x["ref_samples"]]) for x in rows])
            expected = losses.vrpo_loss(chosen, rejected, torch.tensor([x["aux_prob"] for x in rows]), refs,
                                        torch.tensor([x["ref_aux_prob"] for x in rows])).mean()
    assert k == (3 if method == "vrpo" else None)
    assert torch.allclose(packed, expected, atol=1e-5), (float(packed), float(expected))


def test_unpack_rewards_order():
    """Packed order: chosen (B), rejected (B), then each prompt's K references."""
    r = unpack_rewards(torch.arange(10.0), batch_size=2, k=3)
    assert r.chosen.tolist() == [0, 1] and r.rejected.tolist() == [2, 3]
    assert r.reference.tolist() == [[4, 5, 6], [7, 8, 9]]


@pytest.mark.parametrize("method", ["bt", "vrpo"])
def test_train_rm_command_end_to_end(setup, tmp_path, method):
    out = tmp_path / f"rm_{method}"
    data = setup["scored"] if method == "vrpo" else setup["pairs"]
    assert main(["train-rm", "--method", method, "--model", str(setup["model"]), "--data", str(data), "--out", str(out),
                 "--max-steps", "3", "--per-device-train-batch-size", "2", "--learning-rate", "1e-3",
                 "--logging-steps", "1", "--max-length", "64", "--max-prompt-length", "32"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert all("rewards/accuracies" in x and "rewards/margins" in x for x in steps)
    assert all(("vrpo/control_variate" in x) == (method == "vrpo") for x in steps)
    for name in ("config.yaml", "versions.json", "manifests/provenance.json", "README.md", "model.safetensors"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- vrpo\n- reward-model\n") and f"- {method}\n" in card
    # the folder is a reward model for the policy stage, and training moved it on the data
    model, tok = load_reward_model(out)
    assert model.config.num_labels == 1
    scorer = RewardModelScorer.from_pretrained(out)
    rows = _scored_rows()
    z = pair_margins(scorer, [x["prompt"] for x in rows], [x["chosen"] for x in rows], [x["rejected"] for x in rows])
    assert reward_accuracy(z) > 0.5


def test_resume_gives_the_uninterrupted_trajectory(setup, tmp_path):
    """As `vrpo train`: a run killed after its checkpoint at step 2, rerun with the same inputs,
    resumes there (no flag needed) and logs the losses of the run that was never killed."""
    from transformers import TrainerCallback

    class KillAt2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt("killed")

    kw = dict(method="vrpo", save_steps=2, max_steps=4)
    straight = train_reward_model(_cfg(setup, tmp_path, out=str(tmp_path / "a"), **kw))
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(_cfg(setup, tmp_path, out=str(tmp_path / "b"), **kw), callbacks=[KillAt2()])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = train_reward_model(_cfg(setup, tmp_path, out=str(tmp_path / "b"), **kw))

    def losses_of(run):
        return [x["loss"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in x]

    assert len(losses_of(straight)) == 4
    assert losses_of(resumed) == pytest.approx(losses_of(straight), abs=1e-6)


def test_reward_accuracy_hand_values():
    """z = [1, -2, 0, 3]: hard accuracy (1 + 0 + .5 + 1) / 4 = .625; with p* = [.9, .2, .5, 1]:
    (.9 + .8 + .5 + 1) / 4 = .8."""
    z = [1.0, -2.0, 0.0, 3.0]
    assert reward_accuracy(z) == pytest.approx(0.625)
    assert reward_accuracy(z, true_prob=[0.9, 0.2, 0.5, 1.0]) == pytest.approx(0.8)


def test_margin_variance_across_seeds_hand_values():
    """Seeds' margins [[1, 2], [3, 2]]: per-pair variances (ddof 1) [2, 0] -> mean 1; signs all
    agree -> disagreement 0. [[1, -1], [1, 1]]: pair 2 differs between the two seeds -> (0 + 1) / 2."""
    out = margin_variance_across_seeds([[1.0, 2.0], [3.0, 2.0]])
    assert out["margin_variance"] == pytest.approx(1.0) and out["sign_disagreement"] == 0.0
    assert margin_variance_across_seeds([[1.0, -1.0], [1.0, 1.0]])["sign_disagreement"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        margin_variance_across_seeds([[1.0, 2.0]])


def test_bad_inputs_give_one_line_errors(setup, tmp_path, capsys):
    rc = main(["train-rm", "--method", "vrpo", "--model", str(setup["model"]), "--data", str(setup["pairs"]),
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "reference samples" in err, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejeted": "c"}) + "\n")
    rc = main(["train-rm", "--model", str(setup["model"]), "--data", str(bad), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "'rejected'" in err and "misnamed" in err, err
    with pytest.raises(ValueError, match=r"--method dpo: unknown; expected one of \['bt', 'vrpo'\]"):
        _cfg(setup, tmp_path, method="dpo").validate()
    with pytest.raises(ValueError, match="not a local model folder"):
        train_reward_model(_cfg(setup, tmp_path, model=str(tmp_path / "none")))
    cfg_file = tmp_path / "rm.yaml"
    cfg_file.write_text("learning_rate: 0.001\nbetta: 0.1\n")
    rc = main(["train-rm", "--config", str(cfg_file), "--model", str(setup["model"]), "--data", str(setup["pairs"]),
               "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"--config {cfg_file}: unknown setting 'betta'" in err, err


@pytest.mark.slow
def test_two_stage_experiment_api(setup, tmp_path):
    """bt and vrpo reward models over 2 seeds, a policy for seed 0, best-of-n; rerun resumes."""
    from vrpo.train.reward_two_stage import EvalPairs, TwoStageSpec, run_two_stage

    rows = _scored_rows(4)
    pairs = EvalPairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                      true_prob=[0.9, 0.8, 1.0, 0.7])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    seen = []

    def evaluate_policy(policy_dir, seed):
        seen.append((policy_dir, seed))
        assert (policy_dir / "model.safetensors").is_file()
        return {"gold": 0.5}

    def gold(prompts, completions):  # hand-made gold: likes the letter 'e'
        return [c.count("e") / 10 for c in completions]

    spec = TwoStageSpec(seeds=(0, 1), rl_seeds=(0,),
                        reward_model=dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                                          max_length=64, max_prompt_length=32, logging_steps=1),
                        rl=dict(max_steps=1, num_generations=2, batch_size=4, max_completion_length=4))
    kw = dict(base_model=str(setup["model"]), out=tmp_path / "two", data_for_seed=lambda s: str(setup["scored"]),
              eval_pairs=pairs, rl_prompts=str(prompts), evaluate_policy=evaluate_policy,
              best_of_n_candidates=([r["prompt"] for r in rows], [r["ref_samples"] for r in rows]), gold_score=gold,
              progress=False)
    res = run_two_stage(spec, **kw)
    for m in ("bt", "vrpo"):
        assert sorted(res[m]["seeds"]) == [0, 1]
        assert 0.0 <= res[m]["rm_accuracy_mean"] <= 1.0
        assert res[m]["reward_spread"]["num_seeds"] == 2 and res[m]["reward_spread"]["margin_variance"] >= 0
        assert "policy_eval" in res[m]["seeds"][0] and "policy" not in res[m]["seeds"][1]
        assert len(res[m]["seeds"][0]["best_of_n_gold"]) == 4
    assert sorted(s for _, s in seen) == [0, 0]
    assert "base_loss: ramp" in (tmp_path / "two" / "vrpo" / "seed0" / "reward_model" / "config.yaml").read_text()
    # seeds differ, so the reward models differ
    assert res["bt"]["seeds"][0]["margins"] != res["bt"]["seeds"][1]["margins"]
    again = run_two_stage(spec, **kw)  # resumes from result.json: no training, no evaluation
    assert len(seen) == 2 and again["vrpo"]["rm_accuracy_mean"] == res["vrpo"]["rm_accuracy_mean"]


def test_gradient_accumulation_matches_one_big_batch(setup, tmp_path):
    """One step of 4 prompts equals one step of 2 x 2 accumulated prompts (the loss is a per-example mean).
    Plain SGD: its step is proportional to the gradient, so a wrong accumulation scale shows
    (Adam's first step, about lr * sign(g), would hide it)."""
    from safetensors.torch import load_file

    kw = dict(method="vrpo", max_steps=1, lr_scheduler_type="constant", save_steps=100, learning_rate=0.1,
              training_args={"optim": "sgd"})
    big = train_reward_model(_cfg(setup, tmp_path, out=str(tmp_path / "big"), per_device_train_batch_size=4, **kw))
    acc = train_reward_model(_cfg(setup, tmp_path, out=str(tmp_path / "acc"), per_device_train_batch_size=2,
                                  gradient_accumulation_steps=2, **kw))
    a, b = load_file(big / "model.safetensors"), load_file(acc / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    init = load_file(setup["model"] / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in init if k in a)


def test_samples_from_another_policy_are_refused_unless_allowed(setup, tmp_path, capsys):
    """Reference samples drawn at T = 0.7 (not pi_ref): a one-line refusal; allowed, it is recorded."""
    from vrpo.data import prompt_id_of
    from vrpo.provenance import fingerprint_model

    rows = _scored_rows()
    data = tmp_path / "scored_no_refs.jsonl"  # the references come from --samples, joined by prompt_id
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "ref_samples"}) + "\n" for r in rows))
    table = [{"prompt_id": prompt_id_of(r["prompt"]), "prompt": r["prompt"], "samples": r["ref_samples"],
              "ref_logps": [-5.0, -6.0, -7.0]} for r in rows]
    samples = write_samples_folder(tmp_path / "samples", table, model_fingerprint=fingerprint_model(setup["model"]),
                                   from_reference_policy=False, not_reference_reason="temperature 0.7")
    args = ["train-rm", "--method", "vrpo", "--model", str(setup["model"]), "--data", str(data), "--samples",
            str(samples), "--ref-model", str(setup["model"]), "--max-steps", "1", "--per-device-train-batch-size", "2",
            "--max-length", "64", "--max-prompt-length", "32"]
    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temperature 0.7" in err[0] and "--allow-reference-mismatch" in err[0]
    assert main(args + ["--out", str(tmp_path / "allowed"), "--allow-reference-mismatch"]) == 0
    assert "temperature 0.7" in (tmp_path / "allowed" / "README.md").read_text()
    prov = json.loads((tmp_path / "allowed" / "manifests" / "provenance.json").read_text())
    assert prov["allowed_mismatches"] and prov["manifests"]["samples"]["from_reference_policy"] is False
