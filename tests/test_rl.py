"""The policy stage of two-stage VRPO: reward scoring, best-of-n, and RLOO through TRL."""
import json

import pandas as pd
import pytest
import torch

from tests.pipeline_helpers import write_samples_folder
from vrpo.best_of_n import load_samples
from vrpo.cli import main
from vrpo.policy_stage import RLConfig, RewardModelScorer, best_of_n, load_reward_model, reward_inputs, run_rl
from vrpo.testing import build_tiny_causal_lm

# the policy stage passes the pinned transformers/TRL no deprecated argument (each used to warn per run)
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

PROMPTS = ["The movie was", "A terrible film", "I loved the", "The worst movie"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny policy and an (untrained, randomly initialised) one-output reward model on it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    policy = build_tiny_causal_lm(root / "policy")
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    tok = AutoTokenizer.from_pretrained(policy)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {"policy": policy, "rm": root / "rm"}


def test_scorer_batched_equals_one_at_a_time(tiny):
    """Right padding must not move the reward: each batched score equals the unpadded forward."""
    model, tok = load_reward_model(tiny["rm"])
    completions = [" wonderful", " and a very long boring plot with bad acting", "", " great"]
    batched = RewardModelScorer(model, tok, batch_size=4).score(PROMPTS, completions)
    for i, (p, c) in enumerate(zip(PROMPTS, completions)):
        ids = tok(p + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # vrpo.data's sequence
        with torch.no_grad():
            single = model(input_ids=torch.tensor([ids])).logits[0, 0]
        assert torch.allclose(batched[i], single, atol=1e-5), i
    assert batched.std() > 0  # a real model, not a constant


def test_reward_inputs_follow_the_reward_models_truncation(tiny):
    """Long prompts lose their start (vrpo.data's "left" policy); completions are cut on the right."""
    _, tok = load_reward_model(tiny["rm"])
    prompt, completion = "The movie was wonderful and the acting", " was great. I loved the music."
    enc = reward_inputs(tok, [prompt], [completion],
                        {"max_length": 8, "max_prompt_length": 3, "prompt_truncation": "left"})
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    assert len(p_ids) > 3 and full[: len(p_ids)] == p_ids
    assert enc["input_ids"][0].tolist() == p_ids[-3:] + full[len(p_ids) : len(p_ids) + 5]


def test_best_of_n_keeps_the_max_reward_candidate():
    """Hand-made reward: the number of letters 'a' in the completion. Ties go to the first."""
    def count_a(prompts, completions):
        return [float(c.count("a")) for c in completions]

    rows = best_of_n(count_a, ["x", "y"], [["b", "aaa", "aa"], ["a", "a", ""]])
    assert [r["best"] for r in rows] == ["aaa", "a"]
    assert [r["best_index"] for r in rows] == [1, 0]
    assert rows[0]["rewards"] == [0.0, 3.0, 2.0] and rows[0]["best_reward"] == 3.0
    with pytest.raises(ValueError, match="prompt 1 has no candidates"):
        best_of_n(count_a, ["x", "y"], [["a"], []])


def test_best_of_n_command(tiny, tmp_path):
    cands = [[" wonderful", " bad", " the"], [" great", " plot", " worst"]]
    samples = write_samples_folder(tmp_path / "samples", [
        {"prompt_id": f"p{i}", "prompt": PROMPTS[i], "samples": c, "ref_logps": [-1.0] * 3} for i, c in enumerate(cands)])
    assert main(["best-of-n", "--reward-model", str(tiny["rm"]), "--samples", str(samples),
                 "--out", str(tmp_path / "bon")]) == 0
    out = pd.read_parquet(tmp_path / "bon" / "best_of_n.parquet")
    scorer = RewardModelScorer.from_pretrained(tiny["rm"])
    for i in range(2):
        r = scorer.score([PROMPTS[i]] * 3, cands[i])
        assert out["best"][i] == cands[i][int(r.argmax())]
        assert out["best_reward"][i] == pytest.approx(float(r.max()), abs=1e-5)
    assert json.loads((tmp_path / "bon" / "manifest.json").read_text())["n"] == 3


@pytest.mark.parametrize("engine", ["rloo", "grpo"])
def test_rl_end_to_end(tiny, tmp_path, engine):
    """Two RLOO (GRPO) steps on CPU: the policy moves, metrics and provenance are written."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    assert main(["rl", "--reward-model", str(tiny["rm"]), "--model", str(tiny["policy"]), "--prompts", str(prompts),
                 "--out", str(out), "--num-generations", "2", "--batch-size", "4", "--max-completion-length", "6",
                 "--max-steps", "2", "--learning-rate", "1e-3", "--engine", engine]) == 0
    before, after = load_file(tiny["policy"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "rewards/reward_model/mean" in r] == [1, 2]
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["reward_model_fingerprint"]) == 64
    assert (out / "config.yaml").is_file() and (out / "README.md").is_file()


def test_rl_rejects_a_causal_lm_as_reward_model(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    rc = main(["rl", "--reward-model", str(tiny["policy"]), "--model", str(tiny["policy"]), "--prompts", str(prompts),
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "GPT2LMHeadModel" in err and "sequence-classification" in err


def test_bad_inputs_give_one_line_errors(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"missing column 'prompt'"):
        run_rl(RLConfig(model=str(tiny["policy"]), reward_model=str(tiny["rm"]), prompts=str(bad), out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match=r"is not a folder"):
        load_reward_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"multiple of --num-generations"):
        run_rl(RLConfig(model=str(tiny["policy"]), reward_model=str(tiny["rm"]), prompts=str(bad), out=str(tmp_path / "r"),
                        num_generations=3, batch_size=4))
    with pytest.raises(ValueError, match=r"no samples.parquet; expected a folder written by `vrpo sample`"):
        load_samples(tmp_path)


def test_conversations_are_scored_as_vrpo_data_renders_them(tiny, tmp_path):
    """TRL hands conversational prompts/completions as message lists: the scorer renders them
    with the chat template exactly as vrpo.data renders a conversational preference row."""
    from vrpo.data import load_preferences

    model, tok = load_reward_model(tiny["rm"])
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = [{"role": "user", "content": "The movie was"}]
    completion = [{"role": "assistant", "content": " wonderful"}]
    f = tmp_path / "conv.jsonl"
    f.write_text(json.dumps({"prompt": prompt, "chosen": completion, "rejected": completion}) + "\n")
    row = load_preferences(f, tok)[0]
    scorer = RewardModelScorer(model, tok)
    assert torch.allclose(scorer.score([prompt], [completion]), scorer.score([row["prompt"]], [row["chosen"]]))
    assert row["prompt"] == "<user>The movie was<assistant>" and row["chosen"] == " wonderful"


def test_engine_config_follows_the_hardware_like_vrpo_train(tmp_path):
    """TRL's config gets the same device defaults as `vrpo train` (vrpo.train.config.engine_device_defaults)
    and no activation checkpointing; engine_args still win."""
    from trl import RLOOConfig

    from vrpo.policy_stage import _engine_config
    from vrpo.train.config import engine_device_defaults

    cfg = RLConfig(model="m", reward_model="r", prompts="p", out=str(tmp_path), engine_args={"seed": 5})
    engine = _engine_config(cfg, RLOOConfig, tmp_path / "ck")
    for name, value in engine_device_defaults().items():
        assert getattr(engine, name) == value
    if not torch.cuda.is_available():
        assert engine.use_cpu and engine.dataloader_pin_memory is False and not engine.bf16
    assert engine.activation_checkpointing is False and engine.seed == 5
