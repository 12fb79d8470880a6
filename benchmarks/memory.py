"""Peak memory and step time of a training step, DPO and VRPO at K = 2, 4, 8, 16, on a GPT-2
whose logits dominate (d = 128, 2 layers, a 32k vocabulary): the previous step (one pass, the
model's full [N, T, V] logits), the one-pass step (LM head chunk by chunk on completion tokens)
and the two-pass step (``--sequences-per-pass``).

    .venv/bin/python benchmarks/memory.py [--rounds 3] [--pairs 4] [--sequences-per-pass 4]
    .venv/bin/python benchmarks/memory.py --tiny        # a seconds-long smoke run of the script

Memory: each setting runs in a fresh child process, which builds the model, optimizer and
batch, takes its baseline (CPU: resident set; CUDA: ``memory_allocated``), runs ``--steps``
AdamW steps and reports the growth of its peak over the baseline (CPU: the kernel's
high-water mark of the resident set, reset at the baseline, with glibc's mmap threshold fixed
so that freed tensors go back to the system; CUDA: ``max_memory_allocated``; the optimizer's
state, 2 x the parameters, is part of it in every setting). It also saves its first step's
gradients and its final weights: compared across settings, the two-pass step is exact.
Step time: all settings in this process, taking one step each per round, in turn (paired
rounds: machine load hits all alike); medians of wall-clock and CPU time.

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

    import train_step

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return train_step.rss_mb()


def trainer_of(setting, folder: Path, sequences_per_pass: int):
    """The trainer and batch of a setting (method, K, mode), reference log-probs from the folder."""
    import train_step

    method, k, mode = setting
    rows = json.loads((folder / "rows.json").read_text())
    reference = json.loads((folder / "reference.json").read_text())
    trainer, batch = train_step.our_trainer(folder / "model", rows, method, k, folder / "out" / name_of(*setting),
                                            sequences_per_pass=sequences_per_pass if mode == "two-pass" else None,
                                            reference=reference)
    return (full_logits_trainer(trainer) if mode == "full-logits" else trainer), batch


def child(args) -> None:
    """One setting in this process: its peak memory growth over ``--steps`` steps (printed as
    JSON), its first step's gradients and its final weights (saved in the folder)."""
    from safetensors.torch import save_file

    import train_step

    setting = tuple(json.loads(args.child))
    folder = Path(args.folder)
    trainer, batch = trainer_of(setting, folder, args.sequences_per_pass)
    step = train_step.step_fn(trainer, batch)
    reset_peak()
    base = current_mb()
    grads = {}

    def keep_first_gradients(model):
        if not grads:
            grads.update({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None})

    for _ in range(args.steps):
        step(keep_first_gradients)
    growth = peak_mb() - base
    name = name_of(*setting)
    save_file({n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters()},
              str(folder / f"weights-{name}.safetensors"))
    save_file(grads, str(folder / f"gradients-{name}.safetensors"))
    print(json.dumps({"growth_mb": growth}))


