"""Reference sampling through a server vs `model.generate`, side by side in one run, and the
fidelity figures that decide whether a server samples the reference model.

Speed (default): the same model (SmolLM2-135M-Instruct), prompts, K and max_new_tokens,
drawn by the hf engine (``model.generate`` on the dequantised float copy) and by the server
engine (llama.cpp's server serving the Q4_1 GGUF on 127.0.0.1), in alternating rounds; both
include the local exact re-scoring. Prints samples/s of each and the ratio.

    .venv/bin/python benchmarks/sampling_engines.py [--prompts 16] [-K 4] [--max-new-tokens 48] [--rounds 2]

Fidelity (``--fidelity``): the figures of the check for the honest server and for servers
that run another policy: a gateway forcing temperature 0.7, llama.cpp's own default sampling
settings (top-k 40, min-p 0.05, repeat penalty 1.1), and other checkpoints (the local weights
moved by Gaussian noise of 2%, 5% and 10% of each tensor's standard deviation).

    .venv/bin/python benchmarks/sampling_engines.py --fidelity [--prompts 16] [-K 4]

GPU (``--vllm``; needs a CUDA machine with vllm installed): vLLM serving the float model
folder vs the hf engine on the GPU, the same comparison. Not run on the CPU machines this
project is built on; ``--vllm --dry-run`` prints the server command it would start.

    python benchmarks/sampling_engines.py --vllm [--model MODEL_DIR] [--prompts 256] [-K 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CONTENTS = [
    "Can I book an appointment for Tuesday morning?", "What time does the clinic open on Saturdays?",
    "I need to cancel my visit tomorrow.", "Write one sentence about the sea.", "Name a fruit that is yellow.",
    "How do I move my appointment to Friday?", "Give me a tip for sleeping better.", "What is 12 times 7?",
    "Suggest a name for a cat.", "Describe a sunny day in two sentences.", "Is the clinic open on Monday?",
    "Tell me a short joke.", "What should I bring to my first visit?", "Translate 'good morning' to French.",
    "List three colours.", "Can my daughter come with me to the appointment?",
]


def write_prompts(path: Path, n: int) -> Path:
    rows = [{"prompt": [{"role": "user", "content": CONTENTS[i % len(CONTENTS)] + (f" ({i})" if i >= len(CONTENTS)
                                                                                      else "")}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed_sample(model_dir, prompts, out, args, engine=None) -> tuple[float, dict]:
    from vrpo.provenance import read_manifest
    from vrpo.sampling import read_samples, sample_references

    start = time.perf_counter()
    sample_references(str(model_dir), str(prompts), str(out), num_samples=args.K, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, seed=args.seed, shard_size=args.prompts, engine=engine)
    seconds = time.perf_counter() - start
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for r in read_samples(out) for s in r["samples"])
    return seconds, dict(read_manifest(out), generated_tokens=tokens)


def compare_speed(server_url: str, model_dir: Path, args, work: Path) -> None:
    from vrpo.sampling_server import ServerEngine

    prompts = write_prompts(work / "prompts.jsonl", args.prompts)
    n = args.prompts * args.K
    times = {"hf": [], "server": []}
    for r in range(args.rounds):  # alternating, so machine noise hits both engines alike
        for name in ("hf", "server"):
            engine = ServerEngine(server_url, args.served_model, concurrency=args.concurrency) if name == "server" \
                else None
            seconds, m = timed_sample(model_dir, prompts, work / f"{name}-{r}", args, engine)
            times[name].append(seconds)
            print(f"round {r} {name:6s}: {seconds:7.1f} s  {n / seconds:6.2f} samples/s  "
                  f"{m['generated_tokens'] / seconds:7.1f} tokens/s  ({m['num_truncated']}/{n} truncated)", flush=True)
    hf, server = statistics.median(times["hf"]), statistics.median(times["server"])
    print(f"\nmedian over {args.rounds} rounds, {args.prompts} prompts x K={args.K}, max_new_tokens "
          f"{args.max_new_tokens}: hf {n / hf:.2f} samples/s, server {n / server:.2f} samples/s; "
          f"server / hf = {hf / server:.2f}x")


# --------------------------------------------------------------------------------------
# Fidelity figures
# --------------------------------------------------------------------------------------
def fidelity_row(name: str, server_url: str, model_dir: Path, prompts: Path, out: Path, args) -> None:
    from vrpo.provenance import read_manifest
    from vrpo.sampling_server import ServerEngine, mismatch_reasons

    engine = ServerEngine(server_url, args.served_model, concurrency=args.concurrency, allow_reference_mismatch=True)
    timed_sample(model_dir, prompts, out, args, engine)
    f = read_manifest(out)["server_fidelity"]
    verdict = "refused" if mismatch_reasons(f) else "accepted"
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"| {name} | {f['compared_tokens']} | {fmt(f['mean_abs_logprob_diff'], '.4f')} | "
          f"{fmt(f['max_abs_logprob_diff'], '.3f')} | {fmt(f['kl_server_to_reference_per_sample'], '.3f')} | "
          f"{fmt(f['tv_per_sample'], '.3f')} | {fmt(f['chi2_per_sample'], '.3f')} | "
          f"{fmt(f['excess_loglik'], '+.3f')} | {fmt(f['excess_loglik_z'], '+.1f')} | "
          f"{f['roundtrip_differs_share']:.2f} | {f['truncated_share']:.2f} | {verdict} |", flush=True)


def fidelity_table(server_url: str, model_dir: Path, args, work: Path) -> None:
    from vrpo.testing_server import RewritingProxy, perturbed_copy

    prompts = write_prompts(work / "prompts.jsonl", args.prompts)
    print("| server vs local reference | compared tokens | mean abs diff | max abs diff | KL/sample | TV/sample "
          "| chi2/sample | excess e | z | round-trip differs | truncated | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fidelity_row("Q4_1 GGUF vs its dequantised copy (honest)", server_url, model_dir, prompts, work / "honest", args)
    gateways = {"gateway forces temperature 0.7": {"temperature": 0.7},
                "llama.cpp defaults (top-k 40, min-p 0.05, repeat 1.1)":
                    {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}}
    for name, overrides in gateways.items():
        with RewritingProxy(server_url, overrides) as proxy:
            fidelity_row(name, proxy.base_url, model_dir, prompts, work / name.split()[0], args)
    for noise in (0.02, 0.05, 0.1):
        other = perturbed_copy(model_dir, work / f"noise-{noise}", noise)
        fidelity_row(f"other checkpoint: weights + {noise:.0%} noise", server_url, other, prompts,
                     work / f"other-{noise}", args)


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------
@contextmanager
def llama_cpp(args, work: Path):
    from vrpo.experiments.scheduling.model import gguf_path
    from vrpo.testing_server import LlamaCppServer, llama_cpp_server_available

    if not llama_cpp_server_available():
        sys.exit("llama-cpp-python[server] is not installed: pip install 'vrpo[serve]'")
    with LlamaCppServer(gguf_path(), alias=args.served_model, n_threads=args.threads, log=work / "server.log") as s:
        yield s.base_url


def vllm_command(model_dir: Path, args, port: int) -> list[str]:
    # --generation-config vllm: ignore the model's generation_config.json defaults (the request sets every knob)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", args.served_model, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", args.vllm_dtype, "--generation-config", "vllm", "--max-logprobs", "1"]


@contextmanager
def vllm(model_dir: Path, args, work: Path):
    from vrpo.testing_server import free_port

    port = free_port()
    cmd = vllm_command(model_dir, args, port)
    with open(work / "vllm.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"vllm exited ({proc.returncode}); see {work / 'vllm.log'}")
            try:
                urllib.request.urlopen(url + "/models", timeout=5).read()
                break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("-K", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8, help="hf engine: prompts per generate call")
    p.add_argument("--concurrency", type=int, default=4, help="server engine: requests in flight")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads (it spins them: on a shared 2-core machine 1 is faster than 2)")
    p.add_argument("--served-model", default="ref")
    p.add_argument("--fidelity", action="store_true", help="print the fidelity table instead of the speed comparison")
    p.add_argument("--vllm", action="store_true", help="GPU: vLLM instead of llama.cpp (not measured here)")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM --dtype (float32 matches the local model)")
    p.add_argument("--dry-run", action="store_true", help="with --vllm: print the server command and stop")
    p.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M-Instruct, converted)")
    p.add_argument("--work", default=None, help="folder for samples and logs (default: a temporary one)")
    args = p.parse_args(argv)

    from vrpo.experiments.scheduling.model import smollm2_path

    model_dir = Path(args.model) if args.model else smollm2_path()
    work = Path(args.work or tempfile.mkdtemp(prefix="vrpo-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.vllm and args.dry_run:
        print(" ".join(vllm_command(model_dir, args, 8000)))
        return
    import torch

    print(f"model {model_dir}; torch threads {torch.get_num_threads()}; cuda {torch.cuda.is_available()}; "
          f"work {work}", flush=True)
    server = vllm(model_dir, args, work) if args.vllm else llama_cpp(args, work)
    with server as url:
        (fidelity_table if args.fidelity else compare_speed)(url, model_dir, args, work)


if __name__ == "__main__":
    main()
