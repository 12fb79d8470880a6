"""The pip path: users install the wheel next to their own torch. The built wheel must hold
every module the commands import, declare loose dependency ranges (no pins, so it never
replaces the user's torch), and run from outside the repository; and each extra must bring
everything the commands it names need (installed into an environment of its own, offline)."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def build_wheel(folder: Path) -> Path:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(folder), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = folder.glob("vrpo-*.whl")
    return wheel


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {n for n in names if n.endswith(".py")}
    source = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "vrpo").rglob("*.py")}
    assert source <= shipped, f"modules missing from the wheel: {sorted(source - shipped)}"
    assert any(n.endswith("licenses/LICENSE") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires and all("==" not in r for r in requires), requires  # the user's torch stays
    extras = set(re.findall(r"^Provides-Extra: (\S+)", metadata, re.M))
    assert extras == set(EXTRA_COMMANDS) | {"all"}, extras  # every extra is checked below

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                              str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    # from an empty folder, with only the installed copy (not src/) on the path: every command imports
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import importlib, vrpo; from vrpo.cli import COMMANDS\n"
            "assert vrpo.__file__.startswith(sys.argv[1]), vrpo.__file__\n"
            "[importlib.import_module(m) for m, _ in COMMANDS.values()]\n"
            "from vrpo.experiments.reproduce import EXPERIMENTS\n"
            "print('ok', len(COMMANDS), len(EXPERIMENTS))")
    run = subprocess.run([sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-2000:]


# --------------------------------------------------------------------------------------
# Each extra in a fresh environment
# --------------------------------------------------------------------------------------
# extra -> the commands it promises, run offline in an environment holding only the core
# install and that extra ("{examples}" and "{root}" are filled in; "vrpo" runs the installed copy)
EXTRA_COMMANDS: dict[str, list[list[str]]] = {
    "aux": [["vrpo", "fit-aux", "--data", "{examples}/quickstart.jsonl", "--model", "gpm-minilm", "--folds", "2",
             "--epochs", "2", "--out", "aux"]],
    "peft": [["vrpo", "train", "--method", "dpo", "--model", "tiny", "--data", "{examples}/quickstart.jsonl",
              "--out", "lora", "--max-steps", "1", "--per-device-train-batch-size", "4", "--lora-r", "4"]],
    "rl": [["vrpo", "rl", "--reward-model", "rm", "--model", "tiny", "--prompts", "{examples}/quickstart.jsonl",
            "--out", "rl", "--num-generations", "2", "--batch-size", "4", "--max-completion-length", "6",
            "--max-steps", "1"]],
    "experiments": [["vrpo", "reproduce", "imdb", "--preset", "micro", "--out", "imdb"]],
    "test": [["pytest", "-q", "-p", "no:cacheprovider", "{root}/tests/test_losses.py",
              "{root}/tests/test_train_parity.py"]],
}
# the core install's own commands (the quickstart), which also make the inputs above
CORE_COMMANDS = [
    ["vrpo", "tiny-model", "--out", "tiny", "--texts", "{examples}/quickstart.jsonl"],
    ["vrpo", "sample", "--model", "tiny", "--prompts", "{examples}/quickstart.jsonl", "--num-samples", "2",
     "--max-new-tokens", "6", "--out", "samples"],
    ["vrpo", "score", "--aux", "{examples}/sentiment_aux.py:prefer_positive", "--data", "{examples}/quickstart.jsonl",
     "--samples", "samples", "--out", "scored"],
    ["vrpo", "train", "--method", "vrpo", "--model", "tiny", "--data", "scored", "--out", "run", "--max-steps", "1",
     "--per-device-train-batch-size", "4"],
    ["vrpo", "train-rm", "--method", "bt", "--model", "tiny", "--data", "{examples}/quickstart.jsonl", "--out", "rm",
     "--max-steps", "1", "--per-device-train-batch-size", "4"],
]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def pinned_torch() -> str:
    """``torch==X`` from requirements.txt: pip then takes the CPU build on disk, never a CUDA one."""
    return next(line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.startswith("torch=="))


def clean_env() -> dict:
    """The environment without PYTHONPATH (the test suite runs with src/ on it: pip would take the
    source tree's egg-info for an installed vrpo), offline for the hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OFFLINE)
    return env


def site_packages(python: Path) -> str:
    return subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def new_env(folder: Path, requirements: list[str], on_top_of: Path | None = None) -> Path:
    """A fresh venv with ``requirements`` installed; ``on_top_of``: another venv whose
    packages it sees (a .pth line), so an extra is installed alone beside the core install."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    if on_top_of is not None:
        Path(site_packages(python), "_core.pth").write_text(site_packages(on_top_of / "bin" / "python") + "\n")
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], capture_output=True, text=True,
                         env=clean_env())
    assert pip.returncode == 0, f"pip install {' '.join(requirements)}:\n{pip.stderr[-3000:]}"
    return python


def run_commands(python: Path, commands: list[list[str]], cwd: Path, label: str) -> None:
    env = dict(clean_env(), OMP_NUM_THREADS="1")
    for command in commands:
        argv = [a.format(examples=EXAMPLES, root=ROOT) for a in command]
        # -I: only the environment's installed copy of vrpo, not src/ or the working directory
        done = subprocess.run([str(python), "-I", "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"[{label}] {' '.join(argv)}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_each_extra_installs_and_runs_its_commands_offline(tmp_path):
    """The core wheel + pinned torch in a fresh venv runs the quickstart; then each extra,
    installed into a venv of its own on top of that core install, runs the command it promises."""
    wheel = build_wheel(tmp_path / "dist")
    work = tmp_path / "work"
    work.mkdir()
    try:
        core = new_env(tmp_path / "core", [pinned_torch(), str(wheel)])
        run_commands(core, CORE_COMMANDS, work, "core")
        for extra, commands in EXTRA_COMMANDS.items():
            python = new_env(tmp_path / extra, [f"{wheel}[{extra}]"], on_top_of=tmp_path / "core")
            run_commands(python, commands, work, extra)
            shutil.rmtree(tmp_path / extra)
        new_env(tmp_path / "all", [f"{wheel}[all]"], on_top_of=tmp_path / "core")  # resolves: the union
    finally:  # the environments hold ~2 GB
        for folder in ["core", "all", *EXTRA_COMMANDS]:
            shutil.rmtree(tmp_path / folder, ignore_errors=True)
