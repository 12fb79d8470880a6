"""``vrpo tiny-model``: build a tiny random GPT-2 + BPE tokenizer offline (for the quickstart and tests).

Its tokenizer is trained on the texts of ``--texts`` (any preference or prompts file, plain
strings or conversational message lists) so the example data tokenise into few tokens, and
carries a simple chat template (``vrpo.testing.CHAT_TEMPLATE``) so conversational data runs
through it; nothing is downloaded.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write (save_pretrained, safetensors)")
    p.add_argument("--texts", help="JSONL/Parquet/CSV whose prompt/chosen/rejected texts train the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from vrpo.testing import DEFAULT_TEXTS, build_tiny_causal_lm

    texts = list(DEFAULT_TEXTS)
    if args.texts:
        from vrpo.data import read_rows

        for row in read_rows(args.texts):
            texts += [t for c in ("prompt", "chosen", "rejected") for t in _texts_of(row.get(c))]
    out = build_tiny_causal_lm(args.out, texts, vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                               seed=args.seed)
    print(f"wrote a tiny GPT-2 ({args.n_layer} layers, d={args.n_embd}) and its tokenizer (with a chat template) to {out}")
    return 0


def _texts_of(value) -> list[str]:
    """The texts of a cell: a string, or the contents of a list of chat messages."""
    if isinstance(value, list):
        return [str(m["content"]) for m in value if isinstance(m, dict) and m.get("content")]
    return [str(value)] if value else []
