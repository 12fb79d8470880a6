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
    rows = read_samples(sampled)[:2]
    flags = [t for row in rows for t in row["truncated"]]
    assert any(flags), "the fixture should hold samples cut at --max-new-tokens"
    for row in rows:
        p_ids, c_ids = tokenize_completions(tok, row["prompt"], row["samples"], max_length=512, max_prompt_length=256,
                                            add_eos=False)
        for ids, stored, truncated in zip(c_ids, row["ref_logps"], row["truncated"]):
            # a sample cut at the length limit never drew EOS: its log-prob is of the text alone
            ids = ids if truncated else ids + [tok.eos_token_id]
            assert stored == pytest.approx(_loop_logp(model, p_ids, ids), abs=1e-4)


def test_non_reference_settings_are_flagged(tmp_path, prompts):
    sample_references(str(tiny_model_dir()), str(prompts), str(tmp_path / "t"), num_samples=2, max_new_tokens=4,
                      temperature=0.7, top_p=0.9, max_prompts=2)
    m = read_manifest(tmp_path / "t")
    assert m["from_reference_policy"] is False and "temperature 0.7" in m["not_reference_reason"]
    with pytest.raises(ValueError, match="temperature: 0.7 -> 1.0; top_p: 0.9 -> 1.0"):
        sample_references(str(tiny_model_dir()), str(prompts), str(tmp_path / "t"), num_samples=2, max_new_tokens=4,
                          max_prompts=2)
    with pytest.raises(ValueError, match="--num-samples 1: expected an integer >= 2"):
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


# --------------------------------------------------------------------------- nothing silently wrong
def _copy(folder, to):
    import shutil

    return shutil.copytree(folder, to)


def test_an_edited_row_of_the_samples_table_is_refused(tmp_path, sampled):
    """The manifest records the table's sha256; a late row's log-prob or a sample's text
    changed after sampling is refused wherever the samples are read (train, score)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vrpo.provenance import file_sha256
    from vrpo.sampling import samples_fingerprint

    assert samples_fingerprint(sampled) == read_manifest(sampled)["table_sha256"] == file_sha256(sampled / "samples.parquet")
    for change in ("ref_logps", "samples"):
        folder = _copy(sampled, tmp_path / change)
        rows = read_samples(folder)
        last = rows[-1]
        last[change] = [x - 0.5 for x in last[change]] if change == "ref_logps" else [s + "!" for s in last[change]]
        pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
        with pytest.raises(ValueError, match=r"samples.parquet has sha256 \w+, its manifest recorded \w+ when the "
                                             r"samples were drawn \(edited or damaged since\)"):
            read_samples(folder)


def test_a_second_sampler_into_the_same_folder_is_refused(tmp_path, prompts, capsys):
    """While one `vrpo sample` writes a folder (its lock holds its pid), a second is refused in one line."""
    import time

    from vrpo.cli import main

    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vrpo.outputs import folder_lock\n"
                               "with folder_lock(sys.argv[1], 'sample'):\n    time.sleep(60)\n", str(out)])
    try:
        for _ in range(300):
            if (out / ".vrpo.lock").exists():
                break
            time.sleep(0.1)
        rc = main(["sample", "--model", str(tiny_model_dir()), "--prompts", str(prompts), "--out", str(out),
                   "--num-samples", "2", "--max-new-tokens", "4"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and f"another `vrpo sample` (pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("flag, value", [("--max-prompts", "-1"), ("--max-prompts", "0"), ("--shard-size", "0"),
                                         ("--batch-size", "0"), ("--num-samples", "1"), ("--max-new-tokens", "0"),
                                         ("--top-p", "1.5"), ("--seed", "-3")])
def test_numeric_flags_are_checked_when_parsed(tmp_path, prompts, capsys, flag, value):
    from vrpo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(tiny_model_dir()), "--prompts", str(prompts), "--out", str(tmp_path / "x"),
              flag, value])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}" in err
    assert not (tmp_path / "x").exists()  # nothing written


def test_prompt_longer_than_the_model_context_is_refused_before_sampling(tmp_path, capsys):
    """The tiny model has 128 positions: a prompt of ~120 tokens + 16 new tokens does not
    fit. One line naming the prompt, instead of an IndexError in the embedding."""
    import json

    from vrpo.cli import main

    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "long-one", "prompt": "The movie was great. " * 30}) + "\n")
    rc = main(["sample", "--model", str(tiny_model_dir()), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
               "--num-samples", "2", "--max-new-tokens", "16"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "prompt_id long-one: prompt + --max-new-tokens" in err and "context of 128 positions" in err


def test_pickle_weights_are_refused(tmp_path):
    from vrpo.sampling import check_model_folder

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ValueError, match=r"no \*.safetensors weights \(it has pickle-based \*.bin weights, which vrpo "
                                         r"does not load: unpickling can run code\)"):
        check_model_folder(folder)


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, prompts, capsys, monkeypatch):
    import vrpo.sampling
    from vrpo.cli import main

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(vrpo.sampling, "load_model_and_tokenizer", no_loading)
    (tmp_path / "afile").write_text("x")
    rc = main(["sample", "--model", str(tiny_model_dir()), "--prompts", str(prompts), "--out", str(tmp_path / "afile")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("afile: exists and is not a folder")
