"""The VRPO objective and its baselines as pure functions of tensors.

Nothing here knows about configs, devices, files or models: every function takes tensors
(and plain numbers) and returns tensors. Shapes are written ``[B]`` for one value per
example; any extra *leading* batch dimensions broadcast through unchanged (the testbed uses
``[R, B]`` to fit many replicates at once).

Notation (docs/method.md): for a pair (a, b) the margin is ``z = r(x, a) - r(x, b)``; ``f`` is a
base loss for "a preferred over b"; the soft-label loss for ``p = P(a > b)`` is

    l(z, p) = p * f(z) + (1 - p) * f(-z)          (so l(-z, 1 - p) = l(z, p))

The VRPO per-example loss, with auxiliary preference model g and K reference samples:

    L_vrpo = l(z+-, 1) - c * l(z+-, g+-) + c * mean_{j<k} l(z~_jk, g~_jk)

c = 1 is the paper's control variate; ``control_variate_coef`` lets a caller use an
estimated optimal coefficient instead.

A fact to keep in mind (it shapes which base loss to use): with ``f = sigmoid``
(f(z) = -log sigmoid(z)), ``l(z, 1) - l(z, g) = -(1 - g) * z``. The observed-pair part is
linear in the margin and unbounded below: a constant push that never saturates, so a
VRPO fit can diverge where the plain DPO fit stays finite (seen in our bandit testbed
with sharp, nonlinear preferences). A bounded f (``ramp``, the paper code's default)
removes this failure mode. Both are offered; experiments compare them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

BaseLoss = Callable[[Tensor], Tensor]

__all__ = [
    "BASE_LOSSES",
    "register_base_loss",
    "get_base_loss",
    "soft_label_loss",
    "preference_loss",
    "vrpo_loss",
    "vrpo_loss_terms",
    "VRPOTerms",
    "cdpo_loss",
    "rdpo_loss",
    "sequence_logps",
    "token_logps",
    "sum_by_sequence",
    "implicit_rewards",
    "antisymmetrize",
    "pair_indices",
]


# --------------------------------------------------------------------------------------
# Base losses f(z) for "a preferred over b" at margin z. Each maps a tensor elementwise.
# --------------------------------------------------------------------------------------
def _sigmoid(z: Tensor) -> Tensor:
    """f(z) = -log sigmoid(z) = softplus(-z): DPO / Bradley-Terry. Stable for |z| = 1e4."""
    return F.softplus(-z)


def _ramp(z: Tensor) -> Tensor:
    """f(z) = relu(1 - z) - relu(-0.5 - z): a hinge truncated at z = -0.5, in [0, 1.5]."""
    return F.relu(1.0 - z) - F.relu(-0.5 - z)


def _hinge(z: Tensor) -> Tensor:
    """f(z) = relu(1 - z): RSO / SLiC."""
    return F.relu(1.0 - z)


def _ipo(z: Tensor) -> Tensor:
    """f(z) = (z - 1/2)^2: IPO (up to scale when the reward carries beta)."""
    return (z - 0.5) ** 2


BASE_LOSSES: dict[str, BaseLoss] = {
    "sigmoid": _sigmoid,
    "ramp": _ramp,
    "hinge": _hinge,
    "ipo": _ipo,
}


def register_base_loss(name: str, fn: BaseLoss, *, overwrite: bool = False) -> None:
    """Add a base loss ``f`` under ``name`` so every function here (and ``--base-loss``)
    accepts it. ``fn`` maps a margin tensor elementwise to a loss tensor of the same shape.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_base_loss: name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"register_base_loss: fn for {name!r} must be callable, got {type(fn).__name__}")
    if name in BASE_LOSSES and not overwrite:
        raise ValueError(f"register_base_loss: {name!r} is already registered; pass overwrite=True to replace it")
    BASE_LOSSES[name] = fn


def get_base_loss(base: Union[str, BaseLoss]) -> BaseLoss:
    """Resolve a base loss given by name (see ``BASE_LOSSES``) or as a callable."""
    if callable(base):
        return base
    try:
        return BASE_LOSSES[base]
    except (KeyError, TypeError):
        raise ValueError(
            f"base: unknown base loss {base!r}; expected one of {sorted(BASE_LOSSES)} "
            "or a callable (register your own with vrpo.losses.register_base_loss)"
        ) from None


