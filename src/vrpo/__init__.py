"""vrpo: variance-reduced preference optimization.

The objective lives in :mod:`vrpo.losses` (pure torch). Everything else (reference
sampling, auxiliary models, training, evaluation, experiments) builds on it.
"""
__version__ = "0.1.0"

from vrpo.losses import (  # noqa: F401  (the public objective API)
    BASE_LOSSES,
    antisymmetrize,
    cdpo_loss,
    implicit_rewards,
    preference_loss,
    rdpo_loss,
    register_base_loss,
    sequence_logps,
    vrpo_loss,
)
