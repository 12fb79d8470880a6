"""Output folders: reused only when every input that made them is the same.

Every command that writes a folder (``sample``, ``score``, ``fit-aux``, ``label``, ``train``,
``train-rm``, ``rl``, ``gate``, the experiments and their caches) resumes a killed run from
what the folder holds. That is right only when the folder was made from the *same* inputs:
resuming a VRPO checkpoint under a DPO command, or merging score chunks of other samples,
gives a silently wrong result. So each command claims its folder through one function,
:func:`claim_output`, with a dict of everything that determines the result (resolved
settings, fingerprints of data, samples, models, the aux spec). The folder keeps that dict
in ``inputs.json``:

- a new or empty folder: the record is written, the command starts;
- a folder whose record equals the inputs: the command resumes;
- a folder whose record differs: a one-line ``UserError`` naming what differs (the first
  few keys, old -> new); a folder that holds only its record (a run stopped by bad input
  before it computed anything) is taken for the new inputs;
- ``--overwrite``: a folder vrpo recorded as its own is emptied and started over, whatever
  inputs made it;
- a non-empty folder without a record (not ours, or written by an older vrpo): refused
  always; ``--overwrite`` deletes only folders that vrpo recorded as its own.

:func:`folder_lock` keeps a second process of the same command out of a folder that one is
writing (a lock file with the owner's pid and host; a lock left by a dead process is taken
over).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from vrpo.errors import UserError, check_writable_folder

RECORD = "inputs.json"
LOCK = ".vrpo.lock"
SHOWN_DIFFERENCES = 3

__all__ = ["RECORD", "LOCK", "claim_output", "read_record", "differences", "folder_lock", "normalise"]


def normalise(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples -> lists, Paths -> str), so a record read
    from disk compares equal to the inputs that wrote it (key order kept: it is the order in
    which differences are named)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: value}


def _short(value: Any) -> str:
    s = json.dumps(value, default=str) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256 fingerprint
    return s if len(s) <= 40 else s[:37] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every flattened key whose value differs (missing = absent), in
    the order of ``new``'s keys (a command lists its most telling inputs first), then the
    keys only ``old`` has."""
    a, b = _flatten(normalise(old)), _flatten(normalise(new))
    out = []
    for key in list(b) + [k for k in a if k not in b]:
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))}")
    return out


def read_record(path: str | Path) -> dict | None:
    """The ``inputs.json`` record of a folder, or None when it has none."""
    p = Path(path) / RECORD
    if not p.exists():
        return None
    try:
        record = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{p}: damaged record of the inputs that made this folder; delete the folder or pass "
                        "--overwrite") from None
    if not isinstance(record, dict) or "inputs" not in record:
        raise UserError(f"{p}: not a vrpo record of inputs; delete the folder or pass --overwrite")
    return record


def _contents(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK and not p.name.startswith(".vrpo-write-test")]


def _clear(folder: Path) -> None:
    for p in _contents(folder):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _refusal(folder: Path, command: str, inputs: dict, flag: str) -> str | None:
    """Why ``folder`` cannot be used for ``command`` with ``inputs`` (None: it can, as new or to resume)."""
    old = read_record(folder)
    if old is None:
        if _contents(folder):
            return (f"{flag} {folder}: not empty and has no {RECORD} (not a folder vrpo made, or made by an older "
                    f"version); choose a new or empty {flag}")
        return None
    if old.get("command") == command and old.get("inputs") == inputs:
        return None  # the same inputs: resume
    if [p.name for p in _contents(folder)] == [RECORD]:
        return None  # a run that stopped before computing anything (bad input): nothing to lose
    diff = differences({"command": old.get("command"), **old["inputs"]}, {"command": command, **inputs})
    more = f" and {len(diff) - SHOWN_DIFFERENCES} more" if len(diff) > SHOWN_DIFFERENCES else ""
    return (f"{flag} {folder}: made by `vrpo {old.get('command')}` from other inputs "
            f"({'; '.join(diff[:SHOWN_DIFFERENCES])}{more}); pass --overwrite to delete it and start over, "
            f"or choose another {flag}")


def claim_output(path: str | Path, command: str, inputs: dict, *, overwrite: bool = False, flag: str = "--out",
                 main_process: bool | None = None) -> Path:
    """Make ``path`` this command's output folder for ``inputs`` (see the module docstring).

    Returns the folder. Only the main process (``RANK`` 0 unless ``main_process`` says) checks,
    clears and writes; the others only check that the folder is writable (were they to read
    the folder while the main process writes its record, they could see a half-made state;
    when the main process refuses and exits, the launcher stops them).
    """
    folder = check_writable_folder(path, flag)
    if main_process is None:
        main_process = int(os.environ.get("RANK", "0")) == 0
    inputs = normalise(inputs)
    if not main_process:
        return folder
    reason = _refusal(folder, command, inputs, flag)
    old = read_record(folder)
    if overwrite and old is not None:
        _clear(folder)  # start over, whatever made the folder (a damaged checkpoint of the same inputs too)
    elif reason is not None:
        raise UserError(reason)  # other inputs without --overwrite, or a folder vrpo never recorded as its own
    elif old is not None and old.get("command") == command and old.get("inputs") == inputs:
        return folder  # resume
    from vrpo.provenance import atomic_write_json

    atomic_write_json(folder / RECORD, {"command": command, "inputs": inputs})
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def folder_lock(path: str | Path, command: str, flag: str = "--out") -> Iterator[None]:
    """Hold ``path/.vrpo.lock`` while the block runs: a second ``vrpo COMMAND`` into the same
    folder is refused in one line naming the first one's pid; a stale lock (its process is
    gone) is taken over."""
    folder = check_writable_folder(path, flag)
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    acquired = False
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}
            same_host = owner.get("host") == me["host"]
            if same_host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
                lock.unlink(missing_ok=True)  # left by a process that died: take it over
                continue
            raise UserError(f"{flag} {folder}: another `vrpo {owner.get('command', '?')}` (pid {owner.get('pid', '?')} on "
                            f"{owner.get('host', '?')}) is writing this folder; wait for it to finish, or delete "
                            f"{lock} if that process is gone") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        acquired = True
        break
    if not acquired:
        raise UserError(f"{flag} {folder}: could not take {lock}; another process keeps creating it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
