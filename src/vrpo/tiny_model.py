"""``vrpo tiny-model``: build a tiny random GPT-2 + BPE tokenizer offline (for the quickstart and tests).

Its tokenizer is trained on the texts of ``--texts`` (any preference or prompts file, plain
strings or conversational message lists) so the example data tokenise into few tokens, and
carries a simple chat template (``vrpo.testing.CHAT_TEMPLATE``) so conversational data runs
through it; nothing is downloaded.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, SEED, add_overwrite_flag

    p.add_argument("--out", required=True, help="folder to write (save_pretrained, safetensors)")
    p.add_argument("--texts", help="JSONL/Parquet/CSV whose prompt/chosen/rejected texts train the tokenizer "
                   "(default: a few built-in sentences)")
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=512, help="BPE vocabulary size")
    p.add_argument("--n-layer", type=POSITIVE_INT, default=2, help="transformer layers")
    p.add_argument("--n-embd", type=POSITIVE_INT, default=64, help="hidden size (a multiple of 2, the heads)")
    p.add_argument("--n-positions", type=POSITIVE_INT, default=256,
                   help="context length in tokens: the longest prompt + response the model accepts")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random weights")
    add_overwrite_flag(p, "the model folder")


def run(args: argparse.Namespace) -> int:
    from vrpo.testing import DEFAULT_TEXTS, build_tiny_causal_lm

    texts = list(DEFAULT_TEXTS)
    if args.texts:
        from vrpo.data import read_rows

        for row in read_rows(args.texts):
            texts += [t for c in ("prompt", "chosen", "rejected") for t in _texts_of(row.get(c))]
    from vrpo.outputs import claim_output
    from vrpo.provenance import fingerprint_data

    settings = {k: getattr(args, k) for k in ("vocab_size", "n_layer", "n_embd", "n_positions", "seed")}
    claim_output(args.out, "tiny-model", {"texts": fingerprint_data(args.texts) if args.texts else None, **settings},
                 overwrite=args.overwrite)
    if args.n_embd % 2:
        raise ValueError(f"--n-embd {args.n_embd}: expected a multiple of 2 (the model has 2 attention heads)")
    out = build_tiny_causal_lm(args.out, texts, vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                               n_positions=args.n_positions, seed=args.seed)
    print(f"wrote a tiny GPT-2 ({args.n_layer} layers, d={args.n_embd}, {args.n_positions} positions) and its "
          f"tokenizer (with a chat template) to {out}")
    return 0


def _texts_of(value) -> list[str]:
    """The texts of a cell: a string, or the contents of a list of chat messages."""
    if isinstance(value, list):
        return [str(m["content"]) for m in value if isinstance(m, dict) and m.get("content")]
    return [str(value)] if value else []
