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
LOG_PROB_DTYPE = "float32"  # reference log-probs (sampling's re-scoring, training's reference pass)
SHARD_DIR = "shards"


# --------------------------------------------------------------------------------------
# Exact sequence log-probs under a model (shared with training's reference cache)
# --------------------------------------------------------------------------------------
def sequence_logps_under(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                         pad_token_id: int, batch_size: int = 8, share_rows: Sequence | None = None, *,
                         token_statistics: bool = False) -> list:
    """log pi(y|x) summed over completion tokens, at temperature 1, one value per sequence, at
    most ``batch_size`` sequences per forward pass, in the model's dtype (float32 as loaded by
    ``load_model_and_tokenizer``); the LM head runs chunk by chunk (``vrpo.sequences``).
    ``share_rows``: a key per sequence; sequences with the same key share one row (their
    prompt computed once: the shared-prompt layout). ``token_statistics``: per sequence, the
    tuple of ``vrpo.sequences.sequence_logps_with_token_statistics`` (the same value first, then
    per-token log-probs, entropies and variances: the server engine's fidelity check)."""
    from vrpo.sequences import logps_of_rows

    items = [(s, p, c) for s, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
    if share_rows is None:
        rows = [[item] for item in items]
    else:
        grouped: dict = {}
        for key, item in zip(share_rows, items):
            grouped.setdefault(key, []).append(item)
        rows = list(grouped.values())
    return logps_of_rows(model, rows, pad_token_id, batch_size, token_statistics=token_statistics)


# --------------------------------------------------------------------------------------
# Loading models safely
# --------------------------------------------------------------------------------------
def load_model_and_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "--model", dtype=None):
    """A causal LM and its tokenizer from a local folder (safetensors only; no remote code unless asked).

    ``dtype``: of the weights, float32 unless given, whatever the checkpoint's (most ship in
    bfloat16): training needs float32 master weights (``--bf16`` autocasts over them), and
    reference log-probs are computed in float32 (``LOG_PROB_DTYPE``, stated in manifests)."""
    from transformers import AutoModelForCausalLM

    p = check_model_folder(path, what)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, what=what)
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    import torch

    kwargs["dtype"] = torch.float32 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    return model, tokenizer


def check_model_folder(path: str | Path, what: str = "--model") -> Path:
    """A local model folder with config.json and safetensors weights, or a one-line error.

    Pickle-based ``*.bin`` weights are refused: unpickling a file can run any code, and a
    model folder is something a user downloads. ``save_pretrained(safe_serialization=True)``
    converts a model that has only them."""
    from vrpo.errors import UserError

    p = Path(path)
    if not p.is_dir() or not (p / "config.json").exists():
        raise UserError(f"{what} {path}: not a local model folder with config.json (nothing is downloaded)")
    if not list(p.glob("*.safetensors")):
        pickled = " (it has pickle-based *.bin weights, which vrpo does not load: unpickling can run code)" \
            if list(p.glob("*.bin")) else ""
        raise UserError(f"{what} {path}: no *.safetensors weights{pickled}; save the model with "
                        "save_pretrained(safe_serialization=True)")
    return p


def context_length(model_path: str | Path, *, trust_remote_code: bool = False) -> int | None:
    """The most positions the model's config allows (``max_position_embeddings`` / ``n_positions``
    / ``n_ctx``), or None when the config states none. A longer sequence fails inside the
    embedding (GPT-2) or runs where the model was never trained (rotary models)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_context(length: int, context: int | None, where: str, hint: str) -> None:
    """A one-line error when a sequence of ``length`` tokens does not fit the model's context."""
    from vrpo.errors import UserError

    if context is not None and length > context:
        raise UserError(f"{where}: {length} tokens exceed the model's context of {context} positions; {hint}")


