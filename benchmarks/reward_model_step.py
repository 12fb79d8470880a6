"""Reward-model training-step cost, side by side in one process on the same tiny model and data:
``vrpo train-rm --method bt`` against ``--method vrpo`` with K = 2 and K = 4 reference samples.

    .venv/bin/python benchmarks/reward_model_step.py [--rounds 25] [--pairs 8] [--words 20] [--threads 1]

A step = the packed forward pass (chosen, rejected and the K references of every prompt in one
batch, as ``vrpo train-rm`` collates it), the method's loss (``rm_method(NAME).loss``: the
adapters over ``vrpo.losses.preference_loss`` / ``vrpo_loss``), backward and an AdamW step.
The three set-ups take turns in every round (paired, so machine noise hits all alike); the
median over rounds after ``--warmup``. Expected: vrpo(K) / bt ~ (2 + K) / 2, the extra
sequences and nothing more (no reference model: the reward is the head's output).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SETUPS = (("bt", "bt", None), ("vrpo K=2", "vrpo", 2), ("vrpo K=4", "vrpo", 4))
WORDS = "the movie was great bad boring wonderful plot acting music story film really quite very".split()


def make_rows(pairs: int, words: int, seed: int = 0) -> list[dict]:
    """Rows with a prompt of 8 words, responses and 4 reference samples of ``words`` words (seeded)."""
    import random

    rng = random.Random(seed)
    text = lambda n: " " + " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return [{"prompt": f"Review {i}:" + text(8), "chosen": text(words), "rejected": text(words), "aux_prob": 0.7,
             "ref_samples": [text(words) for _ in range(4)], "ref_aux_prob": [[0.5] * 4 for _ in range(4)]}
            for i in range(pairs)]


def setup(model_dir: Path, data: Path, root: Path, method: str, k: int | None, pairs: int):
    """(model, optimizer, packed batch, loss function) of one set-up, through the public API of train-rm."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vrpo.train.collator import PreferenceCollator
    from vrpo.train.reward_model import RewardModelConfig, load_reward_features, rm_method, unpack_rewards

    cfg = RewardModelConfig(model=str(model_dir), data=str(data), out=str(root / f"{method}-{k}"), method=method,
                            num_ref_samples=k, max_length=96, max_prompt_length=32).validate()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    features, kk, _ = load_reward_features(cfg, tok)
    torch.manual_seed(0)  # the same fresh head in every set-up
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    batch = PreferenceCollator(tok.pad_token_id, with_reference=kk is not None)(features[:pairs])
    objective = rm_method(method)

    def loss():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        per_example, _ = objective.loss(unpack_rewards(rewards, pairs, kk), batch, cfg)
        return per_example.mean()

    return model, torch.optim.AdamW(model.parameters(), lr=1e-5), batch, loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5, help="rounds left out of the median")
    parser.add_argument("--pairs", type=int, default=8, help="prompts per step")
    parser.add_argument("--words", type=int, default=20, help="words per response")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.rounds <= args.warmup:
        raise ValueError(f"--rounds {args.rounds}: expected more than --warmup {args.warmup}")

    import torch
    from transformers.utils import logging as hf_logging

    from vrpo.testing import build_tiny_causal_lm

    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected: the fresh head
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="rm_step_"))
    rows = make_rows(args.pairs, args.words)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = build_tiny_causal_lm(root / "model", [r["prompt"] + r["chosen"] for r in rows] * 4,
                                     vocab_size=4096, n_layer=2, n_embd=128, n_head=4)
    setups = {name: setup(model_dir, data, root, method, k, args.pairs) for name, method, k in SETUPS}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (model, opt, batch, loss) in setups.items():
            t = time.perf_counter()
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v[args.warmup:]) for n, v in times.items()}
    device = "GPU" if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"reward-model step (forward + backward + AdamW), {args.pairs} prompts, responses of {args.words} words, "
          f"GPT-2 d=128 x 2 layers, {device}; median of {args.rounds - args.warmup} paired rounds")
    for name, _, k in SETUPS:
        seqs = setups[name][2]["input_ids"].shape[0]
        print(f"{name:9s} {1000 * med[name]:7.1f} ms/step  ratio to bt {med[name] / med['bt']:.2f}  "
              f"(sequences in the batch: {seqs}; (2 + K) / 2 = {(2 + (k or 0)) / 2:.1f})")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as e:  # bad flags: one line, no traceback
        raise SystemExit(f"reward_model_step: error: {e}") from None
