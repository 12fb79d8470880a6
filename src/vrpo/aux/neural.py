"""Shared machinery of the trained auxiliary models (GPM and Bradley-Terry).

A model = a *backbone* that turns a (prompt, response) item into a feature vector, and a
*head* that turns two feature vectors into the logit of P(a preferred to b):

    g(x, a, b) = sigmoid( s(v(x, a), v(x, b)) ),   s(u, w) = -s(w, u)

Because the head's form ``s`` is antisymmetric, g(x, a, b) + g(x, b, a) = 1 holds by
construction (no symmetrising second pass). Backbones (``BACKBONES``):

- ``minilm``: frozen all-MiniLM-L6-v2 sentence vectors (cached per distinct text);
  features = [e(y), e(x) * e(y)], so the response vector is prompt-conditioned.
- ``transformer``: the same MiniLM fine-tuned end to end on the joint text (x, y).
- ``table``: one learned vector per distinct (prompt, response) seen in ``fit``, for finite
  response sets such as the statistical testbed (an unseen item gets the zero vector).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from vrpo.aux.base import AuxModel, check_pairs

Item = tuple[str, str]  # (prompt, response)


def distinct_items(prompts, responses_a, responses_b) -> tuple[list[Item], np.ndarray, np.ndarray]:
    """The distinct (prompt, response) items of a set of pairs and each pair's two indices."""
    index: dict[Item, int] = {}
    ia = np.array([index.setdefault((x, a), len(index)) for x, a in zip(prompts, responses_a)], dtype=np.int64)
    ib = np.array([index.setdefault((x, b), len(index)) for x, b in zip(prompts, responses_b)], dtype=np.int64)
    return list(index), ia, ib


# ----------------------------------------------------------------------------------------
# Backbones: items -> features. Built lazily inside fit/load (they import torch).
# ----------------------------------------------------------------------------------------
def _torch_module_base():
    import torch

    return torch.nn.Module


class FrozenSentenceBackbone:
    """Frozen sentence encoder; features [e(y), e(x) * e(y)] (dim 2H), no trainable state."""

    trainable = False

    def __init__(self, path=None, device="cpu"):
        from vrpo.aux.embeddings import load_encoder, shared_cache

        self.encoder = load_encoder(path, device)
        self.cache = shared_cache(self.encoder)
        self.out_dim = 2 * self.encoder.dim

    def setup(self, items: Sequence[Item]) -> None:
        pass

    def features(self, items: Sequence[Item], progress: bool = False):
        import torch

        e = self.cache.embed([t for it in items for t in it], progress=progress).reshape(len(items), 2, -1)
        ex, ey = torch.from_numpy(e[:, 0]), torch.from_numpy(e[:, 1])
        return torch.cat([ey, ex * ey], dim=-1)

    def parameters(self):
        return iter(())

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def train(self, mode=True):
        return self


def build_transformer_backbone(path=None, device="cpu", **_):
    """Sentence encoder fine-tuned end to end on the joint text (x, y); features dim H."""
    from vrpo.aux.embeddings import SentenceEncoder, minilm_path

    class TransformerBackbone(_torch_module_base()):
        trainable = True

        def __init__(self):
            super().__init__()
            self.encoder = SentenceEncoder(path or minilm_path(), device=device)  # own copy: it is trained
            self.model = self.encoder.model
            self.out_dim = self.encoder.dim

        def setup(self, items):
            pass

        def features(self, items, progress=False):
            return self.encoder.forward(self.encoder.tokenize([x for x, _ in items], [y for _, y in items]))

    return TransformerBackbone()


