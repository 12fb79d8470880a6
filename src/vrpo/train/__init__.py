"""Training causal LMs with VRPO / DPO / cDPO / rDPO on ``transformers.Trainer``.

Public API::

    from vrpo.train import VRPOConfig, train
    run_dir = train(VRPOConfig(method="vrpo", model=..., data=..., samples=..., out=...))

Light to import: the heavy modules (transformers, torch) load on first use.
"""
from vrpo.train.config import VRPOConfig  # noqa: F401


def train(config, callbacks=(), *, overwrite=False):
    """See :func:`vrpo.train.run.train`."""
    from vrpo.train.run import train as _train

    return _train(config, callbacks, overwrite=overwrite)


def __getattr__(name):
    if name in ("METHODS", "Method", "Rewards", "register_method"):
        from vrpo.train import methods

        return getattr(methods, name)
    raise AttributeError(name)