def load_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "--model"):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"{what} {path}: not a local model folder (nothing is downloaded)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:  # no or damaged tokenizer files
        raise ValueError(f"{what} {path}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
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

    from vrpo.data import completion_text

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
    texts = [completion_text(tokenizer, seq) for seq in completions]
    truncated = [tokenizer.eos_token_id not in seq for seq in completions]  # hit max_new_tokens without EOS
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
            # a sample cut at max_new_tokens never drew EOS: it is scored (and trained) without one
            p_ids, c_ids = tokenize_completions(tokenizer, it["prompt"], texts, where=f"prompt_id {it['prompt_id']}",
                                                add_eos=[not t for t in trunc], **token_settings)
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


def read_samples(folder: str | Path, flag: str = "--samples") -> list[dict]:
    """Rows of ``FOLDER/samples.parquet`` (written by ``vrpo sample``), after checking the
    table against the sha256 its manifest recorded (:func:`samples_fingerprint`)."""
    import pyarrow.parquet as pq

    path = Path(folder) / SAMPLES_FILE
    samples_fingerprint(folder, flag)
    return pq.read_table(path).to_pylist()


def samples_fingerprint(folder: str | Path, flag: str = "--samples") -> str:
    """The sha256 of ``samples.parquet`` that ``vrpo sample`` recorded in its manifest, once the
    table is checked against it: a row edited after sampling (a log-prob, a sample's text)
    would otherwise train silently with a wrong reference term."""
    from vrpo.errors import UserError
    from vrpo.provenance import file_sha256, read_manifest

    path = Path(folder) / SAMPLES_FILE
    for name in (SAMPLES_FILE, "manifest.json"):
        if not (Path(folder) / name).exists():
            raise UserError(f"{flag} {folder}: no {name}; expected a folder written by `vrpo sample`")
    recorded = read_manifest(folder).get("table_sha256")
    if not recorded:
        raise UserError(f"{flag} {folder}: its manifest.json records no table_sha256 (written by hand or by an older "
                        f"vrpo); rerun `vrpo sample`, or, for a table you made yourself, add \"table_sha256\": the "
                        f"sha256sum of {SAMPLES_FILE}")
    actual = file_sha256(path)
    if actual != recorded:
        raise UserError(f"{flag} {folder}: {SAMPLES_FILE} has sha256 {actual[:12]}, its manifest recorded "
                        f"{recorded[:12]} when the samples were drawn (edited or damaged since); sample again")
    return recorded


def sample_inputs(model_path: str, prompts_path: str, settings: dict, token_settings: dict, *, seed: int,
                  shard_size: int, batch_size: int, max_prompts: int | None) -> dict:
    """Everything that determines the samples table (the reuse record of ``--out``): the model,
    tokenizer and prompts by fingerprint, and every setting. ``batch_size`` and ``shard_size``
    are in it: they set the seed of each generate call."""
    from vrpo.errors import check_readable
    from vrpo.provenance import fingerprint_data, fingerprint_model, fingerprint_tokenizer

    prompts = fingerprint_data(check_readable(prompts_path, "--prompts", "a prompts or preference file"))
    return {"model": fingerprint_model(model_path), "tokenizer": fingerprint_tokenizer(model_path), "prompts": prompts, "max_prompts": max_prompts, **settings, "seed": seed,
            "batch_size": batch_size, "shard_size": shard_size, "tokenization": token_settings}


def sample_references(model_path: str, prompts_path: str, out: str, *, num_samples: int = 4, max_new_tokens: int = 64,
                      batch_size: int = 8, seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      max_prompt_length: int = 256, prompt_truncation: str = "error", shard_size: int = 64,
                      max_prompts: int | None = None, trust_remote_code: bool = False,
                      overwrite: bool = False, engine=None, progress: bool = True) -> Path:
    """Draw ``num_samples`` reference samples per prompt into ``out`` (resumed when ``out`` was
    made from the same inputs, refused when from others unless ``overwrite``); return the table's path.
    ``engine``: None draws with ``model.generate``; a ``vrpo.sampling_server.ServerEngine`` draws
    from a server (the local model still scores every sample). ``progress``: show the bar (it
    changes nothing drawn, so it is not part of the folder's reuse record)."""
    import contextlib

    import torch
    from accelerate import PartialState

    from vrpo.outputs import claim_output, folder_lock

    check_sampling_arguments(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                             temperature=temperature, top_p=top_p, top_k=top_k, max_prompt_length=max_prompt_length,
                             shard_size=shard_size, max_prompts=max_prompts)
    check_model_folder(model_path)
    settings = generation_settings(num_samples, max_new_tokens, temperature, top_p, top_k)
    token_settings = {"max_length": max_prompt_length + max_new_tokens + 1, "max_prompt_length": max_prompt_length,
                      "prompt_truncation": prompt_truncation}
    if engine is not None:
        engine.connect()  # an unreachable server is an error before the model is hashed or loaded
    inputs = sample_inputs(model_path, prompts_path, settings, token_settings, seed=seed, shard_size=shard_size,
                           batch_size=batch_size, max_prompts=max_prompts)
    if engine is not None:
        inputs["engine"] = engine.name  # a folder drawn by one engine is not resumed by the other
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes (gloo) when there is no GPU
    out_dir = Path(out)
    # one writer per folder: a second `vrpo sample` into it is refused while this one runs
    with folder_lock(out_dir, "sample") if state.is_main_process else contextlib.nullcontext():
        claim_output(out_dir, "sample", inputs, overwrite=overwrite, main_process=state.is_main_process)
        return _sample_into(out_dir, state, model_path, prompts_path, settings, token_settings, seed=seed,
                            batch_size=batch_size, shard_size=shard_size, max_prompts=max_prompts,
                            trust_remote_code=trust_remote_code, fingerprints=inputs, engine=engine,
                            progress=progress)


def check_sampling_arguments(**values) -> None:
    """The flags' checks (``vrpo.cli_args`` kinds) for values that come from the Python API."""
    from vrpo.cli_args import (NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_INT, PROBABILITY, SEED,
                               int_at_least)

    kinds = {"num_samples": int_at_least(2), "max_new_tokens": POSITIVE_INT, "batch_size": POSITIVE_INT,
             "seed": SEED, "temperature": NONNEGATIVE_FLOAT, "top_p": PROBABILITY, "top_k": NONNEGATIVE_INT,
             "max_prompt_length": POSITIVE_INT, "shard_size": POSITIVE_INT, "max_prompts": POSITIVE_INT}
    for name, value in values.items():
        kinds[name].check(value, "--" + name.replace("_", "-"), allow_none=name == "max_prompts")
    if values.get("top_p") == 0:
        from vrpo.errors import UserError

        raise UserError("--top-p 0: keeps no token; expected a probability in (0, 1]")


def _sample_into(out_dir: Path, state, model_path: str, prompts_path: str, settings: dict, token_settings: dict, *,
                 seed: int, batch_size: int, shard_size: int, max_prompts: int | None, trust_remote_code: bool,
                 fingerprints: dict, engine=None, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    from vrpo.data import load_prompts
    from vrpo.provenance import file_sha256, write_manifest

    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code=trust_remote_code)
    model.to(state.device)
    items = load_prompts(prompts_path, tokenizer, max_rows=max_prompts)
    check_prompts_fit(items, tokenizer, token_settings, settings["max_new_tokens"],
                      context_length(model_path, trust_remote_code=trust_remote_code))
    manifest = {"kind": "reference_samples", "model": str(model_path), "model_fingerprint": fingerprints["model"],
                "tokenizer_fingerprint": fingerprints["tokenizer"], "prompts": str(prompts_path),
                "prompts_fingerprint": fingerprints["prompts"], "num_prompts": len(items), "seed": seed,
                "shard_size": shard_size, "tokenization": token_settings, "log_prob_temperature": 1.0,
                "log_prob_dtype": LOG_PROB_DTYPE, **settings,
                **(engine.manifest_fields() if engine is not None else {"engine": "hf"})}
    if state.is_main_process:
        write_manifest(out_dir, dict(manifest, complete=False))
    state.wait_for_everyone()

    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    mine = [s for s in range(len(shards)) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if not (out_dir / SHARD_DIR / f"shard-{s:05d}.parquet").exists()]
    bar = tqdm(total=sum(len(shards[s]) for s in mine), initial=sum(len(shards[s]) for s in mine if s not in todo),
               desc=f"sampling K={settings['num_samples']}", unit="prompt", disable=not (progress and state.is_local_main_process))
    with bar:  # closed (its line ended) before any error is printed
        for s in todo:
            path = out_dir / SHARD_DIR / f"shard-{s:05d}.parquet"
            if engine is None:
                rows = sample_shard(model, tokenizer, shards[s], settings, seed * 100_003 + s, batch_size,
                                    token_settings)
            else:
                rows = engine.sample_shard(model, tokenizer, shards[s], settings, seed * 100_003 + s, batch_size,
                                           token_settings, path)
            write_parquet(path, rows)
            if engine is not None:
                engine.check(path.parent, settings)  # refuse as soon as the server evidently samples another policy
            bar.update(len(shards[s]))
    state.wait_for_everyone()
    if state.is_main_process:
        if engine is not None:
            manifest.update(engine.summary(out_dir / SHARD_DIR, settings))
        rows = _merge_shards(out_dir, len(shards))
        manifest["num_truncated"] = sum(sum(r["truncated"]) for r in rows)
        manifest["table_sha256"] = file_sha256(out_dir / SAMPLES_FILE)  # checked by every reader
        write_manifest(out_dir, dict(manifest, complete=True))
    state.wait_for_everyone()
    return out_dir / SAMPLES_FILE


def check_prompts_fit(items: list[dict], tokenizer, token_settings: dict, max_new_tokens: int,
                      context: int | None) -> None:
    """Before anything is drawn: every prompt fits --max-prompt-length (or is cut, under
    --prompt-truncation left) and, with --max-new-tokens more, the model's context."""
    from vrpo.data import tokenize_completions

    for it in items:
        where = f"prompt_id {it['prompt_id']}"
        prompt_ids = tokenize_completions(tokenizer, it["prompt"], [], where=where, add_eos=False, **token_settings)[0]
        check_fits_context(len(prompt_ids) + max_new_tokens, context, f"{where}: prompt + --max-new-tokens",
                           "lower --max-new-tokens, or --max-prompt-length with --prompt-truncation left")


def _merge_shards(out_dir: Path, num_shards: int) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for s in range(num_shards):
        rows.extend(pq.read_table(out_dir / SHARD_DIR / f"shard-{s:05d}.parquet").to_pylist())
    write_parquet(out_dir / SAMPLES_FILE, rows)
    return rows


# --------------------------------------------------------------------------------------
# `vrpo sample`
# --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import (NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_INT, PROBABILITY, SEED,
                               add_overwrite_flag, int_at_least)

    p.add_argument("--model", required=True, help="reference model pi_ref (a save_pretrained folder, safetensors)")
    p.add_argument("--prompts", required=True, help="prompts: a file with a `prompt` column (a preference file works)")
    p.add_argument("--num-samples", "-K", type=int_at_least(2), default=4, help="K responses per prompt (>= 2)")
    p.add_argument("--out", required=True, help="output folder (samples.parquet + manifest.json); rerun the same "
                   "command to resume")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64,
                   help="longest sample in tokens; a sample that reaches it without EOS is kept as drawn, without EOS")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="prompts per generate call (each gives K sequences)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the draws (shard s of the run is drawn with (seed, s))")
    p.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=1.0,
                   help="!= 1 is flagged in the manifest: not samples of pi_ref")
    p.add_argument("--top-p", type=PROBABILITY, default=1.0, help="< 1 is flagged in the manifest: not samples of pi_ref")
    p.add_argument("--top-k", type=NONNEGATIVE_INT, default=0,
                   help="> 0 is flagged in the manifest: not samples of pi_ref (0: off)")
    p.add_argument("--max-prompt-length", type=POSITIVE_INT, default=256, help="longest prompt in tokens")
    p.add_argument("--prompt-truncation", choices=["error", "left"], default="error",
                   help="a prompt longer than --max-prompt-length: error, or left (keep its last tokens)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=64, help="prompts per resumable shard")
    p.add_argument("--max-prompts", type=POSITIVE_INT, default=None,
                   help="use only the first N distinct prompts (default: all)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code (off by default)")
    add_overwrite_flag(p)
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
        overwrite=args.overwrite, engine=engine)
    import os

    from vrpo.provenance import read_manifest

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = read_manifest(Path(args.out))
    flag = "" if m["from_reference_policy"] else f"  WARNING: not samples of pi_ref ({m['not_reference_reason']})"
    print(f"wrote {path} ({m['num_prompts']} prompts x K={m['num_samples']}){flag}")
    print(truncation_summary(m["num_truncated"], m["num_prompts"] * m["num_samples"], m["max_new_tokens"]))
    return 0


def truncation_summary(truncated: int, total: int, max_new_tokens: int) -> str:
    """What the truncated count means, in one line."""
    if not truncated:
        return f"0 of {total} samples hit --max-new-tokens {max_new_tokens}: every sample ended with EOS"
    return (f"{truncated} of {total} samples hit --max-new-tokens {max_new_tokens} without EOS; kept as drawn, without "
            "EOS (their log-probs are of the truncated text; raise --max-new-tokens for complete responses)")
