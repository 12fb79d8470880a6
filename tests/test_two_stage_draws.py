"""benchmarks/two_stage_known_truth.py: the summary over independent draws of the whole
pipeline (hand-computed values), and its bad flags."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("two_stage_known_truth", ROOT / "benchmarks" / "two_stage_known_truth.py")
ts = importlib.util.module_from_spec(spec)
sys.modules["two_stage_known_truth"] = ts
spec.loader.exec_module(ts)


def _report(acc_bt, acc_vrpo, ceiling=0.85):
    """A draw's report as run_draw builds it, from per-seed accuracies."""
    import numpy as np

    by_seed = {"bt": dict(enumerate(acc_bt)), "vrpo": dict(enumerate(acc_vrpo))}
    rms = {r: {"rm_accuracy_mean": float(np.mean(a)), "rm_accuracy_sd": float(np.std(a, ddof=1)),
               "reward_spread": {"normalized_margin_variance": 0.5, "sign_disagreement": 0.3}}
           for r, a in (("bt", acc_bt), ("vrpo", acc_vrpo))}
    return {"rm_accuracy_ceiling": ceiling, "reward_models": rms, "rm_accuracy_by_seed": by_seed,
            "rm_accuracy_vrpo_minus_bt": {"vrpo - bt": ts.paired(by_seed, "vrpo", "bt", float)}}


def test_across_draws_by_hand():
    """Per-draw paired means +0.10, -0.02, +0.04: mean 0.04, se = sd / sqrt(3) = 0.06 / sqrt(3);
    seed sd ratios (vrpo / bt) 0.5, 2.0, 1.0."""
    reports = {0: _report([0.5, 0.7], [0.65, 0.75]),  # diffs +0.15, +0.05: mean +0.10; sd bt 0.1414, vrpo 0.0707
               1: _report([0.6, 0.6], [0.58, 0.58]),  # -0.02 each: mean -0.02; sd 0 (no ratio)
               2: _report([0.60, 0.64], [0.62, 0.70])}  # +0.02, +0.06: mean +0.04; sd 0.0283 vs 0.0566
    out = ts.across_draws(reports)
    d = out["rm_accuracy_vrpo_minus_bt"]["vrpo - bt"]
    assert d["by_draw"] == pytest.approx([0.10, -0.02, 0.04])
    assert d["mean"] == pytest.approx(0.04)
    assert d["se"] == pytest.approx(0.06 / 3 ** 0.5)
    assert (d["positive_draws"], d["draws"]) == (2, 3)
    ratio = out["seed_sd_ratio"]["vrpo / bt"]
    assert ratio["by_draw"] == pytest.approx([0.5, 2.0])  # draw 1: bt's sd is 0, no ratio
    assert ratio["below_one"] == 1 and ratio["median"] == pytest.approx(1.25)
    md = ts.summary_markdown(reports, out, "python benchmarks/two_stage_known_truth.py --draws 0,1,2")
    assert "| reward-model accuracy: vrpo - bt | +0.100 -0.020 +0.040 | +0.040 (se 0.035) | 2 of 3 |" in md
    assert "## Draw 1: reward models" in md and "| bt (sigmoid) | 0.600 (0.000) |" in md


def test_label_seed_keeps_draw_zero_and_separates_draws():
    assert ts.label_seed(0, 3) == 103  # the single-draw benchmark's labels
    seeds = {ts.label_seed(d, s) for d in range(4) for s in range(8)}
    assert len(seeds) == 32


@pytest.mark.parametrize("argv, needle", [
    (["--rows", "bt,nope"], "--rows: unknown row 'nope'"),
    (["--draws", "0,x"], "--draws '0,x'"),
    (["--seeds", "0", "--rl-seeds", "1"], "--rl-seeds 1"),
    (["--threads", "0"], "--threads 0"),
])
def test_bad_flags_are_one_line_errors(tmp_path, argv, needle):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "two_stage_known_truth.py"), "--out",
                           str(tmp_path), *argv], capture_output=True, text=True)
    assert done.returncode != 0
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_the_benchmarks_calls_match_the_library():
    """The benchmark is too slow for the suite, so check what broke it once: every keyword it
    passes to the library's functions and configs is a parameter they have (a `resume=` that
    run_rl no longer takes failed only after an hour of reward models)."""
    import ast
    import inspect

    from vrpo.evaluate import generate
    from vrpo.experiments.imdb.pipeline import Setup, draw_samples
    from vrpo.experiments.imdb.two_stage import eval_candidates
    from vrpo.policy_stage import RLConfig, run_rl
    from vrpo.train.reward_two_stage import EvalPairs, TwoStageSpec, run_two_stage

    library = {f.__name__: f for f in (generate, Setup, draw_samples, eval_candidates, RLConfig, run_rl,
                                        EvalPairs, TwoStageSpec, run_two_stage)}
    tree = ast.parse((ROOT / "benchmarks" / "two_stage_known_truth.py").read_text())
    checked = 0
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
        if call.func.id in library:
            params = inspect.signature(library[call.func.id]).parameters
            for kw in call.keywords:
                assert kw.arg in params, f"{call.func.id}({kw.arg}=...) at line {call.lineno}"
            checked += 1
    assert checked >= 8
