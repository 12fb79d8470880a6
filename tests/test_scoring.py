"""vrpo score: g on every observed pair and all K(K-1)/2 reference pairs, antisymmetric,
one batched call per chunk, precomputed columns, bad probabilities refused, resume."""
import json
import math
import sys
import types

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import write_samples_folder
from vrpo.scoring import score_pairs

K = 3


def _setup(tmp_path, n=4):
    rows = [{"prompt": f"p{i}", "chosen": f" good {i}", "rejected": f" bad", "aux_prob": 0.9} for i in range(n)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from vrpo.data import prompt_id_of

    table = [{"prompt_id": prompt_id_of(r["prompt"]), "prompt": r["prompt"], "samples": [f" s{j}{'!' * j}" for j in range(K)],
              "ref_logps": [-1.0 * j for j in range(K)], "truncated": [False] * K} for r in rows]
    samples = write_samples_folder(tmp_path / "samples", table, model_fingerprint="m", from_reference_policy=True)
    return data, samples


def _install(monkeypatch, fn):
    mod = types.ModuleType("fake_aux_mod")
    mod.g = fn
    monkeypatch.setitem(sys.modules, "fake_aux_mod", mod)


def test_scores_observed_and_all_reference_pairs_in_batched_calls(tmp_path, monkeypatch):
    data, samples = _setup(tmp_path)
    calls = []

    def g(prompts, a, b):  # not antisymmetric on purpose: vrpo symmetrises it
        calls.append(len(a))
        return [1 / (1 + math.exp(-(len(x) - len(y)))) * 0.9 for x, y in zip(a, b)]

    _install(monkeypatch, g)
    path = score_pairs("fake_aux_mod:g", str(data), str(samples), str(tmp_path / "out"), chunk_size=10)
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 4 and rows[0]["ref_samples"] == [" s0", " s1!", " s2!!"] and rows[0]["ref_logps"] == [0, -1, -2]
    raw = lambda x, y: 0.9 / (1 + math.exp(-(len(x) - len(y))))  # noqa: E731
    c, r = rows[0]["chosen"], rows[0]["rejected"]
    assert rows[0]["aux_prob"] == pytest.approx((raw(c, r) + 1 - raw(r, c)) / 2)
    m = np.array(rows[0]["ref_aux_prob"])
    assert m.shape == (K, K) and np.allclose(np.diag(m), 0.5) and np.allclose(m + m.T, 1.0)
    s = rows[0]["ref_samples"]
    assert m[0, 2] == pytest.approx((raw(s[0], s[2]) + 1 - raw(s[2], s[0])) / 2)
    # one chunk: observed pairs (2 calls: both orders) + all 4 * 3 reference pairs (2 calls)
    assert calls == [4, 4, 4 * K * (K - 1) // 2, 4 * K * (K - 1) // 2]


def test_column_spec_and_bad_probabilities(tmp_path, monkeypatch):
    data, samples = _setup(tmp_path)
    with pytest.raises(ValueError, match="cannot score new reference pairs"):
        score_pairs("column:aux_prob", str(data), str(samples), str(tmp_path / "c"))
    _install(monkeypatch, lambda p, a, b: [float("nan")] * len(a))
    with pytest.raises(ValueError, match="NaN"):
        score_pairs("fake_aux_mod:g", str(data), str(samples), str(tmp_path / "n"))
    _install(monkeypatch, lambda p, a, b: [1.5] * len(a))
    with pytest.raises(ValueError, match=r"expected probabilities in \[0, 1\]"):
        score_pairs("fake_aux_mod:g", str(data), str(samples), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no ref_samples"):
        score_pairs("fake_aux_mod:g", str(data), None, str(tmp_path / "p"))


def test_resume_skips_finished_chunks(tmp_path, monkeypatch):
    data, samples = _setup(tmp_path, n=4)
    calls = []
    _install(monkeypatch, lambda p, a, b: (calls.append(len(a)), [0.5] * len(a))[1])
    out = tmp_path / "out"
    score_pairs("fake_aux_mod:g", str(data), str(samples), str(out), chunk_size=2)
    first = len(calls)
    (out / "shards" / "chunk-00001.parquet").unlink()  # as if killed before the second chunk
    score_pairs("fake_aux_mod:g", str(data), str(samples), str(out), chunk_size=2)
    assert len(calls) - first == first // 2  # only the missing chunk was scored again
    assert len(pq.read_table(out / "data.parquet")) == 4


def test_example_callable_of_the_quickstart():
    from pathlib import Path

    from vrpo.aux import resolve_aux

    aux = resolve_aux(str(Path(__file__).parents[1] / "examples" / "sentiment_aux.py") + ":prefer_positive")
    p = aux.predict_proba(["x", "x"], [" great fun", " bad"], [" boring", " wonderful"])
    # " great fun": +2, " boring": -1, " bad": -1, " wonderful": +1
    assert p[0] == pytest.approx(1 / (1 + math.exp(-3))) and p[1] == pytest.approx(1 / (1 + math.exp(2)))


# --------------------------------------------------------------------------- nothing silently wrong
def test_other_samples_into_a_scored_folder_are_refused(tmp_path, monkeypatch):
    """Reusing OUT's chunks is right only for the same data, samples, --aux and chunk size."""
    data, samples = _setup(tmp_path)
    _install(monkeypatch, lambda p, a, b: [0.5] * len(a))
    out = tmp_path / "out"
    score_pairs("fake_aux_mod:g", str(data), str(samples), str(out), chunk_size=2)
    import shutil

    from tests.pipeline_helpers import write_samples_folder
    from vrpo.sampling import read_samples

    other = read_samples(samples)
    other[0]["samples"] = [" other", " draws", " here"]
    other_dir = write_samples_folder(tmp_path / "other", other, model_fingerprint="m", from_reference_policy=True)
    with pytest.raises(ValueError, match=r"made by `vrpo score` from other inputs \(samples: \w+ -> \w+\); pass "
                                         r"--overwrite"):
        score_pairs("fake_aux_mod:g", str(data), str(other_dir), str(out), chunk_size=2)
    path = score_pairs("fake_aux_mod:g", str(data), str(other_dir), str(out), chunk_size=2, overwrite=True)
    assert pq.read_table(path).to_pylist()[0]["ref_samples"] == [" other", " draws", " here"]
    shutil.rmtree(other_dir)


@pytest.mark.parametrize("source, message", [
    ("def g(p, a, b):\n    return 1 / 0\n", r"--aux {spec}: your code raised ZeroDivisionError: division by zero"),
    ("def g(p, a, b)\n    return 1\n", r"--aux {spec}: your code raised SyntaxError"),
    ("import no_such_module_here\ndef g(p, a, b):\n    return 1\n", r"your code raised ModuleNotFoundError"),
    ("def g(p, a, b):\n    return None\n", r"--aux {spec}: returned NoneType None; expected a list of 4 probabilities"),
    ("def g(p, a, b):\n    return ['high'] * len(a)\n", r"returned values such as 'high'; expected a list of 4"),
    ("def g(p, a, b):\n    return [0.5]\n", r"returned 1 probabilities for 4 pairs"),
    ("def g(p, a, b):\n    return [[0.5, 0.5]] * len(a)\n", r"returned an array of shape \(4, 2\)"),
])
def test_errors_in_the_users_aux_code_are_one_line(tmp_path, capsys, source, message):
    from vrpo.cli import main

    data, samples = _setup(tmp_path)
    (tmp_path / "judge.py").write_text(source)
    spec = f"{tmp_path / 'judge.py'}:g"
    rc = main(["score", "--aux", spec, "--data", str(data), "--samples", str(samples), "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "scoring pairs" not in line]  # no bar
    assert rc == 2 and len(err) == 1 and err[0].startswith("vrpo score: error: "), err
    import re

    assert re.search(message.replace("{spec}", re.escape(spec)), err[0]), err[0]


def test_an_aux_file_that_does_not_exist_is_named(tmp_path, capsys):
    from vrpo.cli import main

    data, samples = _setup(tmp_path)
    rc = main(["score", "--aux", "nofile.py:f", "--data", str(data), "--samples", str(samples), "--out",
               str(tmp_path / "o")])
    assert rc == 2 and "--aux nofile.py:f: no such file 'nofile.py'" in capsys.readouterr().err
    rc = main(["score", "--aux", "no_such_module:f", "--data", str(data), "--samples", str(samples), "--out",
               str(tmp_path / "o")])
    assert rc == 2 and "no module named 'no_such_module'" in capsys.readouterr().err


def test_reference_samples_keep_their_truncation_flags(tmp_path, monkeypatch):
    data, samples = _setup(tmp_path)
    _install(monkeypatch, lambda p, a, b: [0.5] * len(a))
    path = score_pairs("fake_aux_mod:g", str(data), str(samples), str(tmp_path / "out"))
    assert all(r["ref_truncated"] == [False] * K for r in pq.read_table(path).to_pylist())
