"""The one user-error type, and the boundary around code the user brings.

Every problem with what a user gave us (a file, a row, a flag, a folder, their own
``--aux module:function``) is raised as :class:`UserError` with one line that names the
file, row or flag and what was expected. ``vrpo`` prints that line and exits with status 2
(``vrpo --debug`` shows the traceback instead). ``UserError`` is a ``ValueError``, so
library callers that catch ``ValueError`` keep working, and the many checks that raise a
plain ``ValueError`` with such a line are treated the same way by the command line.

Code the user brings (an auxiliary model, a rubric, a judge) can fail in any way: a syntax
error in the file, an exception inside the function, a wrong return type. ``user_code``
turns each of those into a ``UserError`` that names the spec (``--aux file.py:fn``) and
the error, so the user sees whose code failed and why, in one line.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["UserError", "user_code", "one_line", "check_writable_folder", "check_readable"]


class UserError(ValueError):
    """A problem with the user's input: printed as one line, exit status 2."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line (newlines folded), cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


@contextlib.contextmanager
def user_code(spec: str) -> Iterator[None]:
    """Run the user's code: any exception it raises becomes a one-line ``UserError`` naming
    ``spec`` (e.g. ``--aux judge.py:prefer``). A ``UserError`` of ours passes unchanged;
    ``KeyboardInterrupt`` and ``SystemExit`` are never caught."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        raise UserError(f"{spec}: your code raised {type(e).__name__}: {one_line(e)}") from e


def check_writable_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and prove it is writable, before any heavy
    work: an unwritable ``--out`` is a one-line error now, not a traceback after an hour."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".vrpo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot write there ({e.strerror or e})") from None
    return p


def check_readable(path: str | os.PathLike, flag: str, what: str = "a file or folder") -> Path:
    """``path`` exists, or a one-line ``UserError`` naming ``flag`` and what was expected."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {p}: no such file or directory; expected {what}")
    return p
