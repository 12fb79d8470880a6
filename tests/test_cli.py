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


def _parser_of(argv_prefix):
    """The parser that handles ``vrpo ARGV_PREFIX ...`` (a command, or an experiment of reproduce)."""
    import argparse

    from vrpo.cli import build_parser

    parser = build_parser(argv_prefix[0])
    for name in argv_prefix:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


COMMAND_PARSERS = [[name] for name in sorted(COMMANDS) if name != "reproduce"] + \
    [["reproduce", name] for name in sorted(EXPERIMENTS)]


@pytest.mark.parametrize("argv", COMMAND_PARSERS, ids=" ".join)
def test_every_flag_has_help_and_a_shown_default(argv):
    """One consistent CLI: each flag says what it does and what happens without it; choices
    are listed; every command that writes a folder takes --overwrite."""
    import argparse

    parser = _parser_of(argv)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.help, (argv, action.option_strings)
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert action.required or "default" in shown or "(required" in shown, (argv, action.option_strings, shown)
        if action.choices is not None:
            assert "{" in parser.format_usage() or action.metavar, (argv, action.option_strings)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert "--out" not in flags or "--overwrite" in flags, argv  # every command that writes a folder, gate included


@pytest.mark.parametrize("name", ["train", "train-rm"])
def test_method_specific_flags_are_grouped_under_their_method(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = capsys.readouterr().out
    assert "vrpo only (--method vrpo):" in text
    vrpo_group = text.split("vrpo only (--method vrpo):")[1]
    assert "--num-ref-samples" in vrpo_group and "--control-variate-coef" in vrpo_group
    if name == "train":
        assert "--label-smoothing" in text.split("cdpo only (--method cdpo):")[1].split("\n\n")[0]
        assert "--flip-rate" in text.split("rdpo only (--method rdpo):")[1].split("\n\n")[0]
        assert "{cdpo,dpo,rdpo,vrpo}" in text
    assert "hinge" in text and "ipo" in text  # the base losses are listed
