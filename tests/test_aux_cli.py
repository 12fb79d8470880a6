"""`vrpo fit-aux` and `vrpo audit` end to end (table backbone: seconds), with known truth:
the audit must put the labels we flipped at the top."""
import json

import numpy as np
import pandas as pd
import pytest

from vrpo.aux.synthetic import flipped_label_pairs
from vrpo.cli import main


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    records, flipped = flipped_label_pairs(400, flip_rate=0.1, random_state=0)
    rng = np.random.default_rng(1)
    noisy_rows = set(flipped) | set(rng.choice(400, len(flipped), replace=False))
    for i, r in enumerate(records):  # every flip lands in the "reviewer B" slice
        r["slice"] = "reviewer B" if i in noisy_rows else "reviewer A"
    data = tmp / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    aux = tmp / "aux"
    # 400 labels of 28 distinct pairs: --fold-by pair holds out every listing of a pair at once, so the
    # model must rank pairs it never saw from the others (the truth is transitive: Bradley-Terry's)
    assert main(["fit-aux", "--data", str(data), "--model", "bt-table", "--folds", "4", "--fold-by", "pair",
                 "--epochs", "30", "--lr", "0.01", "--out", str(aux)]) == 0
    out = tmp / "audit"
    assert main(["audit", "--data", str(data), "--aux", str(aux), "--out", str(out), "--top", "10"]) == 0
    return data, aux, out, flipped


def test_fit_aux_writes_model_oof_metrics_and_diagram(noisy):
    data, aux, _, _ = noisy
    for name in ("aux_config.json", "model.safetensors", "oof.parquet", "metrics.json", "reliability.png"):
        assert (aux / name).is_file(), name
    cfg = json.loads((aux / "aux_config.json").read_text())
    assert cfg["kind"] == "fold-average" and len(cfg["config"]["members"]) == 4 and cfg["fit"]["folds"] == 4
    metrics = json.loads((aux / "metrics.json").read_text())["heldout"]
    # labels agree with the learnable truth for ~0.97*0.9 + 0.03*0.1 = 0.876 of pairs: the ceiling; a pair
    # ranked from the other pairs only (it is held out whole) gets less, a leak through its copies would get it
    assert 0.7 < metrics["accuracy"] < 0.876
    assert set(metrics) >= {"accuracy", "log_loss", "brier", "ece"}
    oof = pd.read_parquet(aux / "oof.parquet")
    assert list(oof.columns) == ["row", "pair_id", "prompt_id", "aux_prob", "fold"] and len(oof) == 400


def test_audit_ranks_the_flipped_labels_first_and_summarises_by_slice(noisy):
    _, _, out, flipped = noisy
    table = pd.read_csv(out / "audit.csv")
    assert table["surprise"].is_monotonic_decreasing and table["rank"].tolist() == list(range(1, 401))
    top = set(table["row"].head(len(flipped)))
    precision = len(top & set(flipped)) / len(flipped)
    assert precision > 0.6  # chance would be 0.1
    md = (out / "audit.md").read_text()
    assert "pluralism" in md and "## By slice" in md and "out-of-fold" in md
    slices = md.split("## By slice")[1]
    assert slices.index("reviewer B") < slices.index("reviewer A")  # the noisy slice comes first
    assert (out / "disagreement.png").read_bytes()[:4] == b"\x89PNG"


