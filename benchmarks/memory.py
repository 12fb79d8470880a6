"""Peak memory and step time of a training step, DPO and VRPO at K = 2, 4, 8, 16, on a GPT-2
whose logits dominate (d = 128, 2 layers, a 32k vocabulary): the previous step (one pass, the
model's full [N, T, V] logits), the one-pass step (LM head chunk by chunk on completion tokens)
and the two-pass step (``--sequences-per-pass``).

    .venv/bin/python benchmarks/memory.py [--rounds 3] [--pairs 4] [--sequences-per-pass 4]
    .venv/bin/python benchmarks/memory.py --tiny        # a seconds-long smoke run of the script

Each setting runs in a fresh child process, which builds the model, optimizer and batch, takes
its baseline (CPU: resident set; CUDA: ``memory_allocated``), runs ``--steps`` AdamW steps and
reports the growth of its peak over the baseline (CPU: ``ru_maxrss``; CUDA:
``max_memory_allocated``; the optimizer's state, 2 x the parameters, is part of it in every
setting) and the time of its last step. In each round every setting's child runs once, in
turn, so machine load hits all alike; the table shows the median over rounds.

Targets: two-pass VRPO K = 16 peak growth <= 1.3 x two-pass DPO's at the same sequences per
pass; two-pass step time <= 1.4 x one-pass at the same K; at K = 8 the two-pass growth at
least 2x below the previous one-pass step's, with the same weights after the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MODES = ("full-logits", "one-pass", "two-pass")
MODE_TITLES = {"full-logits": "one pass, full logits (previous)", "one-pass": "one pass", "two-pass": "two passes"}


def build(folder: Path, vocab: int, n_embd: int, positions: int) -> Path:
    """A GPT-2 with a ``vocab``-token output layer (the tokenizer uses its first 4096 ids)."""
    import torch
    from transformers import AutoConfig, GPT2LMHeadModel

    import train_step

    model_dir = train_step.build_model(folder, positions, vocab_size=4096, n_embd=n_embd)
    config = AutoConfig.from_pretrained(model_dir)
    config.vocab_size = vocab
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def settings(ks) -> list[tuple[str, int | None, str]]:
    return [(("dpo", None) if k == 0 else ("vrpo", k)) + (mode,) for k in ks for mode in MODES]


def name_of(method: str, k: int | None, mode: str) -> str:
    return f"{method}{'' if k is None else f'-k{k}'}-{mode}"


def full_logits_trainer(trainer):
    """The previous step: the model's own [N, T, V] logits, then ``vrpo.losses.sequence_logps``."""
    import types

    from vrpo.losses import sequence_logps

    def sequence_values(self, model, chunk):
        logits = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]).logits
        return sequence_logps(logits, chunk["input_ids"], chunk["completion_mask"])

    trainer.sequence_values = types.MethodType(sequence_values, trainer)
    return trainer


def reset_peak() -> None:
    """Start the peak from now: CUDA's counter, or the kernel's high-water mark of this process
    (``/proc/self/clear_refs``; building the model and batch must not count)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def current_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    """One setting in this process: print {"growth_mb", "step_s", "tokens"} as JSON."""
    import torch
    from safetensors.torch import save_file

    import train_step

    method, k, mode = json.loads(args.child)
    folder = Path(args.folder)
    rows = json.loads((folder / "rows.json").read_text())
    reference = json.loads((folder / "reference.json").read_text())
    trainer, batch = train_step.our_trainer(folder / "model", rows, method, k, folder / "out" / name_of(method, k, mode),
                                            sequences_per_pass=args.sequences_per_pass if mode == "two-pass" else None,
                                            reference=reference)
    if mode == "full-logits":
        full_logits_trainer(trainer)
    step = train_step.step_fn(trainer, batch)
    reset_peak()
    base = current_mb()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    growth = peak_mb() - base
    weights = {n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters()}
    save_file(weights, str(folder / f"weights-{name_of(method, k, mode)}.safetensors"))
    print(json.dumps({"growth_mb": growth, "step_s": times[-1], "tokens": int(batch["attention_mask"].sum())}))


def run_child(setting, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(list(setting)), "--folder", str(folder),
           "--steps", str(args.steps), "--sequences-per-pass", str(args.sequences_per_pass)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{setting}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def weight_gap(folder: Path, a: str, b: str, init: dict) -> tuple[float, float]:
    """max |w_a - w_b| over all weights, and the largest update max |w_a - w_init|."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(folder / f"weights-{n}.safetensors")) for n in (a, b))
    gap = max(float((wa[n] - wb[n]).abs().max()) for n in wa)
    update = max(float((wa[n] - init[n]).abs().max()) for n in wa if n in init)
    return gap, update


