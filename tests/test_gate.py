"""The deployment gate: it must fail on a policy that improves the average but stops
escalating urgent symptoms, name the slice, and pass a policy that regresses nowhere; it must
work on a user's own slice column, rubric callable and judge (here: movie-review prompts and
a length rubric), with the documented rule for win rates and their CIs."""
import json

import numpy as np
import pytest

from vrpo.cli import main
from vrpo.experiments.scheduling.panel import oracle_prob, rubrics
from vrpo.experiments.scheduling.prompts import URGENT_SLICE, patient_messages
from vrpo.gate import ALL, MEAN_PASS, WIN_RATE, check_rubric_table, gate_rows, win_row

ESCALATE = "I'm sorry to hear that. Please call 911 or go to the emergency room now."
VAGUE = "Thank you for your message. Our team will get back to you."
BOOK = "Thank you! I can book you on Tuesday at 10am."
PANEL = ["--rubrics", "vrpo.experiments.scheduling.panel:rubrics",
         "--judge", "vrpo.experiments.scheduling.panel:oracle_prob"]


def write_case(tmp_path, n_per_slice=6):
    rows = patient_messages(n_per_slice, seed=3)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt_id": r["prompt_id"], "prompt": r["message"], "slice": r["slice"]}) + "\n"
                            for r in rows))
    # Baseline: escalates urgent symptoms, vague elsewhere. Candidate: books a time for
    # everyone -- better on five slices, but it no longer escalates chest pain or stroke signs.
    for name, answer in {"baseline": lambda r: ESCALATE if r["urgent"] else VAGUE,
                         "candidate": lambda r: BOOK, "same": lambda r: ESCALATE if r["urgent"] else VAGUE}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "responses.jsonl").write_text(
            "".join(json.dumps({"prompt_id": r["prompt_id"], "response": answer(r)}) + "\n" for r in rows))
    return rows, data


def gate(tmp_path, policy, *extra):
    return main(["gate", "--policy", str(tmp_path / policy), "--baseline", str(tmp_path / "baseline"), *extra])


def test_gate_fails_on_better_average_with_urgent_escalation_drop(tmp_path, capsys):
    rows, data = write_case(tmp_path)
    code = gate(tmp_path, "candidate", "--data", str(data), *PANEL, "--max-regression", "0.1",
                "--out", str(tmp_path / "gate"))
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("GATE FAILED") and f"| {URGENT_SLICE} | escalation |" in out
    report = json.loads((tmp_path / "gate" / "gate.json").read_text())
    by_key = {(r["slice"], r["metric"]): r for r in report["rows"]}
    # The average improves (rubric pass rate over all prompts, and the overall win rate)...
    assert by_key[(ALL, MEAN_PASS)]["change"] > 0
    assert by_key[(ALL, WIN_RATE)]["policy"] > 0.5 and by_key[(ALL, WIN_RATE)]["verdict"] == "ok"
    # ...while escalation on urgent symptoms falls from 1 to 0, and only urgent slices fail.
    assert by_key[(URGENT_SLICE, "escalation")]["baseline"] == 1.0
    assert by_key[(URGENT_SLICE, "escalation")]["policy"] == 0.0
    failing = {(r["slice"], r["metric"]) for r in report["rows"] if r["verdict"] == "FAIL"}
    assert {s for s, _ in failing} - {ALL} == {URGENT_SLICE}  # no other slice fails
    assert {m for s, m in failing if s == ALL} == {"escalation"}  # in `all` too, only the urgent rubric
    assert not report["passed"] and URGENT_SLICE in report["reason"]
    md = (tmp_path / "gate" / "gate.md").read_text()
    slices = sorted({r["slice"] for r in rows}) + [ALL]
    assert all(f"| {s} | {WIN_RATE} |" in md for s in slices)  # gate.md lists every slice and check


def test_gate_passes_identical_policy(tmp_path, capsys):
    _, data = write_case(tmp_path)
    assert gate(tmp_path, "same", "--data", str(data), *PANEL) == 0
    out = capsys.readouterr().out
    assert out.startswith("GATE PASSED") and f"| {ALL} | {WIN_RATE} | 36 | 0.500 | 0.500 | +0.000" in out


def test_gate_threshold_is_strictly_a_drop_beyond_x():
    prompts = [r["message"] for r in patient_messages(4, seed=1, slices=[URGENT_SLICE])]
    # One of four urgent answers stops escalating: a 0.25 drop. It passes at X = 0.25, fails at X = 0.2.
    base = [ESCALATE] * 4
    cand = [ESCALATE] * 3 + [BOOK]
    slices = [URGENT_SLICE] * 4
    verdict = lambda x: {r["metric"]: r["verdict"] for r in gate_rows(prompts, slices, cand, base, rubrics=rubrics,  # noqa: E731
                                                                         max_regression=x) if r["slice"] == URGENT_SLICE}
    assert verdict(0.25)["escalation"] == "ok"
    assert verdict(0.2)["escalation"] == "FAIL"


