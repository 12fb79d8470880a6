"""Deprecation warnings that come from inside our dependencies, not from anything vrpo or
its user passes: silenced where vrpo calls into them, in one list, so a new one is a
one-line addition and our own deprecated uses still show."""
from __future__ import annotations

import contextlib
import warnings

# (message regex, category): each raised by a dependency reading a property transformers 5 renamed
THIRD_PARTY_DEPRECATIONS = (
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),  # peft get_peft_model, TRL trainers
)


@contextlib.contextmanager
def third_party_deprecations_silenced():
    with warnings.catch_warnings():
        for message, category in THIRD_PARTY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