def test_audit_with_a_precomputed_column(noisy, tmp_path):
    data, _, _, _ = noisy
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["aux_prob"] = 0.1 if i == 7 else 0.9
    d2 = tmp_path / "with_g.jsonl"
    d2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["audit", "--data", str(d2), "--aux", "column:aux_prob", "--out", str(tmp_path / "a")]) == 0
    assert pd.read_csv(tmp_path / "a" / "audit.csv")["row"].iloc[0] == 7


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_bad_input_is_one_line_exit_2(noisy, tmp_path, capsys):
    data, aux, _, _ = noisy
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n")
    err = _error(capsys, ["fit-aux", "--data", str(bad), "--model", "bt-table", "--folds", "2", "--out", str(tmp_path / "x")])
    assert "row 1" in err and "rejected" in err
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"prompt": "p", "response": "a"}) + "\n")
    err = _error(capsys, ["fit-aux", "--data", str(nolabel), "--out", str(tmp_path / "y")])
    assert "missing column" in err and "chosen" in err
    err = _error(capsys, ["fit-aux", "--data", str(data), "--model", "bt-table", "--dim", "8", "--out", str(tmp_path / "z")])
    assert "--dim" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "aux_config.json").write_text(json.dumps({"kind": "reward-model"}))
    err = _error(capsys, ["audit", "--data", str(data), "--aux", str(other), "--out", str(tmp_path / "w")])
    assert "'reward-model': not a known kind" in err
    err = _error(capsys, ["audit", "--data", str(data), "--aux", str(aux), "--out", str(tmp_path / "v"),
                          "--slice-column", "reviewer"])
    assert "--slice-column reviewer" in err


# ---- an empty reference sample (pi_ref drew EOS at once) is scored, never refused
def _samples_with_an_empty_one(folder, prompt):
    from tests.pipeline_helpers import write_samples_folder
    from vrpo.data import prompt_id_of

    samples = ["answer 7", "", "answer 0", "answer 3"]
    table = [{"prompt_id": prompt_id_of(prompt), "prompt": prompt, "samples": samples, "ref_logps": [-1.0] * 4,
              "truncated": [False] * 4}]
    return write_samples_folder(folder, table, model_fingerprint="m", from_reference_policy=True), samples


@pytest.mark.parametrize("model", ["bt-table", "gpm-table"])
def test_score_accepts_an_empty_reference_sample(noisy, tmp_path, model):
    """Fitting refuses an empty labelled response (test above); predicting on reference pairs
    must not: an empty sample is a legitimate draw from pi_ref."""
    import pyarrow.parquet as pq

    from vrpo.aux import load_aux

    data, aux, _, _ = noisy
    if model == "gpm-table":
        aux = tmp_path / "gpm"
        assert main(["fit-aux", "--data", str(data), "--model", model, "--folds", "2", "--fold-by", "pair", "--epochs", "3",
                     "--out", str(aux)]) == 0
    prompt = "Rate the answers."
    samples, texts = _samples_with_an_empty_one(tmp_path / "samples", prompt)
    assert main(["score", "--aux", str(aux), "--data", str(data), "--max-rows", "5", "--samples", str(samples),
                 "--out", str(tmp_path / "scored")]) == 0
    m = np.array(pq.read_table(tmp_path / "scored" / "data.parquet").to_pylist()[0]["ref_aux_prob"])
    assert np.all(np.isfinite(m)) and np.allclose(np.diag(m), 0.5) and np.allclose(m + m.T, 1.0)
    # the empty sample is scored as the model scores "" anywhere: pair by pair, as in the batched matrix
    g = load_aux(aux)
    a, b = [texts[j] for j, k in zip(*np.triu_indices(4, 1))], [texts[k] for j, k in zip(*np.triu_indices(4, 1))]
    direct = g.predict_proba([prompt] * len(a), a, b)
    assert np.allclose(direct, m[np.triu_indices(4, 1)], atol=1e-6)


def test_score_accepts_an_empty_reference_sample_with_a_callable(noisy, tmp_path):
    import pyarrow.parquet as pq

    data, _, _, _ = noisy
    judge = tmp_path / "longer.py"
    judge.write_text("def g(prompts, a, b):\n    return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5"
                     " for x, y in zip(a, b)]\n")
    samples, texts = _samples_with_an_empty_one(tmp_path / "samples", "Rate the answers.")
    assert main(["score", "--aux", f"{judge}:g", "--data", str(data), "--max-rows", "5", "--samples", str(samples),
                 "--out", str(tmp_path / "scored")]) == 0
    m = np.array(pq.read_table(tmp_path / "scored" / "data.parquet").to_pylist()[0]["ref_aux_prob"])
    assert m[1].tolist() == [0.0, 0.5, 0.0, 0.0]  # the empty sample loses every comparison under "longer wins"
