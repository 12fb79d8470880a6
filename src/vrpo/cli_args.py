"""Typed argument helpers shared by every command, and the one-line argument parser.

A numeric flag is checked when it is parsed, not when it is first used: ``--max-prompts -1``
or ``--chunk-size 0`` must stop at once with one line, not silently drop a row or fail deep
inside with ``range() arg 3 must not be zero``. Each helper is both

- an argparse ``type=`` (``p.add_argument("--chunk-size", type=POSITIVE_INT)``), and
- a checker for values that come from a config file or the Python API
  (``POSITIVE_INT.check(cfg.max_steps, "--max-steps")``),

so a flag and its config key obey one rule with one message.

``OneLineParser`` is the ``argparse.ArgumentParser`` of every command: its errors (an
unknown flag, a bad value) are one line, ``vrpo COMMAND: error: ...``, exit status 2,
without the usage block.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable, NoReturn

from vrpo.errors import UserError

__all__ = [
    "ArgKind", "POSITIVE_INT", "NONNEGATIVE_INT", "POSITIVE_FLOAT", "NONNEGATIVE_FLOAT", "PROBABILITY",
    "OPEN_PROBABILITY", "HALF_OPEN_RATE", "RATE_BELOW_ONE", "SEED", "MAX_STEPS", "int_at_least", "int_list",
    "json_object", "OneLineParser", "DefaultsHelpFormatter", "add_overwrite_flag",
]


class ArgKind:
    """A named kind of value: ``parse(text)`` for argparse, ``check(value, flag)`` for configs."""

    def __init__(self, name: str, convert: Callable[[Any], Any], valid: Callable[[Any], bool], expected: str):
        self.__name__ = name  # argparse names the type in some messages
        self.convert, self.valid, self.expected = convert, valid, expected

    def _coerce(self, value: Any) -> Any:
        if isinstance(value, bool):  # True is an int to Python, never to a user
            raise ValueError
        v = self.convert(value)
        if isinstance(v, float) and math.isnan(v):
            raise ValueError
        if not self.valid(v):
            raise ValueError
        return v

    def __call__(self, text: str) -> Any:  # argparse type=
        try:
            return self._coerce(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {self.expected}") from None

    def check(self, value: Any, flag: str, *, allow_none: bool = False) -> Any:
        """``value`` converted, or a one-line UserError naming ``flag``."""
        if value is None and allow_none:
            return None
        try:
            return self._coerce(value)
        except (TypeError, ValueError):
            raise UserError(f"{flag} {value!r}: expected {self.expected}") from None

    def __repr__(self) -> str:
        return f"ArgKind({self.__name__})"


def _int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(str(value).strip())


POSITIVE_INT = ArgKind("positive_int", _int, lambda v: v >= 1, "a positive integer (1 or more)")
NONNEGATIVE_INT = ArgKind("nonnegative_int", _int, lambda v: v >= 0, "an integer >= 0")
SEED = ArgKind("seed", _int, lambda v: 0 <= v < 2**32, "an integer seed in [0, 2^32)")
POSITIVE_FLOAT = ArgKind("positive_float", float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
NONNEGATIVE_FLOAT = ArgKind("nonnegative_float", float, lambda v: math.isfinite(v) and v >= 0,
                            "a finite number >= 0")
PROBABILITY = ArgKind("probability", float, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]")
OPEN_PROBABILITY = ArgKind("open_probability", float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
HALF_OPEN_RATE = ArgKind("rate_below_half", float, lambda v: 0.0 <= v < 0.5, "a rate in [0, 0.5)")
RATE_BELOW_ONE = ArgKind("rate_below_one", float, lambda v: 0.0 <= v < 1.0, "a rate in [0, 1)")
# a Trainer's max_steps: -1 hands the length to the epoch count; 0 would train nothing and save the start as a fine-tune
MAX_STEPS = ArgKind("max_steps", _int, lambda v: v == -1 or v >= 1,
                    "a positive number of optimiser steps, or -1 (train for the number of epochs)")


def int_at_least(minimum: int) -> ArgKind:
    """An integer >= ``minimum`` (``--num-samples`` needs 2 reference samples per prompt)."""
    return ArgKind(f"int_min_{minimum}", _int, lambda v: v >= minimum, f"an integer >= {minimum}")


def int_list(minimum: int = 1) -> ArgKind:
    """Comma-separated integers, each >= ``minimum`` (``--k 2,4,8``)."""

    def convert(value: Any) -> list[int]:
        if isinstance(value, (list, tuple)):
            items = [_int(v) for v in value]
        else:
            items = [_int(v) for v in str(value).split(",") if v.strip()]
        return items

    return ArgKind(f"int_list_min_{minimum}", convert, lambda v: bool(v) and min(v) >= minimum,
                   f"comma-separated integers, each >= {minimum}")


def _json_object(value: Any) -> dict:
    v = json.loads(value) if isinstance(value, str) else value
    if not isinstance(v, dict):
        raise ValueError
    return v


json_object = ArgKind("json_object", _json_object, lambda v: True, 'a JSON object, e.g. \'{"fsdp": "full_shard"}\'')


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already names it (a default
    that needs words: ``(default: all prompts)``) or the flag is required: ``(default: off)``
    for a switch, ``(default: none)`` for an unset value, else ``(default: %(default)s)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or not action.option_strings or action.default is argparse.SUPPRESS \
                or "default" in text or "(required" in text:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None or action.default == [] or action.default == {}:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2 (no usage block), and
    whose help shows every flag's default (:class:`DefaultsHelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def add_tokenizer_flag(p: argparse.ArgumentParser, default: str) -> None:
    """``--tokenizer``: the reference model's folder whose chat template renders conversational
    rows, one flag shared by the commands that read them; ``default`` says where the template
    comes from when the flag is absent."""
    p.add_argument("--tokenizer", default=None,
                   help=f"the reference model's folder, whose chat template renders conversational rows ({default})")


def add_overwrite_flag(p: argparse.ArgumentParser, what: str = "the output folder") -> None:
    """``--overwrite``: the one way, shared by every command, to start ``--out`` over."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"delete the contents of {what} and start over (default: a folder made from the same "
                        "inputs is resumed, one made from other inputs is refused, naming what differs)")
