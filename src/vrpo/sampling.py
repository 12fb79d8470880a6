"""Reference samples: K fresh responses per prompt from pi_ref, with their exact log-probs.

VRPO's control variate needs y~_1..y~_K ~ pi_ref(.|x) (temperature 1, no top-k/top-p:
anything else samples another policy) and log pi_ref(y~|x) for the implicit rewards. This
module draws them with batched, KV-cached ``model.generate`` and scores every sample with
one more forward pass at temperature 1 on the token sequence the trainer will see
(``vrpo.data.tokenize_completions`` of the decoded text), so stored and training log-probs
agree exactly.

Output (docs/architecture.md): ``OUT/samples.parquet`` (prompt_id, prompt, samples [K],
ref_logps [K], truncated [K]) and ``OUT/manifest.json``. Prompts are processed in shards of
``shard_size``; each finished shard is written atomically to ``OUT/shards/``, so a killed run
resumes where it stopped. Shard s is drawn with seed (seed, s) whatever process draws it:
under ``accelerate launch`` the shards are split across processes and the merged table
equals the one-process table.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from vrpo.provenance import atomic_write_bytes

SAMPLES_FILE = "samples.parquet"
SHARD_DIR = "shards"


# --------------------------------------------------------------------------------------
# Exact sequence log-probs under a model (shared with training's reference cache)
# --------------------------------------------------------------------------------------
def sequence_logps_under(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                         pad_token_id: int, batch_size: int = 8) -> list[float]:
    """log pi(y|x) summed over completion tokens, at temperature 1, one value per sequence."""
    import torch

    from vrpo.data import sequence_batch
    from vrpo.losses import sequence_logps

    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            batch = sequence_batch(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size],
                                   pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.extend(sequence_logps(logits.float(), batch["input_ids"], batch["completion_mask"]).tolist())
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------
# Loading models safely
# --------------------------------------------------------------------------------------
def load_model_and_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "--model", dtype=None):
    """A causal LM and its tokenizer from a local folder (safetensors; no remote code unless asked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir() or not (p / "config.json").exists():
        raise ValueError(f"{what} {path}: not a local model folder with config.json (nothing is downloaded)")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, what=what)
    kwargs = {"trust_remote_code": trust_remote_code}
    if list(p.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    return model, tokenizer


def load_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "--model"):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"{what} {path}: not a local model folder (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # causal LMs often have none; EOS pads (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def generation_settings(num_samples: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> dict:
    """The settings recorded in the manifest, and whether they sample pi_ref itself."""
    reasons = []
    if temperature != 1.0:
        reasons.append(f"temperature {temperature}")
    if top_p < 1.0:
        reasons.append(f"top_p {top_p}")
    if top_k:
        reasons.append(f"top_k {top_k}")
    return {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "from_reference_policy": not reasons,
            "not_reference_reason": ", ".join(reasons) or None}


def _generate(model, tokenizer, prompt_ids: list[list[int]], settings: dict, seed: int) -> list[list[str]]:
    """K decoded samples for each prompt (left-padded batch, KV cache)."""
    import torch
    from transformers import GenerationConfig

    K = settings["num_samples"]
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    # each prompt repeated K times (rather than num_return_sequences, which greedy decoding refuses)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids]).repeat_interleave(K, 0)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]).repeat_interleave(K, 0)
    greedy = settings["temperature"] == 0
    # every knob explicit: model defaults (top_k=50, repetition penalty) would sample another policy
    gen = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else settings["temperature"],
        top_p=None if greedy else settings["top_p"], top_k=None if greedy else settings["top_k"],
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        max_new_tokens=settings["max_new_tokens"], num_return_sequences=1, use_cache=True,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    completions = out[:, width:].tolist()
    texts, truncated = [], []
    for seq in completions:
        stop = seq.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in seq else len(seq)
        truncated.append(stop == len(seq))  # hit max_new_tokens without EOS
        texts.append(tokenizer.decode(seq[:stop], skip_special_tokens=True))
    return ([texts[i * K:(i + 1) * K] for i in range(len(prompt_ids))],
            [truncated[i * K:(i + 1) * K] for i in range(len(prompt_ids))])