def report(results: dict, folder: Path, args) -> None:
    from safetensors.torch import load_file

    med = {s: {key: statistics.median(r[key] for r in runs) for key in ("growth_mb", "step_s")}
           for s, runs in results.items()}
    ks = sorted({k or 0 for _, k, _ in results})
    print(f"\n{'method':8s} {'sequences':>9s} " + " ".join(f"{MODE_TITLES[m] + ' MB':>34s}" for m in MODES)
          + "   " + " ".join(f"{m + ' s':>15s}" for m in MODES))
    for k in ks:
        method, kk = ("dpo", None) if k == 0 else ("vrpo", k)
        row = [med[(method, kk, m)] for m in MODES]
        print(f"{method + ('' if kk is None else f' K={kk}'):8s} {args.pairs * (2 + k):9d} "
              + " ".join(f"{r['growth_mb']:34.0f}" for r in row) + "   " + " ".join(f"{r['step_s']:15.3f}" for r in row))
    n = args.sequences_per_pass
    top = max(ks)
    r = med[("vrpo", top, "two-pass")]["growth_mb"] / med[("dpo", None, "two-pass")]["growth_mb"]
    print(f"\ntwo-pass VRPO K={top} / two-pass DPO peak growth at {n} sequences per pass: {r:.2f}x "
          f"(target <= 1.30x) {'OK' if r <= 1.3 else 'MISSED'}")
    for k in ks:
        method, kk = ("dpo", None) if k == 0 else ("vrpo", k)
        t = med[(method, kk, "two-pass")]["step_s"] / med[(method, kk, "one-pass")]["step_s"]
        print(f"{method} K={k}: two-pass / one-pass step time {t:.2f}x (target <= 1.40x) {'OK' if t <= 1.4 else 'MISSED'}")
    if 8 in ks:
        init = load_file(str(folder / "model" / "model.safetensors"))
        g = med[("vrpo", 8, "full-logits")]["growth_mb"] / med[("vrpo", 8, "two-pass")]["growth_mb"]
        print(f"VRPO K=8, batch {args.pairs}: previous one-pass growth / two-pass growth (--sequences-per-pass {n}): "
              f"{g:.2f}x (target >= 2.00x) {'OK' if g >= 2 else 'MISSED'}")
        g1 = med[("vrpo", 8, "one-pass")]["growth_mb"] / med[("vrpo", 8, "two-pass")]["growth_mb"]
        print(f"VRPO K=8: one-pass (chunked head) growth / two-pass growth: {g1:.2f}x")
        for other in ("full-logits", "one-pass"):
            gap, update = weight_gap(folder, name_of("vrpo", 8, "two-pass"), name_of("vrpo", 8, other), init)
            print(f"VRPO K=8 weights after {args.steps} AdamW steps, two-pass vs {MODE_TITLES[other]}: "
                  f"max |difference| {gap:.2g} (largest update {update:.2g})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=4, help="prompts per step (B)")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4, 8, 16], help="K values; 0 = DPO")
    ap.add_argument("--sequences-per-pass", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="AdamW steps per child (the last is timed)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--completion-tokens", type=int, default=48)
    ap.add_argument("--tiny", action="store_true", help="smoke run: small vocabulary, K = 0 and 8, one round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.tiny:
        args.vocab, args.ks, args.rounds, args.pairs, args.completion_tokens = 4096, [0, 8], 1, 2, 8
    import torch

    import train_step

    folder = Path(tempfile.mkdtemp(prefix="vrpo-memory-"))
    model_dir = build(folder, args.vocab, 128, args.prompt_tokens + args.completion_tokens + 8)
    rows = train_step.make_rows(model_dir, args.pairs, args.prompt_tokens, args.completion_tokens, k=max(args.ks + [2]))
    (folder / "rows.json").write_text(json.dumps(rows))
    # computed once here: a child's own reference pass would leave its memory in the child's baseline
    (folder / "reference.json").write_text(json.dumps(train_step.reference_logps(model_dir, rows, max(args.ks + [2]))))
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}; GPT-2 d=128, 2 layers, vocabulary {args.vocab}; {args.pairs} prompts of "
          f"~{args.prompt_tokens} tokens, completions of ~{args.completion_tokens}; {args.rounds} rounds; "
          f"{train_step.load_average()} at start")
    results: dict = {s: [] for s in settings(args.ks)}
    for _ in range(args.rounds):
        for s in results:
            results[s].append(run_child(s, folder, args))
    print(f"peak growth over the model, optimizer and batch (MB, median of rounds); {train_step.load_average()} at end")
    report(results, folder, args)


if __name__ == "__main__":
    main()
