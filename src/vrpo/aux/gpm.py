"""The general preference model (GPM; Zhang et al. 2024, "Beyond Bradley-Terry Models").

Each (prompt, response) item is embedded as a vector v in R^(2m), and

    g(x, a, b) = sigmoid( v_a^T R v_b ),   R = blockdiag( lambda_l * [[0, 1], [-1, 0]] )

R is skew-symmetric (R^T = -R), so v_a^T R v_b = -v_b^T R v_a: g(x, a, b) + g(x, b, a) = 1
by construction. Unlike Bradley-Terry (one scalar reward per response) it can express
intransitive preferences: three unit vectors 120 degrees apart in one 2-D block give
rock < paper < scissors < rock. Bradley-Terry is the special case v = (r, 1), m = 1.
"""
from __future__ import annotations

from vrpo.aux.neural import NeuralPreferenceModel, mlp


def _gpm_head(in_dim: int, hidden: int, dim: int):
    import torch

    class SkewBilinearHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_net = mlp(in_dim, hidden, dim)
            self.eigen = torch.nn.Parameter(torch.ones(dim // 2))  # lambda_l, one per 2-D block

        def embed(self, feats):
            return self.embed_net(feats)

        def skew(self):
            """R: dim x dim skew-symmetric, lambda_l on the (2l, 2l+1) entry, -lambda_l mirrored."""
            R = torch.zeros(dim, dim, dtype=self.eigen.dtype, device=self.eigen.device)
            idx = torch.arange(0, dim, 2, device=self.eigen.device)
            R[idx, idx + 1] = self.eigen
            R[idx + 1, idx] = -self.eigen
            return R

        def form(self, va, vb):
            """v_a^T R v_b per pair: [N, D] x [N, D] -> [N]."""
            R = self.skew().to(va.dtype)
            return ((va @ R) * vb).sum(-1)

        def pairwise(self, v):
            """[K, D] -> [K, K] logits V R V^T (exactly antisymmetric: R^T = -R)."""
            R = self.skew().to(v.dtype)
            s = v @ R @ v.T
            return 0.5 * (s - s.T)  # removes rounding asymmetry; a no-op in exact arithmetic

    return SkewBilinearHead()


class GPM(NeuralPreferenceModel):
    """General preference model: skew-symmetric bilinear head over (prompt-conditioned)
    response embeddings. ``dim`` = 2m is the embedding size (even).

    >>> g = GPM(backbone="minilm").fit(prompts, responses_a, responses_b, labels)  # doctest: +SKIP
    >>> g.predict_proba(prompts, responses_a, responses_b)                          # doctest: +SKIP
    """

    kind = "gpm"

    def __init__(self, backbone: str = "minilm", *, dim: int = 16, **kwargs):
        super().__init__(backbone, **kwargs)
        self.dim = dim

    def get_params(self) -> dict:
        return {**super().get_params(), "dim": self.dim}

    def _build_head(self, in_dim: int):
        if self.dim < 2 or self.dim % 2:
            raise ValueError(f"dim: {self.dim}; expected an even embedding size >= 2 (2-D blocks of R)")
        return _gpm_head(in_dim, self.hidden, self.dim)
