"""Training methods: a registry from name to a loss adapter, never an if/elif on names.

An adapter maps the rewards of a batch (implicit rewards of a policy, or a reward model's
scalar outputs: the adapters do not care which) and the batch's auxiliary inputs to the
per-example loss [B] and extra metrics, by calling the pure functions of ``vrpo.losses``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from torch import Tensor

from vrpo import losses


class Rewards(NamedTuple):
    """r(x, y) of the batch's sequences: chosen [B], rejected [B], reference samples [B, K] or None."""

    chosen: Tensor
    rejected: Tensor
    reference: Optional[Tensor] = None


LossAdapter = Callable[[Rewards, dict, object], "tuple[Tensor, dict[str, Tensor]]"]


@dataclass(frozen=True)
class Method:
    """A loss adapter and what it needs from the data (so the collator packs only that)."""

    loss: LossAdapter
    needs_reference_samples: bool = False  # K samples per prompt and their ref log-probs
    needs_aux: bool = False  # aux_prob on observed pairs and ref_aux_prob on reference pairs
    description: str = ""
    # the config fields only this method reads: its flags are grouped under it in --help, and
    # config.yaml, the model card and the reuse record of a run of another method leave them out
    settings: tuple = ()


def _dpo(rewards: Rewards, batch: dict, cfg) -> tuple[Tensor, dict]:
    return losses.preference_loss(rewards.chosen, rewards.rejected, cfg.base_loss), {}


def _cdpo(rewards: Rewards, batch: dict, cfg) -> tuple[Tensor, dict]:
    return losses.cdpo_loss(rewards.chosen, rewards.rejected, cfg.label_smoothing, cfg.base_loss), {}


def _rdpo(rewards: Rewards, batch: dict, cfg) -> tuple[Tensor, dict]:
    return losses.rdpo_loss(rewards.chosen, rewards.rejected, cfg.flip_rate, cfg.base_loss), {}


def _vrpo(rewards: Rewards, batch: dict, cfg) -> tuple[Tensor, dict]:
    terms = losses.vrpo_loss_terms(
        rewards.chosen, rewards.rejected, batch["aux_prob"], rewards.reference, batch["ref_aux_prob"],
        batch.get("ref_mask"), cfg.base_loss, control_variate_coef=cfg.control_variate_coef,
    )
    metrics = {
        "vrpo/control_variate": terms.control_variate,  # c * (mean_jk l(z~, g~) - l(z+-, g+-))
        "vrpo/observed_loss": terms.observed,  # the base loss alone
        "vrpo/aux_prob": batch["aux_prob"],  # mean g(x, y+, y-) on observed pairs
        "rewards/reference_samples": rewards.reference.mean(-1),
    }
    return terms.loss, metrics


METHODS: dict[str, Method] = {
    "dpo": Method(_dpo, description="DPO: f(z+-), the base estimator"),
    "cdpo": Method(_cdpo, description="conservative DPO: l(z+-, 1 - eps)", settings=("label_smoothing",)),
    "rdpo": Method(_rdpo, description="robust DPO: unbiased under label-flip rate eps", settings=("flip_rate",)),
    "vrpo": Method(_vrpo, needs_reference_samples=True, needs_aux=True,
                   description="VRPO: f(z+-) - c l(z+-, g+-) + c mean_jk l(z~_jk, g~_jk)",
                   settings=("samples", "num_ref_samples", "control_variate_coef")),
}


def register_method(name: str, method: Method, *, overwrite: bool = False) -> None:
    """Add a training method (``--method NAME``)."""
    if name in METHODS and not overwrite:
        raise ValueError(f"register_method: {name!r} is already registered; pass overwrite=True")
    METHODS[name] = method
