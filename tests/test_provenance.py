"""vrpo.provenance: fingerprints change exactly when the bytes change; manifests round-trip;
reference checks refuse mismatches unless allowed."""
import json

import pytest

from vrpo.provenance import (atomic_write_json, check_reference, fingerprint_data, fingerprint_model,
                             fingerprint_tokenizer, read_manifest, write_manifest)


def _model_dir(tmp_path, name, seed):
    from vrpo.testing import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path / name, n_layer=1, n_embd=16, seed=seed)


def test_model_and_tokenizer_fingerprints(tmp_path):
    a, a2, b = _model_dir(tmp_path, "a", 0), _model_dir(tmp_path, "a2", 0), _model_dir(tmp_path, "b", 1)
    assert fingerprint_model(a) == fingerprint_model(a2) != fingerprint_model(b)
    assert fingerprint_tokenizer(a) == fingerprint_tokenizer(b)  # same texts, same tokenizer
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(a)
    s1 = fingerprint_model(m)
    with __import__("torch").no_grad():
        next(m.parameters())[0, 0] += 1.0
    assert s1.startswith("state:") and fingerprint_model(m) != s1
    with pytest.raises(ValueError, match="not a local model folder"):
        fingerprint_model(tmp_path / "nowhere")


def test_data_fingerprint_and_manifest_roundtrip(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n')
    fp = fingerprint_data(f)
    f.write_text('{"a": 2}\n')
    assert fingerprint_data(f) != fp
    write_manifest(tmp_path, {"model_fingerprint": "abc", "from_reference_policy": True})
    m = read_manifest(tmp_path)
    assert m["model_fingerprint"] == "abc" and "torch" in m["versions"] and m["created"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind
    atomic_write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}


def test_check_reference_refuses_unless_allowed():
    manifest = {"model_fingerprint": "aaaa" * 16, "from_reference_policy": False, "not_reference_reason": "temperature 0.7"}
    with pytest.raises(ValueError, match="--allow-reference-mismatch") as e:
        check_reference(manifest, "bbbb" * 16)
    assert "temperature 0.7" in str(e.value) and "\n" not in str(e.value)
    problems = check_reference(manifest, "bbbb" * 16, allow_mismatch=True)
    assert len(problems) == 2
    assert check_reference({"model_fingerprint": "c", "from_reference_policy": True}, "c") == []


def test_read_run_config_reads_a_run_and_names_the_flag_for_a_damaged_one(tmp_path):
    """The one reader of a run folder's config.yaml (`vrpo diagnose --model`, the reward model of
    `vrpo rl` / `best-of-n`): None without one, the settings with one, a one-line error naming
    the flag for a file that is not YAML or not a mapping."""
    import pytest

    from vrpo.provenance import read_run_config

    assert read_run_config(tmp_path, "--model") is None
    (tmp_path / "config.yaml").write_text("method: dpo\nbeta: 0.1\n")
    assert read_run_config(tmp_path, "--model") == {"method": "dpo", "beta": 0.1}
    (tmp_path / "config.yaml").write_text("method: [dpo\n")
    with pytest.raises(ValueError, match=r"^--reward-model .*: config.yaml is not valid YAML") as e:
        read_run_config(tmp_path, "--reward-model")
    assert "\n" not in str(e.value)
    (tmp_path / "config.yaml").write_text("- dpo\n")
    with pytest.raises(ValueError, match=r"config.yaml holds list; expected the settings of a run"):
        read_run_config(tmp_path, "--model")