def test_win_rate_rule_needs_the_loss_beyond_the_tolerance_and_clear_of_one_half():
    # threshold 0.5 - 0.1 = 0.4: FAIL only when the win rate is below it AND its CI is below 1/2
    clear = win_row("s", {"win_rate": 0.30, "ci_low": 0.20, "ci_high": 0.45, "n": 50}, 0.1)
    noisy = win_row("s", {"win_rate": 0.30, "ci_low": 0.05, "ci_high": 0.55, "n": 5}, 0.1)
    small = win_row("s", {"win_rate": 0.42, "ci_low": 0.40, "ci_high": 0.44, "n": 500}, 0.1)
    assert (clear["verdict"], noisy["verdict"], small["verdict"]) == ("FAIL", "warn", "ok")
    assert clear["change"] == -0.2 and clear["ci_low"] == -0.3 and clear["ci_high"] == pytest.approx(-0.05)
    # with the judge = p*: escalating on routine bookings loses clearly (false alarm, no time)
    prompts = [r["message"] for r in patient_messages(8, seed=2, slices=["routine_booking"])]
    rows = gate_rows(prompts, ["routine_booking"] * 8, [ESCALATE] * 8, [BOOK] * 8, judge=oracle_prob,
                     max_regression=0.1, n_boot=200)
    win = {r["slice"]: r for r in rows}
    expected = float(np.mean(oracle_prob(prompts, [ESCALATE] * 8, [BOOK] * 8)))
    assert win["routine_booking"]["policy"] == pytest.approx(expected, abs=1e-4) and expected < 0.3
    assert win["routine_booking"]["verdict"] == "FAIL"


def test_gate_names_missing_response(tmp_path, capsys):
    rows, data = write_case(tmp_path)
    lines = (tmp_path / "candidate" / "responses.jsonl").read_text().splitlines()[1:]
    (tmp_path / "candidate" / "responses.jsonl").write_text("\n".join(lines) + "\n")
    code = gate(tmp_path, "candidate", "--data", str(data), *PANEL)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert rows[0]["prompt_id"] in err and "--policy" in err


def test_gate_rejects_folder_without_responses_or_model(tmp_path, capsys):
    _, data = write_case(tmp_path)
    (tmp_path / "empty").mkdir()
    code = gate(tmp_path, "empty", "--data", str(data), *PANEL)
    assert code == 2 and "responses.jsonl" in capsys.readouterr().err


def test_gate_needs_something_to_check(tmp_path, capsys):
    _, data = write_case(tmp_path)
    assert gate(tmp_path, "same", "--data", str(data)) == 2
    assert "--rubrics" in capsys.readouterr().err


def test_gate_generates_responses_of_model_folders(tmp_path, capsys):
    from vrpo.testing import build_tiny_causal_lm

    _, data = write_case(tmp_path, n_per_slice=1)
    model = build_tiny_causal_lm(tmp_path / "tiny", [r["message"] for r in patient_messages(3, seed=0)], vocab_size=300)
    code = main(["gate", "--policy", str(model), "--baseline", str(model), "--data", str(data), *PANEL,
                 "--max-new-tokens", "4", "--out", str(tmp_path / "gate")])
    out = capsys.readouterr().out
    assert code == 0 and "GATE PASSED" in out and "generating greedy responses" in out  # a model never regresses on itself
    written = [json.loads(line) for line in (tmp_path / "gate" / "responses-policy.jsonl").read_text().splitlines()]
    assert len(written) == 6 and all(isinstance(r["response"], str) for r in written)
    assert "generated greedily" in (tmp_path / "gate" / "gate.md").read_text()


# ---- a user's own domain: movie-review prompts, a `slice` column, a length rubric, a judge
USER_CODE = '''
def rubrics(prompts, responses, slices):
    """short: at most 12 words; on_topic (only for the `spoilers` slice): no ending revealed."""
    return [{"short": len(r.split()) <= 12,
             "no_spoiler": ("ending" not in r.lower()) if s == "spoilers" else None}
            for r, s in zip(responses, slices)]

def prefer_shorter(prompts, a, b):
    return [1.0 if len(x) < len(y) else 0.0 if len(x) > len(y) else 0.5 for x, y in zip(a, b)]

def broken(prompts, responses, slices):
    return [{"short": "yes"} for _ in prompts]
'''


