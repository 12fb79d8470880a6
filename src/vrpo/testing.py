"""Tiny real models for tests, benchmarks and the quickstart, built offline in seconds.

``build_tiny_causal_lm`` trains a byte-level BPE tokenizer on the given texts (the
``tokenizers`` library) and initialises a small GPT-2 (transformers) with it, then saves
both with ``save_pretrained`` (safetensors) so every command loads it like any model
folder. The tokenizer carries a simple chat template (``CHAT_TEMPLATE``) so conversational
data runs through it as through an instruction-tuned model. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

DEFAULT_TEXTS = [
    "The movie was wonderful and the acting was great.",
    "A terrible film with a boring plot and bad acting.",
    "I loved the music, the story and the characters.",
    "The worst movie I have seen this year.",
    "An excellent, moving and beautiful story.",
    "Please book me an appointment for next Tuesday morning.",
    "If you have chest pain, call emergency services right away.",
]

# A minimal chat template (Jinja, as transformers reads it): each turn is a role line, the
# content and the end-of-text token; the generation prompt opens the assistant's turn. The
# rendered prompt is a prefix of prompt + reply, which conversational preference rows need
# (vrpo.data renders a reply as the text the template adds after the prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (eos = pad = <|endoftext|>),
    with ``CHAT_TEMPLATE`` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_causal_lm(out_dir: str | Path, texts: Iterable[str] | None = None, *, vocab_size: int = 512,
                         n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 256,
                         seed: int = 0) -> Path:
    """Save a randomly initialised tiny GPT-2 and its tokenizer to ``out_dir``; return the path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    tokenizer = build_tokenizer(texts or DEFAULT_TEXTS, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