# --------------------------------------------------------------------------------------
# Input checks: one-line ValueErrors that name the argument and what was expected.
# --------------------------------------------------------------------------------------
def _check_prob(name: str, p: Tensor) -> None:
    if torch.isnan(p).any():
        raise ValueError(f"{name}: contains NaN; expected probabilities in [0, 1]")
    if (p < 0).any() or (p > 1).any():
        lo, hi = float(p.min()), float(p.max())
        raise ValueError(f"{name}: values in [{lo:.4g}, {hi:.4g}]; expected probabilities in [0, 1]")


def _check_same_shape(**tensors: Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        if tensors[n].shape != first.shape:
            raise ValueError(
                f"{n}: shape {tuple(tensors[n].shape)} does not match {names[0]} shape {tuple(first.shape)}"
            )


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def soft_label_loss(margin: Tensor, prob: Union[Tensor, float], base: Union[str, BaseLoss] = "sigmoid") -> Tensor:
    """``l(z, p) = p f(z) + (1 - p) f(-z)``: the loss of margin z when a is preferred w.p. p.

    Shapes: margin [B], prob [B] (or a float, broadcast); returns [B].
    """
    f = get_base_loss(base)
    return prob * f(margin) + (1.0 - prob) * f(-margin)


def preference_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, base: Union[str, BaseLoss] = "sigmoid") -> Tensor:
    """The base estimator's per-example loss ``f(r(x, y+) - r(x, y-))``.

    DPO when the rewards are implicit rewards ``beta * (log pi - log pi_ref)``; the
    Bradley-Terry reward-model loss when they come from a scalar reward head.

    Shapes: chosen_rewards [B], rejected_rewards [B]; returns [B].
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return get_base_loss(base)(chosen_rewards - rejected_rewards)


def pair_indices(num_samples: int, device: Union[torch.device, str, None] = None) -> tuple[Tensor, Tensor]:
    """Indices (j, k) of all K(K-1)/2 pairs j < k of K reference samples, each [P]."""
    idx = torch.triu_indices(num_samples, num_samples, offset=1, device=device)
    return idx[0], idx[1]


class VRPOTerms(NamedTuple):
    """The three parts of the VRPO loss, each [B]:
    ``loss = observed - coef * observed_aux + coef * reference``."""

    observed: Tensor  # l(z+-, 1) = f(z+-): the base loss
    observed_aux: Tensor  # l(z+-, g+-): the auxiliary model's loss on the labelled pair
    reference: Tensor  # mean_{j<k} l(z~_jk, g~_jk) over valid reference pairs
    num_pairs: Tensor  # number of valid reference pairs per example (float)
    coef: float

    @property
    def control_variate(self) -> Tensor:
        """``coef * (reference - observed_aux)``: mean zero when pi_ref is right."""
        return self.coef * (self.reference - self.observed_aux)

    @property
    def loss(self) -> Tensor:
        return self.observed + self.control_variate


def vrpo_loss_terms(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    aux_prob: Tensor,
    ref_rewards: Tensor,
    ref_aux_prob: Tensor,
    ref_mask: Tensor | None = None,
    base: Union[str, BaseLoss] = "sigmoid",
    *,
    control_variate_coef: float = 1.0,
    ref_pair_weights: Tensor | None = None,
    validate: bool = True,
) -> VRPOTerms:
    """The parts of :func:`vrpo_loss` (same arguments), for logging and diagnostics."""
    f = get_base_loss(base)
    if validate:
        _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, aux_prob=aux_prob)
        if ref_rewards.dim() < 1 or ref_rewards.shape[:-1] != chosen_rewards.shape:
            raise ValueError(
                f"ref_rewards: shape {tuple(ref_rewards.shape)}; expected [B, K] with B matching "
                f"chosen_rewards shape {tuple(chosen_rewards.shape)}"
            )
        K = ref_rewards.shape[-1]
        if K < 2:
            raise ValueError(f"ref_rewards: K={K} reference samples; expected at least 2 per prompt")
        if ref_aux_prob.shape != ref_rewards.shape + (K,):
            raise ValueError(
                f"ref_aux_prob: shape {tuple(ref_aux_prob.shape)}; expected [B, K, K] = {tuple(ref_rewards.shape + (K,))}"
            )
        _check_prob("aux_prob", aux_prob)
    K = ref_rewards.shape[-1]
    j, k = pair_indices(K, device=ref_rewards.device)
    ref_margin = ref_rewards[..., j] - ref_rewards[..., k]  # z~_jk, [B, P]
    ref_g = ref_aux_prob[..., j, k]  # g~_jk, [B, P]

    pair_w = None
    if ref_mask is not None:
        if validate and ref_mask.shape != ref_rewards.shape:
            raise ValueError(f"ref_mask: shape {tuple(ref_mask.shape)}; expected {tuple(ref_rewards.shape)} like ref_rewards")
        m = ref_mask.to(torch.bool)
        pair_w = (m[..., j] & m[..., k]).to(ref_rewards.dtype)
        if validate:
            n_valid = m.sum(-1)
            if (n_valid < 2).any():
                row = int(torch.nonzero(n_valid.reshape(-1) < 2)[0])
                raise ValueError(
                    f"ref_mask: row {row} has {int(n_valid.reshape(-1)[row])} valid reference samples; expected at least 2"
                )
        # invalid pairs may hold garbage (padding): zero them so NaN/inf cannot leak in
        ref_g = torch.where(pair_w > 0, ref_g, torch.full_like(ref_g, 0.5))
        ref_margin = torch.where(pair_w > 0, ref_margin, torch.zeros_like(ref_margin))
    if validate:
        _check_prob("ref_aux_prob", ref_g)
    if ref_pair_weights is not None:
        w = ref_pair_weights[..., j, k].to(ref_rewards.dtype)
        pair_w = w if pair_w is None else pair_w * w
    pair_loss = ref_g * f(ref_margin) + (1.0 - ref_g) * f(-ref_margin)  # l(z~_jk, g~_jk)
    if pair_w is None:
        reference = pair_loss.mean(-1)
        num_pairs = torch.full_like(reference, float(pair_loss.shape[-1]))
    else:
        total_w = pair_w.sum(-1)
        if validate and (total_w <= 0).any():
            raise ValueError("ref_pair_weights: a row has zero total weight over valid pairs; expected positive weights")
        reference = (pair_w * pair_loss).sum(-1) / total_w
        num_pairs = (pair_w > 0).sum(-1).to(reference.dtype)

    margin = chosen_rewards - rejected_rewards  # z+-
    observed = f(margin)
    observed_aux = aux_prob * f(margin) + (1.0 - aux_prob) * f(-margin)
    return VRPOTerms(observed, observed_aux, reference, num_pairs, float(control_variate_coef))


def vrpo_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    aux_prob: Tensor,
    ref_rewards: Tensor,
    ref_aux_prob: Tensor,
    ref_mask: Tensor | None = None,
    base: Union[str, BaseLoss] = "sigmoid",
    *,
    control_variate_coef: float = 1.0,
    ref_pair_weights: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    """Per-example VRPO loss (docs/method.md):

        L = l(z+-, 1) - c * l(z+-, g+-) + c * mean over valid pairs j<k of l(z~_jk, g~_jk)

    Args (shapes; leading batch dims beyond B broadcast):
        chosen_rewards [B]: r(x, y+) of the preferred response.
        rejected_rewards [B]: r(x, y-).
        aux_prob [B]: g(x, y+, y-) in [0, 1], the auxiliary probability that y+ wins
            (for a cross-fitted g, the out-of-fold prediction).
        ref_rewards [B, K]: r(x, y~_j) of K fresh samples from pi_ref(.|x).
        ref_aux_prob [B, K, K]: entry [b, j, k] = g(x_b, y~_j, y~_k); only j < k is read.
        ref_mask [B, K] bool, optional: valid reference samples (>= 2 per row); the pair
            term averages over pairs whose two samples are both valid.
        base: base loss name in ``BASE_LOSSES`` or a callable f.
        control_variate_coef: c; 1 is the paper's estimator. Any c keeps the target
            unchanged when pi_ref is right (the correction has mean zero).
        ref_pair_weights [B, K, K], optional: non-negative weights of the pairs (j < k read),
            e.g. pi_ref(y_j) pi_ref(y_k) over a whole finite response set to get the exact
            expectation instead of a sample mean. Combined with ``ref_mask``.
        validate: check shapes and probability ranges (one-line ValueErrors).

    Returns: [B] per-example losses; average them for the batch objective.

    With K = 2 this is exactly the paper's single-pair form
    ``f(z) - l(z, g) + l(z~_12, g~_12)``. With ``base="sigmoid"`` the observed part
    ``f(z) - l(z, g) = -(1 - g) z`` is linear and unbounded below (see module docstring).
    """
    return vrpo_loss_terms(
        chosen_rewards, rejected_rewards, aux_prob, ref_rewards, ref_aux_prob, ref_mask, base,
        control_variate_coef=control_variate_coef, ref_pair_weights=ref_pair_weights, validate=validate,
    ).loss


def cdpo_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, label_smoothing: float = 0.1,
              base: Union[str, BaseLoss] = "sigmoid") -> Tensor:
    """Conservative DPO (label smoothing eps): ``(1 - eps) f(z) + eps f(-z)`` = l(z, 1 - eps).

    Shapes: rewards [B]; returns [B].
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: {label_smoothing}; expected a value in [0, 0.5)")
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return soft_label_loss(chosen_rewards - rejected_rewards, 1.0 - label_smoothing, base)


