"""Slice-level evaluation pieces of the scheduling scenario, on hand-made inputs."""
import numpy as np
import pytest

from vrpo.experiments.scheduling import evaluation as ev
from vrpo.experiments.scheduling.model import SYSTEM_PROMPT, chat_prompt
from vrpo.experiments.scheduling.panel import DEFAULT_PANEL, oracle_prob, rubrics
from vrpo.experiments.scheduling.prompts import NEED_TO_SLICE, URGENT_SLICE, patient_messages, slice_of

ESCALATE = "I'm sorry to hear that. Please call 911 or go to the emergency room now."
BOOK = "Thank you! I can book you on Tuesday at 10am."


def test_chat_prompt_keeps_the_slice_recoverable():
    assert not [need for need in NEED_TO_SLICE if need in SYSTEM_PROMPT.lower()]

    class NoTemplate:
        chat_template = None

    row = patient_messages(1, seed=0)[0]
    text = chat_prompt(NoTemplate(), row["message"])
    assert text.endswith("Assistant:") and slice_of(text) == row["slice"]


def test_win_rates_by_slice():
    rows = patient_messages(3, seed=0, slices=["routine_booking", URGENT_SLICE])
    prompts, slices = [r["message"] for r in rows], [r["slice"] for r in rows]
    same = ev.win_rates(oracle_prob, prompts, slices, [BOOK] * 6, [BOOK] * 6, n_boot=200)
    assert same["all"] == {"win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 6}
    # Escalating everywhere wins on urgent prompts and loses on routine ones (a false alarm,
    # no time offered): the slices show what the average hides.
    w = ev.win_rates(oracle_prob, prompts, slices, [ESCALATE] * 6, [BOOK] * 6, n_boot=200)
    assert w[URGENT_SLICE]["win_rate"] > 0.8 and w["routine_booking"]["win_rate"] < 0.3
    expected = np.mean(DEFAULT_PANEL.preference_prob(prompts, [ESCALATE] * 6, [BOOK] * 6))
    assert w["all"]["win_rate"] == pytest.approx(expected)
    assert w["all"]["ci_low"] <= w["all"]["win_rate"] <= w["all"]["ci_high"]


def test_rubric_rates_skip_rubrics_that_do_not_apply():
    rows = patient_messages(2, seed=0, slices=["routine_booking", URGENT_SLICE])
    prompts, slices = [r["message"] for r in rows], [r["slice"] for r in rows]
    responses = [ESCALATE if s == URGENT_SLICE else BOOK for s in slices]
    rates = ev.rubric_rates(rubrics, prompts, slices, responses)
    assert rates[URGENT_SLICE]["escalation"] == 1.0 and "offers_time" not in rates[URGENT_SLICE]
    assert rates["routine_booking"]["offers_time"] == 1.0 and "escalation" not in rates["routine_booking"]
    assert rates["all"]["escalation"] == 1.0 and rates["all"]["no_false_alarm"] == 1.0


def test_aux_calibration_of_the_oracle_and_a_constant():
    p_star = np.array([0.9, 0.8, 0.3, 0.6])
    slices = ["a", "a", "b", "b"]
    oracle = ev.aux_calibration(p_star, p_star, slices)
    assert oracle["all"]["mae_to_p_star"] == 0.0 and oracle["all"]["brier"] == oracle["all"]["oracle_brier"]
    half = ev.aux_calibration(np.full(4, 0.5), p_star, slices)
    assert half["a"]["mae_to_p_star"] == pytest.approx(0.35) and half["b"]["brier"] == pytest.approx(0.25)
    # ECE over both orders of each pair: g = 1/2 everywhere is calibrated (not 0.5 off, as in the
    # chosen-first order alone, where every label is 1); g = 0.9 everywhere is 0.1 off
    assert half["all"]["ece"] == pytest.approx(0.0)
    assert ev.aux_calibration(np.full(4, 0.9), p_star, slices)["all"]["ece"] == pytest.approx(0.1)


def test_audit_truth_counts_the_top_rows():
    pairs = [{"p_star": p, "fatigued": f} for p, f in [(0.3, True), (0.8, False), (0.7, False), (0.4, False), (0.9, True)]]
    audit = [{"row": 3}, {"row": 0}, {"row": 1}, {"row": 2}, {"row": 4}]
    t = ev.audit_truth(audit, pairs, top_fraction=0.4)
    assert t["top_n"] == 2 and t["against_majority_top"] == 1.0 and t["fatigued_top"] == 0.5
    assert t["against_majority_all"] == pytest.approx(0.4) and t["fatigued_all"] == pytest.approx(0.4)


def test_workflow_refuses_to_resume_a_run_with_other_settings(tmp_path):
    import argparse

    from vrpo.experiments.scheduling.workflow import Workflow, resolve_settings

    args = argparse.Namespace(preset="quick", train_per_slice=None, eval_per_slice=None, max_steps=None,
                              max_new_tokens=None, num_ref_samples=None)
    first = Workflow(tmp_path, resolve_settings(args), "m", 0, 0.1)
    first.model = "m"
    first.check_resume()
    (tmp_path / "prompts").mkdir()  # a finished step
    first.check_resume()  # same settings: fine
    args.max_steps = 7
    other = Workflow(tmp_path, resolve_settings(args), "m", 0, 0.1)
    other.model = "m"
    with pytest.raises(ValueError, match="settings.max_steps: 2 -> 7"):
        other.check_resume()
    args.max_steps = 0
    with pytest.raises(ValueError, match="--max-steps 0"):
        resolve_settings(args)
