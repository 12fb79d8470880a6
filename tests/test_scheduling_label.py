"""`vrpo label`: the panel labels the first two reference samples of each prompt."""
import json

from tests.pipeline_helpers import write_samples_folder
from vrpo.cli import main
from vrpo.experiments.scheduling.panel import DEFAULT_PANEL
from vrpo.experiments.scheduling.prompts import patient_messages

ANSWERS = ["Please call 911 now.", "Thank you! I can book you on Tuesday at 10am.", "ok",
           "I can't give medical advice; please ask your pharmacist."]


def write_samples(folder, k=3, n_per_slice=4):
    rows = patient_messages(n_per_slice, seed=5)
    table = [{"prompt_id": r["prompt_id"], "prompt": f"<|user|>{r['message']}<|assistant|>",
              "samples": [ANSWERS[(i + j) % len(ANSWERS)] for j in range(k)], "ref_logps": [-1.0] * k}
             for i, r in enumerate(rows)]
    if k > 1:
        table[0]["samples"][1] = table[0]["samples"][0]  # identical pair: no preference, dropped
    write_samples_folder(folder, table, kind="reference_samples", model_fingerprint="abc")
    return rows, table


def test_label_writes_pairs_with_truth_and_provenance(tmp_path, capsys):
    rows, table = write_samples(tmp_path / "samples")
    assert main(["label", "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "lab"), "--seed", "1"]) == 0
    pairs = [json.loads(line) for line in (tmp_path / "lab" / "pairs.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / "lab" / "manifest.json").read_text())
    assert len(pairs) == len(rows) - 1 and manifest["dropped_identical_or_empty"] == 1
    assert manifest["samples_manifest"]["model_fingerprint"] == "abc"
    by_id = {t["prompt_id"]: t for t in table}
    slices = {r["prompt_id"]: r["slice"] for r in rows}
    for p in pairs:
        assert {p["chosen"], p["rejected"]} == set(by_id[p["prompt_id"]]["samples"][:2])
        assert p["slice"] == slices[p["prompt_id"]]
        expected = DEFAULT_PANEL.preference_prob([p["prompt"]], [p["chosen"]], [p["rejected"]])[0]
        assert abs(p["p_star"] - expected) < 1e-12
    # Same seed, same labels.
    assert main(["label", "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "lab2"), "--seed", "1"]) == 0
    assert (tmp_path / "lab2" / "pairs.jsonl").read_text() == (tmp_path / "lab" / "pairs.jsonl").read_text()


def test_label_rejects_single_sample(tmp_path, capsys):
    write_samples(tmp_path / "samples", k=1)
    assert main(["label", "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "lab")]) == 2
    err = capsys.readouterr().err
    assert "expected >= 2" in err and len(err.strip().splitlines()) == 1