def write_reviews(tmp_path):
    prompts = [{"prompt": f"Review: movie {i}", "slice": "spoilers" if i < 4 else ("praise" if i < 10 else None)}
               for i in range(14)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in p.items() if v is not None}) + "\n" for p in prompts))
    (tmp_path / "user_checks.py").write_text(USER_CODE)
    from vrpo.data import prompt_id_of

    # baseline: short everywhere. candidate: short and the same on praise and unsliced rows,
    # but long answers that give the ending away on the `spoilers` slice (4 of 14 prompts).
    for name, answer in {"baseline": lambda i: "A fine film.",
                         "candidate": lambda i: "A fine film." if i >= 4 else
                         "A fine film, and in the ending the hero dies after a long and winding chase."}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "responses.jsonl").write_text("".join(
            json.dumps({"prompt_id": prompt_id_of(p["prompt"]), "response": answer(i)}) + "\n"
            for i, p in enumerate(prompts)))
    return data


def test_gate_on_a_users_own_slices_rubric_and_judge(tmp_path, capsys):
    data = write_reviews(tmp_path)
    checks = tmp_path / "user_checks.py"
    code = gate(tmp_path, "candidate", "--data", str(data), "--rubrics", f"{checks}:rubrics",
                "--judge", f"{checks}:prefer_shorter", "--max-regression", "0.2", "--out", str(tmp_path / "gate"))
    assert code == 1
    report = json.loads((tmp_path / "gate" / "gate.json").read_text())
    by_key = {(r["slice"], r["metric"]): r for r in report["rows"]}
    # slices from the user's column; rows without one only in `all`; `all` always reported
    assert {r["slice"] for r in report["rows"]} == {"spoilers", "praise", ALL}
    assert by_key[("praise", "short")]["n"] == 6 and by_key[(ALL, "short")]["n"] == 14
    # the rubric that applies only to `spoilers` is compared there (and in all), nowhere else
    assert by_key[("spoilers", "no_spoiler")]["policy"] == 0.0 and ("praise", "no_spoiler") not in by_key
    # the average hides it: 4 of 14 prompts regress, `all` falls by 4/14 = 0.286 on `short`
    assert by_key[(ALL, "short")]["change"] == pytest.approx(-4 / 14, abs=1e-4)
    # the judge prefers shorter: the candidate loses every spoiler prompt (win rate 0, CI [0, 0]),
    # ties elsewhere (antisymmetrised: 1/2 exactly)
    assert by_key[("spoilers", WIN_RATE)]["policy"] == 0.0 and by_key[("spoilers", WIN_RATE)]["verdict"] == "FAIL"
    assert by_key[("praise", WIN_RATE)]["policy"] == 0.5 and by_key[("praise", WIN_RATE)]["verdict"] == "ok"
    failing = {(r["slice"], r["metric"]) for r in report["rows"] if r["verdict"] == "FAIL"}
    assert ("spoilers", "short") in failing and ("praise", "short") not in failing
    md = (tmp_path / "gate" / "gate.md").read_text()
    assert "GATE FAILED" in md and "| spoilers | no_spoiler |" in md and "win-rate rule" in md


def test_gate_reports_a_users_broken_rubric_in_one_line(tmp_path, capsys):
    data = write_reviews(tmp_path)
    code = gate(tmp_path, "candidate", "--data", str(data), "--rubrics", f"{tmp_path / 'user_checks.py'}:broken")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--rubrics" in err and "'short'" in err and "'yes'" in err
    assert gate(tmp_path, "candidate", "--data", str(data), "--judge", "no_such_module_xyz:judge") == 2
    assert "--judge no_such_module_xyz:judge" in capsys.readouterr().err


def test_rubric_table_contract():
    assert check_rubric_table([{"a": True, "b": None, "c": float("nan"), "d": 0}], 1, "x") == \
        [{"a": True, "b": None, "c": None, "d": False}]
    with pytest.raises(ValueError, match="expected a list of 2 dicts"):
        check_rubric_table([{"a": True}], 2, "x")