def rdpo_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, flip_rate: float = 0.1,
              base: Union[str, BaseLoss] = "sigmoid") -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under a known label-flip rate eps:

        [(1 - eps) f(z) - eps f(-z)] / (1 - 2 eps)
        = [-(1 - eps) log s(z) + eps log s(-z)] / (1 - 2 eps)   for f = sigmoid.

    Shapes: rewards [B]; returns [B].
    """
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate: {flip_rate}; expected a value in [0, 0.5)")
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    f = get_base_loss(base)
    z = chosen_rewards - rejected_rewards
    return ((1.0 - flip_rate) * f(z) - flip_rate * f(-z)) / (1.0 - 2.0 * flip_rate)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Sum of log pi(token) over the completion tokens of each sequence.

    Causal convention: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``. A token
    ``input_ids[:, t]`` counts when ``completion_mask[:, t]`` is true (so prompt and padding
    tokens are masked out; the first position can never count).

    Shapes: logits [B, T, V], input_ids [B, T], completion_mask [B, T]; returns [B]
    (float32 or wider, whatever the logits' dtype).
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits: shape {tuple(logits.shape)}; expected [B, T, V] with [B, T] = {tuple(input_ids.shape)}")
    _check_same_shape(input_ids=input_ids, completion_mask=completion_mask)
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # sum log-probs in float32
        logits = logits.float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    # log_softmax at the target = logit_target - logsumexp(logits): avoids a [B, T, V] copy
    tok = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (tok * mask).sum(-1)


def token_logps(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk_size: int) -> Tensor:
    """``log softmax(head(hidden[m]))[targets[m]]`` for each of M tokens, ``chunk_size`` at a time.

    ``hidden[m]`` is the state that predicts ``targets[m]`` (for a causal LM: the final hidden
    state one position earlier) and ``head`` maps states to logits (the LM head, with its bias
    or tied weight; ``lambda x: x`` when ``hidden`` already holds logits). Only one chunk's
    [chunk_size, V] logits exist at a time: when autograd records and there is more than one
    chunk, each chunk is recomputed in the backward pass (torch.utils.checkpoint) instead of
    being kept, so the full [M, V] block is never held. Half-precision logits are summed in
    float32, as in :func:`sequence_logps`.

    Shapes: hidden [M, d], targets [M] (long); returns [M] (float32, or float64 for float64 logits).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden: shape {tuple(hidden.shape)}; expected [M, d] with M = {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size}; expected a positive number of tokens")

    def chunk_logps(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        # log_softmax at the target = logit_target - logsumexp(logits)
        return torch.gather(logits, -1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)

    starts = range(0, max(hidden.shape[0], 1), chunk_size)  # M = 0: one empty chunk, still on the graph
    recompute = torch.is_grad_enabled() and len(starts) > 1
    parts = []
    for s in starts:
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if recompute:
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(chunk_logps, h, t, use_reentrant=False))
        else:
            parts.append(chunk_logps(h, t))
    return torch.cat(parts)


def sum_by_sequence(token_values: Tensor, sequence: Tensor, num_sequences: int) -> Tensor:
    """Sum of the tokens' values per sequence: ``out[s] = sum of token_values[m] with sequence[m] = s``.

    Shapes: token_values [M], sequence [M] (long, in [0, num_sequences)); returns [num_sequences].
    """
    _check_same_shape(token_values=token_values, sequence=sequence)
    out = token_values.new_zeros(num_sequences)
    return out.index_add(0, sequence, token_values)


def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``beta * (log pi_theta(y|x) - log pi_ref(y|x))``. Shapes: any, equal."""
    _check_same_shape(policy_logps=policy_logps, reference_logps=reference_logps)
    return beta * (policy_logps - reference_logps)


def antisymmetrize(prob_ab: Tensor, prob_ba: Tensor) -> Tensor:
    """Make an auxiliary model antisymmetric: ``g_sym(a, b) = (g(a, b) + 1 - g(b, a)) / 2``,
    so ``g_sym(a, b) + g_sym(b, a) = 1`` exactly. Shapes: any, equal."""
    _check_same_shape(prob_ab=prob_ab, prob_ba=prob_ba)
    return 0.5 * (prob_ab + 1.0 - prob_ba)


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps]."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)

