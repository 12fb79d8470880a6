"""vrpo: variance-reduced preference optimization.

The objective lives in :mod:`vrpo.losses` (pure torch). Everything else (reference
sampling, auxiliary models, training, evaluation, experiments) builds on it. The names
below are loaded lazily, so ``import vrpo`` (and ``vrpo --help``) does not import torch.
"""
__version__ = "0.1.0"

_LOSS_API = (
    "BASE_LOSSES", "antisymmetrize", "cdpo_loss", "implicit_rewards", "preference_loss",
    "rdpo_loss", "register_base_loss", "sequence_logps", "vrpo_loss", "vrpo_loss_terms",
)
__all__ = ["__version__", *_LOSS_API]


def __getattr__(name):
    if name in _LOSS_API:
        from vrpo import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'vrpo' has no attribute {name!r}")
