"""Time `vrpo reproduce bandit` (default: all settings, 200 replicates, one-stage model and
n-sweep included) against its budget of 5 minutes on the 2-core machine.

    .venv/bin/python benchmarks/bandit_speed.py            # the default run
    .venv/bin/python benchmarks/bandit_speed.py --quick    # the demo's quick run (budget ~1 min)

Prints wall time, the budget and their ratio, and the CPU time the command used (on a shared,
busy machine the wall time can be several times the CPU time; the command runs one thread, so
on an idle machine its wall time is close to its CPU time). A fresh output folder each time.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="time the demo's --quick run instead")
    args = ap.parse_args()
    budget = 60.0 if args.quick else 300.0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vrpo", "reproduce", "bandit", "--out", tmp, "--no-progress"]
        if args.quick:
            cmd.append("--quick")
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    name = "quick" if args.quick else "default (200 replicates, all settings)"
    print(f"vrpo reproduce bandit, {name}: {seconds:.1f} s wall, {cpu:.1f} s CPU | budget {budget:.0f} s | "
          f"time/budget = {seconds / budget:.2f} (CPU/budget = {cpu / budget:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
