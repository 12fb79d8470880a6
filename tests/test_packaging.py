"""The pip path: users install the wheel next to their own torch. The built wheel must hold
every module the commands import, declare loose dependency ranges (no pins, so it never
replaces the user's torch), and run from outside the repository."""
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("vrpo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {n for n in names if n.endswith(".py")}
    source = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "vrpo").rglob("*.py")}
    assert source <= shipped, f"modules missing from the wheel: {sorted(source - shipped)}"
    assert any(n.endswith("licenses/LICENSE") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires and all("==" not in r for r in requires), requires  # the user's torch stays

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