def sample_shard(model, tokenizer, items: list[dict], settings: dict, seed: int, batch_size: int,
                 token_settings: dict) -> list[dict]:
    """Rows of one shard: K samples per prompt and their exact ref log-probs."""
    from vrpo.data import tokenize_completions

    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompt_ids = [tokenize_completions(tokenizer, it["prompt"], [], where=f"prompt_id {it['prompt_id']}",
                                           add_eos=False, **token_settings)[0] for it in chunk]
        samples, truncated = _generate(model, tokenizer, prompt_ids, settings, seed * 1_000_003 + start)
        for it, texts, trunc in zip(chunk, samples, truncated):
            p_ids, c_ids = tokenize_completions(tokenizer, it["prompt"], texts, where=f"prompt_id {it['prompt_id']}",
                                                **token_settings)
            logps = sequence_logps_under(model, [p_ids] * len(c_ids), c_ids, tokenizer.pad_token_id, len(c_ids))
            rows.append({"prompt_id": it["prompt_id"], "prompt": it["prompt"], "samples": texts,
                         "ref_logps": logps, "truncated": trunc})
    return rows


def write_parquet(path: Path, rows: list[dict]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    atomic_write_bytes(path, buf.getvalue())


def read_samples(folder: str | Path) -> list[dict]:
    """Rows of ``FOLDER/samples.parquet`` (written by ``vrpo sample``)."""
    import pyarrow.parquet as pq

    path = Path(folder) / SAMPLES_FILE
    if not path.exists():
        raise ValueError(f"--samples {folder}: no {SAMPLES_FILE}; expected a folder written by `vrpo sample`")
    return pq.read_table(path).to_pylist()


def sample_references(model_path: str, prompts_path: str, out: str, *, num_samples: int = 4, max_new_tokens: int = 64,
                      batch_size: int = 8, seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      max_prompt_length: int = 256, prompt_truncation: str = "error", shard_size: int = 64,
                      max_prompts: int | None = None, trust_remote_code: bool = False, engine=None) -> Path:
    """Draw ``num_samples`` reference samples per prompt into ``out`` (resumable); return the table's path.
    ``engine``: None draws with ``model.generate``; a ``vrpo.sampling_server.ServerEngine`` draws
    from a server (the local model still scores every sample)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from vrpo.data import load_prompts
    from vrpo.provenance import fingerprint_data, fingerprint_model, fingerprint_tokenizer, read_manifest, write_manifest

    if num_samples < 2:
        raise ValueError(f"--num-samples {num_samples}: VRPO needs at least 2 reference samples per prompt")
    import torch

    if engine is not None:
        engine.connect()  # an unreachable server is an error before the model loads
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes (gloo) when there is no GPU
    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code=trust_remote_code)
    model.to(state.device)
    items = load_prompts(prompts_path, tokenizer, max_rows=max_prompts)
    settings = generation_settings(num_samples, max_new_tokens, temperature, top_p, top_k)
    token_settings = {"max_length": max_prompt_length + max_new_tokens + 1, "max_prompt_length": max_prompt_length,
                      "prompt_truncation": prompt_truncation}
    manifest = {"kind": "reference_samples", "model": str(model_path), "model_fingerprint": fingerprint_model(model_path),
                "tokenizer_fingerprint": fingerprint_tokenizer(model_path), "prompts": str(prompts_path),
                "prompts_fingerprint": fingerprint_data(prompts_path), "num_prompts": len(items), "seed": seed,
                "shard_size": shard_size, "tokenization": token_settings, "log_prob_temperature": 1.0, **settings,
                **(engine.manifest_fields() if engine is not None else {"engine": "hf"})}
    out_dir = Path(out)
    _check_resume(out_dir, manifest, read_manifest)
    if state.is_main_process:
        write_manifest(out_dir, dict(manifest, complete=False))
    state.wait_for_everyone()

    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    mine = [s for s in range(len(shards)) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if not (out_dir / SHARD_DIR / f"shard-{s:05d}.parquet").exists()]
    bar = tqdm(total=sum(len(shards[s]) for s in mine), initial=sum(len(shards[s]) for s in mine if s not in todo),
               desc=f"sampling K={num_samples}", unit="prompt", disable=not state.is_local_main_process)
    for s in todo:
        path = out_dir / SHARD_DIR / f"shard-{s:05d}.parquet"
        if engine is None:
            rows = sample_shard(model, tokenizer, shards[s], settings, seed * 100_003 + s, batch_size, token_settings)
        else:
            rows = engine.sample_shard(model, tokenizer, shards[s], settings, seed * 100_003 + s, batch_size,
                                       token_settings, path)
        write_parquet(path, rows)
        if engine is not None:
            engine.check(path.parent, settings)  # refuse as soon as the server evidently samples another policy
        bar.update(len(shards[s]))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        if engine is not None:
            manifest.update(engine.summary(out_dir / SHARD_DIR, settings))
        _merge_shards(out_dir, len(shards))
        manifest["num_truncated"] = sum(sum(r["truncated"]) for r in read_samples(out_dir))
        write_manifest(out_dir, dict(manifest, complete=True))
    state.wait_for_everyone()
    return out_dir / SAMPLES_FILE


def _check_resume(out_dir: Path, manifest: dict, read_manifest) -> None:
    """A folder holding samples of other settings is never mixed into."""
    if not (out_dir / "manifest.json").exists():
        return
    old = read_manifest(out_dir)
    old.setdefault("engine", "hf")  # folders written before engines were recorded
    keys = ("engine", "model_fingerprint", "tokenizer_fingerprint", "prompts_fingerprint", "seed", "shard_size", "num_samples",
            "max_new_tokens", "temperature", "top_p", "top_k", "tokenization")
    diff = [k for k in keys if old.get(k) != manifest.get(k)]
    if diff:
        raise ValueError(f"--out {out_dir}: holds samples drawn with other settings ({', '.join(diff)}); "
                         "use a new --out folder")


def _merge_shards(out_dir: Path, num_shards: int) -> None:
    import pyarrow.parquet as pq

    rows = []
    for s in range(num_shards):
        rows.extend(pq.read_table(out_dir / SHARD_DIR / f"shard-{s:05d}.parquet").to_pylist())
    write_parquet(out_dir / SAMPLES_FILE, rows)


# --------------------------------------------------------------------------------------
# `vrpo sample`
# --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="reference model pi_ref (a save_pretrained folder)")
    p.add_argument("--prompts", required=True, help="prompts: a file with a `prompt` column (a preference file works)")
    p.add_argument("--num-samples", "-K", type=int, default=4, help="K responses per prompt (>= 2; default 4)")
    p.add_argument("--out", required=True, help="output folder (samples.parquet + manifest.json); resumable")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (each gives K sequences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="!= 1 is flagged: not samples of pi_ref")
    p.add_argument("--top-p", type=float, default=1.0, help="< 1 is flagged: not samples of pi_ref")
    p.add_argument("--top-k", type=int, default=0, help="> 0 is flagged: not samples of pi_ref")
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--prompt-truncation", choices=["error", "left"], default="error",
                   help="a prompt longer than --max-prompt-length: error (default) or keep its last tokens")
    p.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N distinct prompts")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code (off by default)")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT

    g = p.add_argument_group("engine (docs/sampling_engines.md)")
    g.add_argument("--engine", choices=["hf", "openai"], default="hf",
                   help="hf: model.generate on --model (default); openai: an OpenAI-compatible server (vLLM, SGLang, "
                        "TGI, llama.cpp) serving the same model; --model still scores every sample exactly")
    g.add_argument("--base-url", default=None, help="with --engine openai: the server, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--served-model", default=None, help="with --engine openai: the model name the server serves")
    g.add_argument("--concurrency", type=POSITIVE_INT, default=8, help="with --engine openai: requests in flight")
    g.add_argument("--allow-reference-mismatch", action="store_true",
                   help="with --engine openai: sample even when the fidelity check says the server runs another "
                        "policy (recorded: the samples are marked not from pi_ref)")


def run(args: argparse.Namespace) -> int:
    from vrpo.sampling_server import make_engine

    engine = make_engine(args)
    path = sample_references(
        args.model, args.prompts, args.out, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation,
        shard_size=args.shard_size, max_prompts=args.max_prompts, trust_remote_code=args.trust_remote_code,
        engine=engine)
    import os

    from vrpo.provenance import read_manifest

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = read_manifest(Path(args.out))
    flag = "" if m["from_reference_policy"] else f"  WARNING: not samples of pi_ref ({m['not_reference_reason']})"
    print(f"wrote {path} ({m['num_prompts']} prompts x K={m['num_samples']}, {m['num_truncated']} truncated){flag}")
    return 0