def build_table_backbone(dim=32, keys=None, **_):
    """A learned vector per distinct (prompt, response) item; keys fixed at ``setup``."""
    import torch

    class TableBackbone(_torch_module_base()):
        trainable = True

        def __init__(self):
            super().__init__()
            self.out_dim = dim
            self.keys: list[Item] = []
            if keys is not None:
                self.setup([tuple(k) for k in keys])

        def setup(self, items):
            self.keys = list(dict.fromkeys(items))
            self.index = {k: i for i, k in enumerate(self.keys)}
            self.table = torch.nn.Embedding(len(self.keys) + 1, dim)  # last row: unseen items
            torch.nn.init.normal_(self.table.weight, std=1.0)
            with torch.no_grad():
                self.table.weight[-1].zero_()

        def features(self, items, progress=False):
            idx = torch.tensor([self.index.get(tuple(it), len(self.keys)) for it in items])
            return self.table(idx)

    return TableBackbone()


def _build_frozen(path=None, device="cpu", **_):
    return FrozenSentenceBackbone(path, device)


BACKBONES = {
    "minilm": _build_frozen,
    "transformer": build_transformer_backbone,
    "table": build_table_backbone,
}


# ----------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(random_state):
    """Fork torch's global RNG so module initialisation is reproducible and side-effect free."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if random_state is None else int(random_state))
        yield


@contextlib.contextmanager
def _head_threads(trainable_backbone: bool):
    """One torch thread while only the small head trains: for matrices this small, thread
    hand-offs cost more than they save (measured 17x slower with 2 threads on a loaded
    2-core machine). A trained transformer backbone keeps torch's setting."""
    import torch

    before = torch.get_num_threads()
    if not trainable_backbone:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class NeuralPreferenceModel(AuxModel):
    """Base of GPM and BradleyTerryAux: a backbone + an antisymmetric head, trained by
    minimising the soft-label cross-entropy of P(a > b) (equivalently l(z, p) with f = sigmoid).

    Subclasses set ``kind`` and implement ``_build_head(in_dim)`` returning a torch module
    with ``embed(features) -> v [N, D]``, ``form(v_a, v_b) -> logits [N]`` and
    ``pairwise(v) -> logits [K, K]``.
    """

    kind = "neural"
    antisymmetric_by_construction = True

    def __init__(self, backbone: str = "minilm", *, hidden: int = 256, epochs: int = 30, batch_size: int = 64,
                 lr: float = 1e-3, backbone_lr: float = 2e-5, weight_decay: float = 1e-4, table_dim: int = 32,
                 validation_fraction: float = 0.15, backbone_path: str | None = None, device: str = "cpu",
                 random_state: int | None = 0, progress: bool = False):
        self.backbone = backbone
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.weight_decay = weight_decay
        self.table_dim = table_dim
        self.validation_fraction = validation_fraction
        self.backbone_path = backbone_path
        self.device = device
        self.random_state = random_state
        self.progress = progress

    # -- parameters and construction ---------------------------------------------------
    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("backbone", "hidden", "epochs", "batch_size", "lr", "backbone_lr",
                                              "weight_decay", "table_dim", "validation_fraction", "backbone_path", "device",
                                              "random_state", "progress")}

    def _build(self, table_keys=None):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: {self.backbone!r}; expected one of {sorted(BACKBONES)}")
        with _seeded(self.random_state):
            self.backbone_ = BACKBONES[self.backbone](path=self.backbone_path, device=self.device,
                                                      dim=self.table_dim, keys=table_keys)
            self.head_ = None

    def _build_head(self, in_dim: int):
        raise NotImplementedError

    # -- fitting -------------------------------------------------------------------------
    def fit(self, prompts, responses_a, responses_b, labels, sample_weight=None):
        """Fit on labelled pairs; ``labels[i]`` = P(a_i preferred) (1, 0, or soft). Returns self."""
        import torch

        check_pairs(prompts, responses_a, responses_b, labels, source=f"{type(self).__name__}.fit")
        items, ia, ib = distinct_items(prompts, responses_a, responses_b)
        self._build()
        with _seeded(self.random_state):
            self.backbone_.setup(items)
            self.head_ = self._build_head(self.backbone_.out_dim).to(self.device)
        y = torch.tensor(np.asarray(labels, dtype=np.float32))
        w = torch.ones_like(y) if sample_weight is None else torch.tensor(np.asarray(sample_weight, np.float32))
        frozen = None if self.backbone_.trainable else self.backbone_.features(items, progress=self.progress)
        with _head_threads(self.backbone == "transformer"):
            self._train(items, ia, ib, y, w, frozen)
        return self

    def _optimizer(self):
        import torch

        groups = [{"params": list(self.head_.parameters()), "lr": self.lr}]
        if self.backbone_.trainable:
            # a pretrained encoder needs a small step size; a fresh table learns at the head's
            lr = self.lr if self.backbone == "table" else self.backbone_lr
            groups.append({"params": list(self.backbone_.parameters()), "lr": lr})
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def _split(self, n: int):
        """Shuffled (train, validation) pair indices; no validation below 20 pairs."""
        import torch

        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(f"validation_fraction: {self.validation_fraction}; expected a share in [0, 0.5)")
        gen = torch.Generator().manual_seed(0 if self.random_state is None else int(self.random_state) + 1)
        perm = torch.randperm(n, generator=gen)
        n_val = int(round(self.validation_fraction * n)) if n >= 20 else 0
        return perm[n_val:], perm[:n_val]

    def _trainable_state(self) -> dict:
        state = {f"head.{k}": v.detach().clone() for k, v in self.head_.state_dict().items()}
        state.update({f"backbone.{k}": v.detach().clone() for k, v in self.backbone_.state_dict().items()})
        return state

    def _restore(self, state: dict) -> None:
        self.head_.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        self.backbone_.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})

    def _train(self, items, ia, ib, y, w, frozen):
        """Minibatch AdamW on the weighted soft-label cross-entropy. Early stopping: with a
        validation share, the epoch with the lowest validation log-loss is kept (a small
        training set otherwise ends over-confident, i.e. a badly calibrated g)."""
        import torch
        import torch.nn.functional as F
        from tqdm.auto import tqdm

        opt = self._optimizer()
        gen = torch.Generator().manual_seed(0 if self.random_state is None else int(self.random_state))
        train, val = self._split(len(y))
        total = self.epochs * -(-len(train) // self.batch_size)
        # linear decay to 0: the last steps average out Adam's oscillation
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(total, 1)))
        bce = lambda logits, idx: (F.binary_cross_entropy_with_logits(  # noqa: E731
            logits, y[idx], reduction="none") * w[idx]).sum() / w[idx].sum()
        self.best_epoch_, self.validation_loss_, best = self.epochs, None, None
        steps = tqdm(range(self.epochs), desc=f"fit {self.kind}-{self.backbone}", unit="epoch",
                     disable=not self.progress)
        for epoch in steps:
            self.head_.train(), self.backbone_.train()
            for batch in train[torch.randperm(len(train), generator=gen)].split(self.batch_size):
                loss = bce(self._logits_from_indices(items, ia[batch.numpy()], ib[batch.numpy()], frozen), batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
            if len(val):
                self.head_.eval(), self.backbone_.train(False)
                with torch.no_grad():
                    val_loss = float(bce(self._logits_from_indices(items, ia[val.numpy()], ib[val.numpy()], frozen), val))
                if self.validation_loss_ is None or val_loss < self.validation_loss_:
                    self.best_epoch_, self.validation_loss_, best = epoch + 1, val_loss, self._trainable_state()
                steps.set_postfix(loss=float(loss.detach()), val_loss=val_loss)
        if best is not None:
            self._restore(best)
        self.head_.eval(), self.backbone_.train(False)

    def _logits_from_indices(self, items, a, b, frozen):
        """Logits for pairs given by item indices; each distinct item of the batch embedded once."""
        import torch

        if frozen is not None:
            feats, a_pos, b_pos = frozen, torch.from_numpy(a), torch.from_numpy(b)
        else:
            uniq, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
            feats = self.backbone_.features([items[i] for i in uniq])
            a_pos, b_pos = torch.from_numpy(inverse[: len(a)]), torch.from_numpy(inverse[len(a):])
        v = self.head_.embed(feats.to(self.device))
        return self.head_.form(v[a_pos], v[b_pos])

    # -- prediction ----------------------------------------------------------------------
    def _check_fitted(self):
        if getattr(self, "head_", None) is None:
            raise ValueError(f"{type(self).__name__}: not fitted; call fit(...) or load a `vrpo fit-aux` folder")

    def item_vectors(self, items: Sequence[Item], batch_size: int = 256):
        """Head vectors v(x, y) of distinct items, float64 [N, D] (the GPM's response embeddings)."""
        import torch

        self._check_fitted()
        out = []
        with torch.no_grad(), _head_threads(self.backbone == "transformer"):
            for s in range(0, len(items), batch_size):
                feats = self.backbone_.features(items[s:s + batch_size], progress=False)
                out.append(self.head_.embed(feats.to(self.device)).double())
        return torch.cat(out) if out else torch.zeros(0, 1, dtype=torch.float64)

    def _predict_raw(self, prompts, responses_a, responses_b):
        import torch

        check_pairs(prompts, responses_a, responses_b, source=f"{type(self).__name__}.predict_proba",
                    allow_empty_responses=True)  # an empty reference sample is a draw of pi_ref
        items, ia, ib = distinct_items(prompts, responses_a, responses_b)
        v = self.item_vectors(items)
        with torch.no_grad():
            logits = self.head_.form(v[torch.from_numpy(ia)], v[torch.from_numpy(ib)])
        return torch.sigmoid(logits).numpy()

    def predict_pairwise_batch(self, prompts, responses):
        """[K, K] preference matrices: K head vectors per prompt, then all pairs from them."""
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"predict_pairwise_batch: {len(prompts)} prompts but {len(responses)} response lists")
        items = list(dict.fromkeys((x, y) for x, ys in zip(prompts, responses) for y in ys))
        check_pairs([x for x, _ in items], [y for _, y in items], [y for _, y in items],
                    source=f"{type(self).__name__}.predict_pairwise", allow_empty_responses=True)
        pos = {it: i for i, it in enumerate(items)}
        v = self.item_vectors(items)
        out = []
        with torch.no_grad():
            for x, ys in zip(prompts, responses):
                vk = v[torch.tensor([pos[(x, y)] for y in ys], dtype=torch.long)]
                out.append(torch.sigmoid(self.head_.pairwise(vk)).numpy())
        return out

    # -- persistence (see vrpo.aux.io) ---------------------------------------------------
    def get_config(self) -> dict:
        self._check_fitted()
        cfg = {"params": self.get_params(), "in_dim": int(self.backbone_.out_dim)}
        if self.backbone == "table":
            cfg["table_keys"] = [list(k) for k in self.backbone_.keys]
        if self.backbone == "minilm":
            cfg["encoder_fingerprint"] = self.backbone_.encoder.fingerprint
        return cfg

    def state_tensors(self) -> dict:
        self._check_fitted()
        state = {f"head.{k}": v for k, v in self.head_.state_dict().items()}
        state.update({f"backbone.{k}": v for k, v in self.backbone_.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict):
        params = dict(config["params"])
        model = cls(**params)
        model._build(table_keys=config.get("table_keys"))
        fp = config.get("encoder_fingerprint")
        if fp and fp != model.backbone_.encoder.fingerprint:
            raise ValueError(f"aux model: saved with encoder fingerprint {fp} but the local backbone has "
                             f"{model.backbone_.encoder.fingerprint}; expected the same frozen encoder weights")
        model.head_ = model._build_head(int(config["in_dim"]))
        model.head_.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        model.backbone_.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        model.head_.eval(), model.backbone_.train(False)
        return model


def mlp(in_dim: int, hidden: int, out_dim: int):
    """in_dim -> hidden -> out_dim with a GELU: the learned part over (frozen) features."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out_dim))