def run_child(setting, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(list(setting)), "--folder", str(folder),
           "--steps", str(args.steps), "--sequences-per-pass", str(args.sequences_per_pass)]
    # glibc's mmap threshold fixed (its default rises with every large free): freed tensors then go back to
    # the system and the resident peak follows the live tensors, not the heap's fragmentation
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{setting}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def gradient_gap(folder: Path, a: str, b: str) -> tuple[float, str]:
    """The largest relative gradient difference of the first step over the weights,
    max |g_a - g_b| / max |g_a| per weight, and that weight."""
    from safetensors.torch import load_file

    ga, gb = (load_file(str(folder / f"gradients-{n}.safetensors")) for n in (a, b))
    gaps = {n: float((ga[n] - gb[n]).abs().max() / ga[n].abs().max().clamp_min(1e-30)) for n in ga}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def weight_gap(folder: Path, a: str, b: str, init: dict) -> tuple[float, float, str]:
    """max |w_a - w_b| over all weights, the largest update max |w_a - w_init|, and the weight
    where they differ most."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(folder / f"weights-{n}.safetensors")) for n in (a, b))
    gaps = {n: float((wa[n] - wb[n]).abs().max()) for n in wa}
    update = max(float((wa[n] - init[n]).abs().max()) for n in wa if n in init)
    worst = max(gaps, key=gaps.get)
    return gaps[worst], update, worst


def report(memory: dict, wall: dict, cpu: dict, folder: Path, args) -> None:
    from safetensors.torch import load_file

    import train_step

    med = {s: {"growth_mb": memory[s], "step_s": wall[s], "cpu_s": cpu[s]} for s in memory}
    ks = sorted({k or 0 for _, k, _ in memory})
    print(f"\npeak growth (MB) | step time, wall clock (s) | step time, CPU (s): {', '.join(MODE_TITLES[m] for m in MODES)}")
    print(f"{'method':9s} {'sequences':>9s} " + " ".join(f"{m + ' MB':>16s}" for m in MODES) + " | "
          + " ".join(f"{m + ' s':>13s}" for m in MODES) + " | " + " ".join(f"{m + ' CPU':>15s}" for m in MODES))
    for k in ks:
        method, kk = ("dpo", None) if k == 0 else ("vrpo", k)
        row = [med[(method, kk, m)] for m in MODES]
        print(f"{method + ('' if kk is None else f' K={kk}'):9s} {args.pairs * (2 + k):9d} "
              + " ".join(f"{r['growth_mb']:16.0f}" for r in row) + " | " + " ".join(f"{r['step_s']:13.2f}" for r in row)
              + " | " + " ".join(f"{r['cpu_s']:15.2f}" for r in row))
    n = args.sequences_per_pass
    top = max(ks)
    print()
    if not args.no_memory:
        r = med[("vrpo", top, "two-pass")]["growth_mb"] / med[("dpo", None, "two-pass")]["growth_mb"]
        print(f"two-pass VRPO K={top} / two-pass DPO peak growth at {n} sequences per pass: {r:.2f}x "
              f"(target <= 1.30x) {'OK' if r <= 1.3 else 'MISSED'}")
    for k in ks:
        method, kk = ("dpo", None) if k == 0 else ("vrpo", k)
        two, one = med[(method, kk, "two-pass")], med[(method, kk, "one-pass")]
        print(train_step.ratio_line(f"{method} K={k}: two-pass / one-pass step time", two["step_s"] / one["step_s"],
                                    two["cpu_s"] / one["cpu_s"], 1.4))
    if 8 in ks and not args.no_memory:
        init = load_file(str(folder / "model" / "model.safetensors"))
        g = med[("vrpo", 8, "full-logits")]["growth_mb"] / med[("vrpo", 8, "two-pass")]["growth_mb"]
        print(f"VRPO K=8, batch {args.pairs}: previous one-pass growth / two-pass growth (--sequences-per-pass {n}): "
              f"{g:.2f}x (target >= 2.00x) {'OK' if g >= 2 else 'MISSED'}")
        g1 = med[("vrpo", 8, "one-pass")]["growth_mb"] / med[("vrpo", 8, "two-pass")]["growth_mb"]
        print(f"VRPO K=8: one-pass (chunked head) growth / two-pass growth: {g1:.2f}x")
        for other in ("full-logits", "one-pass"):
            gap, where = gradient_gap(folder, name_of("vrpo", 8, other), name_of("vrpo", 8, "two-pass"))
            print(f"VRPO K=8 gradients of the first step, two-pass vs {MODE_TITLES[other]}: largest relative "
                  f"difference {gap:.2g} (at {where})")
            gap, update, where = weight_gap(folder, name_of("vrpo", 8, "two-pass"), name_of("vrpo", 8, other), init)
            print(f"VRPO K=8 weights after {args.steps} AdamW steps, two-pass vs {MODE_TITLES[other]}: "
                  f"max |difference| {gap:.2g} (largest update {update:.2g}; at {where})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds of step times")
    ap.add_argument("--pairs", type=int, default=4, help="prompts per step (B)")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4, 8, 16], help="K values; 0 = DPO")
    ap.add_argument("--sequences-per-pass", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="AdamW steps per memory child")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--completion-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the step times (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="step times only (no memory children)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: small vocabulary, K = 0 and 8, one round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.tiny:
        args.vocab, args.ks, args.rounds, args.pairs, args.completion_tokens = 4096, [0, 8], 1, 2, 8
        args.sequences_per_pass = 3
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
          f"~{args.prompt_tokens} tokens, completions of ~{args.completion_tokens}; {train_step.load_average()}")
    memory = {s: float("nan") if args.no_memory else run_child(s, folder, args)["growth_mb"] for s in settings(args.ks)}
    if args.threads:
        torch.set_num_threads(args.threads)
    start = train_step.load_average()
    steps = {s: train_step.step_fn(*trainer_of(s, folder, args.sequences_per_pass)) for s in settings(args.ks)}
    wall, cpu = train_step.paired_times(steps, args.rounds, 1)
    print(f"step times: medians of {args.rounds} paired rounds in one process, {torch.get_num_threads()} threads; "
          f"{start} at start, "
          f"{train_step.load_average()} at end")
    report(memory, wall, cpu, folder, args)


if __name__ == "__main__":
    main()
