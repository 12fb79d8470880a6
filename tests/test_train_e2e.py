"""End to end, as a user runs it: training under 2 CPU processes (gloo DDP) giving the
parameters of 1 process at the same global batch. (The README quickstart itself runs
verbatim in tests/test_readme.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pipeline_helpers import tiny_model_dir, write_scored

def _params(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process(tmp_path):
    data = write_scored(tmp_path / "d.jsonl", n=8)
    common = ["-m", "vrpo", "train", "--method", "vrpo", "--model", str(tiny_model_dir()), "--data", str(data),
              "--max-steps", "2", "--learning-rate", "1.0", "--max-length", "64", "--max-prompt-length", "32",
              "--cache-dir", str(tmp_path / "cache"),
              # SGD, not AdamW: Adam divides each update by the gradient's size, so a near-zero gradient's
              # float32 rounding (the processes pad their batches differently) becomes a step of up to the
              # learning rate; SGD compares the two computations without that magnifier
              "--training-args", '{"optim": "sgd"}']
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one"), "--per-device-train-batch-size", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common, "--out",
                          str(tmp_path / "two"), "--per-device-train-batch-size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b, init = _params(tmp_path / "one"), _params(tmp_path / "two"), _params(tiny_model_dir())
    assert a.keys() == b.keys()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # training moved the parameters
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
