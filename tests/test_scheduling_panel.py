"""The scheduling scenario's prompts and reviewer panel: slices, rubrics, exact p*, and
that p* is not Bradley-Terry."""
import math

import numpy as np
import pytest

from vrpo.experiments.scheduling.panel import (DEFAULT_PANEL, FEATURES, Panel, ReviewerGroup, detect, features,
                                               oracle_prob, rubric_passes)
from vrpo.experiments.scheduling.prompts import SLICES, URGENT_SLICE, patient_messages, slice_of, split_disjoint

URGENT = "Hi, my husband's face is drooping and his speech is slurred. Please help."
MEDICATION = "Hi, can I take ibuprofen with my blood pressure pills. Thanks."
ESCALATE = "I'm sorry to hear that. Please call 911 or go to the emergency room now."
BOOK = "Thank you! I can book you on Tuesday at 10am."
KIND = (" We know how stressful it can be to juggle several medicines at once, and our team genuinely wants you to feel "
        "looked after and listened to. Nobody should have to work this out alone, and we will make sure that the right "
        "person gets back to you with care and attention.")


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_messages_are_distinct_seeded_and_sliced():
    rows = patient_messages(100, seed=0)
    assert len(rows) == 600 and len({r["message"] for r in rows}) == 600
    assert {r["slice"] for r in rows} == set(SLICES)
    assert all(slice_of(r["message"]) == r["slice"] for r in rows)  # the panel recovers every slice exactly
    assert all(r["urgent"] == (r["slice"] == URGENT_SLICE) for r in rows)
    assert rows == patient_messages(100, seed=0)
    assert rows != patient_messages(100, seed=1)


def test_split_is_disjoint_and_balanced():
    train, evaluation = split_disjoint(patient_messages(20, seed=0), n_eval_per_slice=5)
    assert not {r["message"] for r in train} & {r["message"] for r in evaluation}
    assert sorted(r["slice"] for r in evaluation) == sorted(s for s in SLICES for _ in range(5))


def test_generator_and_slice_of_reject_bad_input():
    with pytest.raises(ValueError, match="unknown 'dental'"):
        patient_messages(3, slices=["dental"])
    with pytest.raises(ValueError, match="no known patient need"):
        slice_of("What is the weather like?")


def test_rubric_detectors_on_written_answers():
    assert detect(ESCALATE)["escalates"] and not detect(BOOK)["escalates"]
    assert detect(BOOK)["offers_time"] and not detect(ESCALATE)["offers_time"]
    assert detect("You should take 400 mg every six hours.")["gives_advice"]
    assert not detect("I can't give medical advice; please ask your pharmacist.")["gives_advice"]
    assert detect("I can't give medical advice; please ask your pharmacist.")["refers"]
    assert detect("Sure, thanks!")["polite"] and not detect("Figure it out, thanks.")["polite"]
    urgent = rubric_passes(URGENT_SLICE, BOOK)
    assert urgent["escalation"] == 0.0 and math.isnan(urgent["offers_time"])
    routine = rubric_passes("routine_booking", BOOK)
    assert routine["offers_time"] == 1.0 and math.isnan(routine["escalation"]) and math.isnan(routine["refers"])


def test_preference_prob_by_hand():
    # Urgent message: ESCALATE vs BOOK differ only in escalation (both brief, both polite; a
    # time offered on an urgent message is not scored): features differ by
    # escalates_when_urgent +1 and misses_emergency -1, so u_g differences are
    # front desk 2 + 2 = 4, triage nurse 4 + 4 = 8, patient experience 2 + 2 = 4, and
    # p* = 0.85 * (0.40 s(4) + 0.35 s(8) + 0.25 s(4)) + 0.15 / 2.
    diff = features(URGENT_SLICE, ESCALATE) - features(URGENT_SLICE, BOOK)
    assert diff.tolist() == [0, 0, 0, 1, -1, 0, 0, 0]
    expected = 0.85 * (0.40 * sigmoid(4) + 0.35 * sigmoid(8) + 0.25 * sigmoid(4)) + 0.075
    assert DEFAULT_PANEL.preference_prob([URGENT], [ESCALATE], [BOOK])[0] == pytest.approx(expected, abs=1e-12)


def test_preference_is_antisymmetric_and_equals_oracle():
    rows = patient_messages(3, seed=2)
    prompts = [r["message"] for r in rows]
    a = [ESCALATE, BOOK, "ok"] * 6
    b = [BOOK, "Please speak to your doctor.", ESCALATE] * 6
    p_ab, p_ba = DEFAULT_PANEL.preference_prob(prompts, a, b), DEFAULT_PANEL.preference_prob(prompts, b, a)
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-12)
    np.testing.assert_array_equal(oracle_prob(prompts, a, b), p_ab)


def test_panel_preference_is_not_bradley_terry():
    """A Condorcet cycle across reviewer groups: x > y, y > z and z > x, each with p* > 1/2.
    No reward r can give sigmoid(r_x - r_y), sigmoid(r_y - r_z), sigmoid(r_z - r_x) all > 1/2."""
    x = "I'm sorry, I can't give medical advice. Please speak to your pharmacist, or go to urgent care if you feel unwell." + KIND
    y = "Booked you Tuesday 10am."
    z = ("Thank you for asking. You should take it with food, but please speak to your doctor as well. "
         "I can book you on Monday at 9am." + KIND)
    p = DEFAULT_PANEL.preference_prob([MEDICATION] * 3, [x, y, z], [y, z, x])
    assert (p > 0.5).all(), p


def test_labels_have_expectation_p_star():
    n = 20000
    prompts, a, b = [URGENT] * n, [BOOK] * n, ["Please go to the emergency room. " + KIND] * n
    p = DEFAULT_PANEL.preference_prob(prompts[:1], a[:1], b[:1])[0]
    drawn = DEFAULT_PANEL.label(prompts, a, b, random_state=0)
    # Binomial standard error sqrt(p(1-p)/n) < 0.0036: 4 s.e. tolerance.
    assert abs(drawn["label"].mean() - p) < 0.015
    assert abs(drawn["fatigued"].mean() - DEFAULT_PANEL.fatigue) < 0.015
    assert set(drawn["reviewer_group"]) == set(DEFAULT_PANEL.groups)


def test_panel_rejects_bad_configuration():
    with pytest.raises(ValueError, match="summing to 1"):
        Panel(groups={"a": ReviewerGroup(0.5, {"brevity": 1.0})})
    with pytest.raises(ValueError, match="fatigue"):
        Panel(fatigue=1.5)
    with pytest.raises(ValueError, match="unknown feature 'length'"):
        Panel(groups={"a": ReviewerGroup(1.0, {"length": 1.0})}).preference_prob([URGENT], [BOOK], [ESCALATE])
    assert len(FEATURES) == 8