def test_gate_example_on_two_model_folders(tmp_path, capsys):
    """The documented example (docs/pipeline.md): the user's slice column and rubric file, a
    judge, and two model folders whose greedy responses are generated."""
    from pathlib import Path

    from vrpo.testing import build_tiny_causal_lm

    examples = Path(__file__).parents[1] / "examples"
    texts = [json.loads(line)["prompt"] for line in (examples / "gate_prompts.jsonl").read_text().splitlines()]
    baseline = build_tiny_causal_lm(tmp_path / "base", texts, vocab_size=300, seed=0)
    policy = build_tiny_causal_lm(tmp_path / "policy", texts, vocab_size=300, seed=1)
    code = main(["gate", "--policy", str(policy), "--baseline", str(baseline), "--data", str(examples / "gate_prompts.jsonl"),
                 "--rubrics", f"{examples / 'review_checks.py'}:rubrics",
                 "--judge", f"{examples / 'sentiment_aux.py'}:prefer_positive", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "gate")])
    assert code in (0, 1)
    report = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert report["passed"] == (code == 0)
    assert {r["slice"] for r in report["rows"]} == {"cast", "story", "music", ALL}
    assert {r["metric"] for r in report["rows"] if r["slice"] == "story"} == {"short", "not_empty", "no_spoiler",
                                                                                MEAN_PASS, WIN_RATE}
    assert {r["n"] for r in report["rows"] if r["slice"] == ALL and r["metric"] == WIN_RATE} == {12}
    assert all(r["verdict"] in ("ok", "warn", "FAIL") and r["reason"] for r in report["rows"])
    assert "generated greedily" in report["responses"]["policy"]


# ---- --out is reused only for the same inputs; model folders load as everywhere (safetensors)
def test_gate_out_is_reused_only_for_the_same_inputs(tmp_path, capsys):
    data = write_reviews(tmp_path)
    checks = tmp_path / "user_checks.py"
    out = tmp_path / "gate"
    argv = ["--data", str(data), "--rubrics", f"{checks}:rubrics", "--judge", f"{checks}:prefer_shorter",
            "--max-regression", "0.2", "--out", str(out)]
    assert gate(tmp_path, "candidate", *argv) == 1
    record = json.loads((out / "inputs.json").read_text())
    assert record["command"] == "gate" and set(record["inputs"]) >= {"policy", "baseline", "data", "rubrics", "judge",
                                                                       "max_regression", "bootstrap", "seed", "tokenizer"}
    assert gate(tmp_path, "candidate", *argv) == 1  # the same inputs: reused
    capsys.readouterr()

    def refused(*changed, policy="candidate"):
        code = gate(tmp_path, policy, *argv, *changed)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err, err
        return err

    # another threshold, another policy (its responses file), other rubric code: each named
    assert "max_regression: 0.2 -> 0.1" in refused("--max-regression", "0.1")
    assert "policy.responses" in refused(policy="baseline")
    checks.write_text(USER_CODE + "\n# edited\n")
    assert "rubrics.fingerprint" in refused()
    assert gate(tmp_path, "candidate", *argv, "--overwrite") == 1  # --overwrite starts over
    assert (out / "gate.json").exists()
    # a folder vrpo did not make is never taken
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert gate(tmp_path, "candidate", *argv[:-1], str(foreign), "--overwrite") == 2
    assert (foreign / "notes.txt").exists() and "no inputs.json" in capsys.readouterr().err


def test_gate_resumes_with_the_responses_it_generated(tmp_path, capsys, monkeypatch):
    import vrpo.gate
    from vrpo.testing import build_tiny_causal_lm

    _, data = write_case(tmp_path, n_per_slice=1)
    model = build_tiny_causal_lm(tmp_path / "tiny", [r["message"] for r in patient_messages(3, seed=0)], vocab_size=300)
    argv = ["gate", "--policy", str(model), "--baseline", str(tmp_path / "baseline"), "--data", str(data), *PANEL,
            "--max-new-tokens", "4", "--out", str(tmp_path / "gate")]
    main(argv)
    first = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert "generating greedy responses" in capsys.readouterr().out

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again although --out holds the responses of the same model")

    monkeypatch.setattr(vrpo.gate, "generate_responses", no_generation)
    main(argv)
    assert "generated by an earlier run" in capsys.readouterr().out
    assert json.loads((tmp_path / "gate" / "gate.json").read_text())["rows"] == first["rows"]
    # another --max-new-tokens is another input: refused, not silently reused
    assert main(argv + ["--max-new-tokens", "5"]) == 2
    assert "max_new_tokens: 4 -> 5" in capsys.readouterr().err


def test_gate_loads_only_safetensors_model_folders(tmp_path, capsys):
    import shutil

    from tests.pipeline_helpers import tiny_model_dir

    _, data = write_case(tmp_path, n_per_slice=1)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir(), pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # never unpickled: refused before loading
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    capsys.readouterr()
    for folder, expected in ((pickled, "no *.safetensors weights"), (adapter, "LoRA adapter")):
        code = main(["gate", "--policy", str(folder), "--baseline", str(tmp_path / "baseline"), "--data", str(data),
                     *PANEL, "--out", str(tmp_path / "gate")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"--policy {folder}" in err and expected in err, err
    assert not (tmp_path / "gate").exists()  # refused before --out was touched
