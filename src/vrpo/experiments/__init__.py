"""Experiments that sit on top of the library (testbed, IMDb, ...). Nothing below imports these.

What an experiment prints is for a person watching: its progress bar and one summary line
per run. Everything a run's own machinery prints (transformers Trainer dictionaries, nested
progress bars and their escape codes, warnings) goes to that run's log file
(``run_log``), where it can be read after the fact.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def run_log(path: str | Path) -> Iterator[Path]:
    """Send everything printed inside the block (stdout, stderr, warnings, nested bars) to
    ``path`` (appended: a resumed run keeps what its earlier attempts printed). Progress bars
    created before the block keep writing to the terminal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield path
