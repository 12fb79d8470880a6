"""The policy: a byte-level BPE trained on review text and a tiny GPT-2 pre-trained on it.

The pre-trained model is pi_ref, the SFT model every method starts from. Both are cached
under ``cache_dir()/policy-<hash of the config>`` (``save_pretrained`` folders, written to
a temporary folder and renamed, so an interrupted run never leaves half a cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path


def cache_dir() -> Path:
    """``$VRPO_CACHE`` if set, else ``.cache/vrpo`` (gitignored) under the working folder."""
    return Path(os.environ.get("VRPO_CACHE") or ".cache/vrpo")


def config_key(cfg) -> str:
    """A short hash of a dataclass config: the cache identity of what it builds."""
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PolicyConfig:
    """Sized so the quick preset fits the 10-minute demo on 2 CPU cores: vocabulary size
    dominates the cost of so small a model (the output layer is vocabulary x d), so 4k tokens;
    d=128, 2 layers, ~0.9M parameters."""

    vocab_size: int = 4096
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 48  # pre-training window: the first seq_len tokens of a review (prompt 8 + response 24 fit)
    tokenizer_reviews: int = 4000  # reviews the BPE is trained on (from the pretrain split)
    pretrain_tokens: int = 300_000  # token budget of pre-training (one pass, no repeats if possible)
    batch_size: int = 16  # small batches: more steps for the same tokens (the budget binds, not noise)
    lr: float = 3e-3
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (eos = pad = <|endoftext|>) trained on ``texts``."""
    from vrpo.testing import build_tokenizer

    return build_tokenizer(texts, vocab_size=vocab_size)


def build_model(cfg: PolicyConfig, tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(cfg.seq_len, 128), n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def pretraining_windows(texts: list[str], tokenizer, cfg: PolicyConfig):
    """[N, seq_len] token ids: the opening window of each review that is long enough
    (openings, because prompts are review openings too), up to the token budget."""
    import torch

    n_max = max(1, cfg.pretrain_tokens // cfg.seq_len)
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) >= cfg.seq_len:
            rows.append(ids[:cfg.seq_len])
        if len(rows) == n_max:
            break
    if not rows:
        raise ValueError(f"pretraining: no review has {cfg.seq_len} tokens; expected review text")
    return torch.tensor(rows, dtype=torch.long)


def pretrain(model, windows, cfg: PolicyConfig, progress: bool = True) -> list[float]:
    """Next-token prediction over ``windows`` (one pass, linear warm-up then linear decay).
    Returns the training loss of every step."""
    import torch
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(windows), generator=g)
    steps = max(1, len(windows) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.05, (steps - s) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="imdb: pre-training pi_ref", unit="step", disable=not progress)
    for s in bar:
        batch = windows[order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.2f}")
    model.eval()
    return losses


def load_or_pretrain(pretrain_texts: list[str], cfg: PolicyConfig, progress: bool = True) -> Path:
    """Folder of the cached pi_ref (model + tokenizer); built on the first call."""
    from vrpo.provenance import atomic_write_json

    folder = cache_dir() / f"policy-{config_key(cfg)}"
    texts_fp = hashlib.sha256("\x00".join(pretrain_texts).encode()).hexdigest()[:16]
    if (folder / "pretrain.json").exists():
        cached_fp = json.loads((folder / "pretrain.json").read_text()).get("pretrain_texts")
        if cached_fp not in (None, texts_fp):
            raise ValueError(f"imdb: the cached pi_ref {folder} was pre-trained on other reviews (split sizes "
                             "changed?); delete that folder or set VRPO_CACHE to a fresh directory")
        return folder
    tokenizer = train_tokenizer(pretrain_texts[:cfg.tokenizer_reviews], cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    losses = pretrain(model, pretraining_windows(pretrain_texts, tokenizer, cfg), cfg, progress)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "pretrain.json", {"config": asdict(cfg), "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                                              "steps": len(losses), "pretrain_texts": texts_fp})
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_policy(folder: str | Path):
    """(model, tokenizer) from a ``save_pretrained`` folder, model in eval mode."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return GPT2LMHeadModel.from_pretrained(folder, use_safetensors=True).eval(), tokenizer
