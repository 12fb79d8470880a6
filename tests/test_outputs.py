"""The shared user-input mechanisms: typed flags, the one-line parser, output-folder reuse, the lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vrpo.cli_args import (HALF_OPEN_RATE, NONNEGATIVE_INT, OneLineParser, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY,
                           int_list, json_object)
from vrpo.errors import UserError, check_writable_folder, user_code
from vrpo.outputs import LOCK, RECORD, claim_output, differences, folder_lock


@pytest.mark.parametrize("kind, good, bad", [
    (POSITIVE_INT, ["1", "64", 3, 2.0], ["0", "-1", "1.5", "x", True, ""]),
    (NONNEGATIVE_INT, ["0", "7"], ["-1", "nan"]),
    (POSITIVE_FLOAT, ["1e-5", "2"], ["0", "-1e-3", "nan", "inf"]),
    (PROBABILITY, ["0", "1", "0.3"], ["-0.1", "1.01", "nan"]),
    (HALF_OPEN_RATE, ["0", "0.49"], ["0.5", "-0.1"]),
])
def test_typed_flags_accept_and_refuse_in_one_line(kind, good, bad):
    for v in good:
        kind(v) if isinstance(v, str) else kind.check(v, "--x")
    for v in bad:
        with pytest.raises(UserError, match=r"^--x .*expected"):
            kind.check(v, "--x")


def test_parser_errors_are_one_line_with_exit_2(capsys):
    p = OneLineParser(prog="vrpo sample")
    p.add_argument("--max-prompts", type=POSITIVE_INT)
    p.add_argument("--k", type=int_list(2))
    p.add_argument("--training-args", type=json_object)
    for argv in (["--max-prompts", "-1"], ["--max-prompts", "0"], ["--k", "1,4"], ["--training-args", "[1]"],
                 ["--nope"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vrpo sample: error:"), err
    assert p.parse_args(["--k", "2,4,8"]).k == [2, 4, 8]


def test_user_code_names_the_spec_and_the_error():
    with pytest.raises(UserError, match=r"^--aux judge.py:f: your code raised ZeroDivisionError: division by zero$"):
        with user_code("--aux judge.py:f"):
            1 / 0
    with pytest.raises(UserError, match="^ours$"):  # our own errors pass unchanged
        with user_code("--aux x"):
            raise UserError("ours")


def test_unwritable_folder_is_a_user_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_writable_folder(f)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(UserError, match="cannot write there"):
            check_writable_folder(ro / "out")


def test_folder_reused_only_for_the_same_inputs(tmp_path):
    out = tmp_path / "run"
    inputs = {"method": "vrpo", "learning_rate": 1e-5, "data": {"fingerprint": "a" * 64}}
    claim_output(out, "train", inputs)
    (out / "checkpoint-2").mkdir()
    assert json.loads((out / RECORD).read_text())["inputs"]["method"] == "vrpo"
    claim_output(out, "train", dict(inputs))  # same inputs: resume, nothing deleted
    assert (out / "checkpoint-2").exists()
    other = dict(inputs, method="dpo", learning_rate=1e-3)
    with pytest.raises(UserError) as e:
        claim_output(out, "train", other)
    msg = str(e.value)
    assert "method: vrpo -> dpo" in msg and "learning_rate: 1e-05 -> 0.001" in msg and "--overwrite" in msg
    assert (out / "checkpoint-2").exists()  # nothing lost by a refusal
    with pytest.raises(UserError, match="made by `vrpo train`"):
        claim_output(out, "score", inputs)  # another command's folder
    claim_output(out, "train", other, overwrite=True)
    assert not (out / "checkpoint-2").exists()
    assert json.loads((out / RECORD).read_text())["inputs"]["method"] == "dpo"


def test_foreign_folder_never_deleted(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not empty and has no inputs.json"):
            claim_output(mine, "train", {"a": 1}, overwrite=overwrite)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_differences_flatten_and_shorten():
    d = differences({"a": {"b": 1}, "fp": "f" * 64}, {"a": {"b": 2}, "fp": "0" * 64, "new": True})
    assert d == ["a.b: 1 -> 2", "fp: ffffffffffff -> 000000000000", "new: <absent> -> true"]


def test_second_writer_refused_and_stale_lock_taken_over(tmp_path):
    out = tmp_path / "samples"
    with folder_lock(out, "sample"):
        assert (out / LOCK).exists()
        code = ("import sys; from vrpo.outputs import folder_lock\n"
                "try:\n    with folder_lock(sys.argv[1], 'sample'): pass\n"
                "except ValueError as e:\n    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
        assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout
    assert not (out / LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "sample"}))
    with folder_lock(out, "sample"):  # the owner is gone: taken over
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_a_folder_holding_only_its_record_is_taken_for_new_inputs(tmp_path):
    """A run stopped by bad input before computing anything leaves only inputs.json: the
    corrected command may use the folder without --overwrite."""
    out = tmp_path / "run"
    claim_output(out, "train", {"data": "typo.jsonl"})
    claim_output(out, "train", {"data": "data.jsonl"})
    assert json.loads((out / RECORD).read_text())["inputs"] == {"data": "data.jsonl"}
    (out / "checkpoint-1").mkdir()
    with pytest.raises(UserError, match="data: data.jsonl -> other.jsonl"):
        claim_output(out, "train", {"data": "other.jsonl"})


def test_differences_are_named_in_the_order_of_the_new_inputs(tmp_path):
    out = tmp_path / "run"
    claim_output(out, "train", {"method": "vrpo", "beta": 0.1, "learning_rate": 1e-5, "samples": "s" * 64})
    (out / "checkpoint-2").mkdir()
    with pytest.raises(UserError) as e:
        claim_output(out, "train", {"method": "dpo", "beta": 0.1, "learning_rate": 1e-3})
    assert "(method: vrpo -> dpo; learning_rate: 1e-05 -> 0.001; samples: " in str(e.value)


def test_other_processes_neither_check_nor_write(tmp_path):
    """Under a launcher only the main process claims the folder (it stops the others when it
    refuses); another process never reads a record the main process may be writing."""
    out = tmp_path / "run"
    claim_output(out, "sample", {"seed": 0})
    (out / "shards").mkdir()
    claim_output(out, "sample", {"seed": 1}, main_process=False)
    assert json.loads((out / RECORD).read_text())["inputs"] == {"seed": 0} and (out / "shards").exists()
