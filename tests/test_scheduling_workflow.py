"""`vrpo reproduce scheduling` end to end through every command, on a tiny GPT-2 in place
of SmolLM2 (which costs minutes on CPU: the quick preset itself runs it)."""
import json

import pytest

from vrpo.cli import main
from vrpo.experiments.scheduling.prompts import SLICES, patient_messages
from vrpo.testing import build_tiny_causal_lm


@pytest.mark.slow
def test_workflow_end_to_end_and_resume(tmp_path, capsys):
    texts = [r["message"] for r in patient_messages(10, seed=9)] + ["Please call 911. I can book you Tuesday at 10am."] * 5
    model = build_tiny_causal_lm(tmp_path / "tiny", texts, vocab_size=400)
    argv = ["reproduce", "scheduling", "--preset", "quick", "--model", str(model), "--out", str(tmp_path / "run"),
            "--train-per-slice", "2", "--eval-per-slice", "1", "--max-new-tokens", "6", "--max-steps", "1"]
    assert main(argv) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert set(results["win_rates"]) == {"dpo_vs_pi_ref", "vrpo_vs_pi_ref", "vrpo_vs_dpo"}
    for table in results["win_rates"].values():
        assert set(table) == set(SLICES) | {"all"}
        assert all(0.0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1.0 for w in table.values())
    assert set(results["rubrics"]) == {"pi_ref", "dpo", "vrpo"}
    assert set(results["gates"]) == {"dpo", "vrpo"}
    assert results["aux_calibration"]["all"]["n"] == results["labelled_pairs"] > 0
    md = (run / "results.md").read_text()
    assert "## Deployment gate" in md and "urgent_symptoms" in md
    assert (run / "win_rates.png").stat().st_size > 0 and (run / "rubrics.png").stat().st_size > 0
    # The VRPO run trained on the scored data (g on observed and reference pairs).
    assert (run / "scored" / "vrpo" / "data.parquet").exists()
    # Rerunning skips every finished step and gives the same results.
    stamp = (run / "train" / "vrpo" / "model.safetensors").stat().st_mtime
    capsys.readouterr()
    assert main(argv) == 0
    assert "$ vrpo train" not in capsys.readouterr().out
    assert (run / "train" / "vrpo" / "model.safetensors").stat().st_mtime == stamp
    again = json.loads((run / "results.json").read_text())
    assert again["win_rates"] == results["win_rates"] and again["rubrics"] == results["rubrics"]
