"""The command line: every registered command (and experiment) imports and prints help,
and top-level help does not import torch (so it stays fast)."""
import subprocess
import sys

import pytest

from vrpo.cli import COMMANDS, main
from vrpo.experiments.reproduce import EXPERIMENTS


def test_top_level_help_lists_commands_without_importing_torch():
    code = ("import sys; from vrpo.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'vrpo --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: vrpo " + name in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_each_experiment_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", name, "--help"])
    assert e.value.code == 0


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_debug_switch_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["reproduce", "bandit", "--out", str(tmp_path / "x"), "--replicates", "1"]
    monkeypatch.delenv("VRPO_DEBUG", raising=False)
    assert main(argv) == 2  # default: one line, exit status 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="--replicates 1"):
        main(["--debug", *argv])
    monkeypatch.setenv("VRPO_DEBUG", "1")
    with pytest.raises(ValueError, match="--replicates 1"):
        main(argv)
