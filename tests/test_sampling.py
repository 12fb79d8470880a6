"""vrpo.sampling: K reference samples per prompt, exact log-probs, provenance flags, resume,
and the same table from 2 CPU processes as from 1."""
import os
import subprocess
import sys

import pytest
import torch

from tests.pipeline_helpers import tiny_model_dir, write_pairs
from vrpo.provenance import read_manifest
from vrpo.sampling import read_samples, sample_references

SETTINGS = dict(num_samples=3, max_new_tokens=8, batch_size=2, shard_size=2, seed=3)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("prompts") / "pairs.jsonl", n=5)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, prompts):
    out = tmp_path_factory.mktemp("samples") / "s"
    sample_references(str(tiny_model_dir()), str(prompts), str(out), **SETTINGS)
    return out


def _loop_logp(model, prompt_ids, completion_ids):
    """log pi(y|x) token by token on the unpadded sequence: an independent implementation."""
    ids = list(prompt_ids) + list(completion_ids)
    total = 0.0
    with torch.no_grad():
        for t in range(len(prompt_ids), len(ids)):
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
            total += torch.log_softmax(logits.double(), -1)[ids[t]].item()
    return total


def test_table_and_manifest(sampled):
    rows = read_samples(sampled)
    assert len(rows) == 5 and all(len(r["samples"]) == 3 == len(r["ref_logps"]) for r in rows)
    m = read_manifest(sampled)
    assert m["complete"] and m["from_reference_policy"] and m["num_samples"] == 3 and m["top_k"] == 0
    assert len(m["model_fingerprint"]) == 64 and m["versions"]["torch"]


def test_ref_logps_are_exact_under_the_reference_model(sampled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.data import tokenize_completions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    for row in read_samples(sampled)[:1]:
        p_ids, c_ids = tokenize_completions(tok, row["prompt"], row["samples"], max_length=512, max_prompt_length=256)
        for ids, stored in zip(c_ids, row["ref_logps"]):
            assert stored == pytest.approx(_loop_logp(model, p_ids, ids), abs=1e-4)


def test_non_reference_settings_are_flagged(tmp_path, prompts):
    sample_references(str(tiny_model_dir()), str(prompts), str(tmp_path / "t"), num_samples=2, max_new_tokens=4,
                      temperature=0.7, top_p=0.9, max_prompts=2)
    m = read_manifest(tmp_path / "t")
    assert m["from_reference_policy"] is False and "temperature 0.7" in m["not_reference_reason"]
    with pytest.raises(ValueError, match="other settings"):
        sample_references(str(tiny_model_dir()), str(prompts), str(tmp_path / "t"), num_samples=2, max_new_tokens=4,
                          max_prompts=2)
    with pytest.raises(ValueError, match="at least 2"):
        sample_references(str(tiny_model_dir()), str(prompts), str(tmp_path / "u"), num_samples=1)
    with pytest.raises(ValueError, match="not a local model folder"):
        sample_references(str(tmp_path / "no-model"), str(prompts), str(tmp_path / "v"))


def test_killed_run_resumes_without_resampling(tmp_path, prompts, sampled, monkeypatch):
    import vrpo.sampling as sampling

    calls = {"n": 0}
    real = sampling.sample_shard

    def dies_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_shard", dies_on_second_shard)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        sample_references(str(tiny_model_dir()), str(prompts), str(out), **SETTINGS)
    first = out / "shards" / "shard-00000.parquet"
    stamp = first.stat().st_mtime_ns
    assert not (out / "samples.parquet").exists() and not read_manifest(out)["complete"]
    monkeypatch.setattr(sampling, "sample_shard", real)
    sample_references(str(tiny_model_dir()), str(prompts), str(out), **SETTINGS)
    assert first.stat().st_mtime_ns == stamp  # the finished shard was not sampled again
    assert read_samples(out) == read_samples(sampled)  # same seeds per shard: same table as one run


@pytest.mark.slow
def test_two_cpu_processes_give_the_one_process_table(tmp_path, prompts, sampled):
    out = tmp_path / "mp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vrpo", "sample",
           "--model", str(tiny_model_dir()), "--prompts", str(prompts), "--out", str(out), "--num-samples", "3",
           "--max-new-tokens", "8", "--batch-size", "2", "--shard-size", "2", "--seed", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_samples(out) == read_samples(sampled)
