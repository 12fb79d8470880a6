"""Bradley-Terry auxiliary model: a scalar reward head, g(x, a, b) = sigmoid(r(x, a) - r(x, b)).

Transitive by construction (it orders responses on a line), so it cannot fit cyclic
preferences such as rock-paper-scissors; GPM can. Same backbones and training as GPM.
"""
from __future__ import annotations

from vrpo.aux.neural import NeuralPreferenceModel, mlp


def _scalar_reward_head(in_dim: int, hidden: int):
    import torch

    class ScalarRewardHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reward = mlp(in_dim, hidden, 1)

        def embed(self, feats):
            return self.reward(feats)  # [N, 1]: r(x, y)

        def form(self, va, vb):
            return (va - vb).squeeze(-1)  # r(x, a) - r(x, b)

        def pairwise(self, v):
            return v - v.T  # [K, 1] -> [K, K]

    return ScalarRewardHead()


class BradleyTerryAux(NeuralPreferenceModel):
    """Bradley-Terry reward model used as the auxiliary g (a scalar head on the backbone)."""

    kind = "bt"

    def _build_head(self, in_dim: int):
        return _scalar_reward_head(in_dim, self.hidden)
