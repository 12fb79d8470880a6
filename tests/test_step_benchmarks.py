"""The step-cost scripts under benchmarks/ run end to end on CPU in their tiny settings (they
measure nothing there: the numbers in docs/cost.md come from their full settings)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_gpu_step_script_runs_on_cpu_in_its_tiny_setting():
    out = _run("gpu_step.py", "--tiny")
    assert "cpu (not a measurement)" in out
    for line in ("dpo", "vrpo K=8 one pass", "vrpo K=8 two passes", "vrpo K=8 two passes, shared"):
        assert sum(row.startswith(line + " ") for row in out.splitlines()) == 2, line  # LoRA and full


@pytest.mark.slow
def test_memory_script_prints_the_table_and_the_verdicts():
    out = _run("memory.py", "--tiny")
    assert "two-pass VRPO K=8 / two-pass DPO peak growth" in out
    assert "vrpo K=8: two-pass / one-pass step time" in out
    # the two-pass step is the one-pass step: its first gradients, and the weights after the steps
    # (a wrong gradient would move some weight by about a whole update)
    line = [row for row in out.splitlines() if "gradients of the first step, two-pass vs one pass:" in row][0]
    assert float(line.split("largest relative difference ")[1].split()[0]) < 1e-4, line
    line = [row for row in out.splitlines() if "weights after 2 AdamW steps, two-pass vs one pass:" in row][0]
    gap, update = (float(line.split(key)[1].split()[0].strip("();")) for key in ("max |difference| ", "largest update "))
    assert gap < 0.1 * update, line
