"""Reference samples drawn by an OpenAI-compatible server, re-scored exactly by the local model.

``vrpo sample --engine openai --base-url URL --served-model NAME`` draws the K samples per
prompt from the ``/v1/completions`` endpoint that vLLM, SGLang, TGI and llama.cpp's servers
expose. The server only proposes text. Everything stored is computed here, as the hf engine
does: each completion text is re-tokenised with the training tokenisation
(``vrpo.data.tokenize_completions``) and its ``ref_logps`` recomputed by the local reference
model, so the table obeys the same contract whichever engine drew it.

Requests. Prompts are sent as text (rendered locally with the reference model's chat
template): llama.cpp's Python server accepts only text prompts, and the fidelity check below
measures what a different prompt tokenisation on the server would change. One request per
sample (``n = 1``, a seed per request; llama.cpp ignores ``n``), ``concurrency`` requests in
flight, retries with exponential backoff on connection errors, timeouts, HTTP 429 and 5xx.
Every sampling knob is sent explicitly (temperature 1, top-p 1, and, in each server's own
dialect, top-k off, min-p 0, no repetition penalty): servers have defaults of their own
(llama.cpp: top-k 40, min-p 0.05, repeat penalty 1.1; vLLM: the model's generation_config).

Fidelity. A server may run another policy than the local pi_ref: another checkpoint, a
quantisation far from the local weights, or a sampling knob it applies silently. Two
figures are computed from the same forward pass that gives ``ref_logps``:

- the per-token difference between the server's log-probs (``logprobs`` in the request) and
  the local model's, on the same tokens (samples whose token sequence the local
  re-tokenisation reproduces); its signed mean per sample estimates KL(q_server || pi_ref),
  since the samples come from the server;
- the calibration of the draws, e = mean over sampled tokens of [log pi_ref(y_t) + H_t], H_t
  the entropy of pi_ref at step t. For y_t ~ pi_ref, E[log pi_ref(y_t) | past] = -H_t, so e
  has mean 0 and the sum is a martingale with variance sum_t Var_t[log pi_ref]: a z-score.
  A temperature < 1, top-k, top-p or min-p make e > 0; another model usually makes e < 0.
  Servers report raw log-probs (before temperature and truncation), so only e sees a knob.

Each shard's sufficient statistics go to ``shards/shard-NNNNN.fidelity.json`` (written before
the shard's parquet, so a resumed run has them for every finished shard); the manifest gets
the totals (``server_fidelity``). When the server evidently samples another policy (limits in
``FIDELITY_LIMITS``, docs/sampling_engines.md) sampling stops with one line, keeping finished
shards; ``--allow-reference-mismatch`` samples anyway and marks the samples
``from_reference_policy: false`` with the reason, which ``vrpo train`` refuses or records.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vrpo.errors import UserError, one_line

TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)
FIDELITY_SUFFIX = ".fidelity.json"

# When the server evidently runs another policy. The measurements behind each number are in
# docs/sampling_engines.md (`python benchmarks/sampling_engines.py --fidelity` prints them):
FIDELITY_LIMITS = {
    "min_tokens": 100,                # fewer compared / calibration tokens than this: no verdict yet
    "mean_abs_logprob_diff": 0.15,    # nats/token; Q4_1 llama.cpp vs its float32 copy 0.076, weights +2% noise 0.24
    "excess_loglik": 0.05,            # |e| in nats/token (honest: about the per-token KL, 0.02; temperature 0.7: 0.97)
    "excess_z": 5.0,                  # ... and |z| above this: material and not chance
    "min_aligned_share": 0.5,         # fewer samples re-tokenise to the server's tokens: another tokenizer
}

# Sampling knobs that switch each server's own truncation and penalties off. Servers ignore
# fields they do not know, so each dialect sends only its own.
DIALECTS = {
    "vllm": lambda top_k: {"top_k": top_k or -1, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
                           "return_tokens_as_token_ids": True},
    "sglang": lambda top_k: {"top_k": top_k or -1, "min_p": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0},
    "llama.cpp": lambda top_k: {"top_k": top_k, "min_p": 0.0, "repeat_penalty": 1.0, "typical_p": 1.0,
                                "tfs_z": 1.0, "mirostat_mode": 0, "mirostat": 0, "xtc_probability": 0.0,
                                "dry_multiplier": 0.0, "min_tokens": 0},
    "openai": lambda top_k: {"top_k": top_k} if top_k else {},
}
OWNERS = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama.cpp", "me": "llama.cpp"}  # /v1/models owned_by


# --------------------------------------------------------------------------------------
# HTTP with retries (stdlib only)
# --------------------------------------------------------------------------------------
class ServerUnreachable(Exception):
    """No answer after every retry (connection refused or reset, timeout), or only HTTP 408/429/5xx."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServerRefused(Exception):
    """A definite answer that is an error (HTTP 4xx other than 408/429)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code, self.message = code, message


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's own error text (OpenAI: {"error": {"message"}}; FastAPI: {"detail"})."""
    try:
        body = err.read().decode("utf-8", "replace")
    except OSError:
        return str(err.reason)
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return one_line(body, 200) or str(err.reason)
    inner = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(inner, dict):
        inner = inner.get("message") or inner.get("detail") or inner
    return one_line(json.dumps(inner) if not isinstance(inner, str) else inner, 200)


class ServerClient:
    """JSON over HTTP to ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``), retried with backoff."""

    def __init__(self, base_url: str, *, timeout: float = 600.0, retries: int = 6, backoff: float = 0.5,
                 api_key: str | None = None):
        self.base_url, self.timeout, self.retries, self.backoff = base_url.rstrip("/"), timeout, retries, backoff
        self.api_key = api_key

    def get(self, path: str, attempts: int | None = None) -> dict:
        return self._call(urllib.request.Request(self.base_url + path, headers=self._headers()), attempts)

    def post(self, path: str, body: dict, attempts: int | None = None) -> dict:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers=dict(self._headers(), **{"Content-Type": "application/json"}))
        return self._call(req, attempts)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _call(self, req: urllib.request.Request, attempts: int | None) -> dict:
        attempts = attempts or self.retries
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                # llama.cpp's Python server answers 500 to a request its schema rejects: not transient
                if e.code not in TRANSIENT_HTTP or "validation error" in message:
                    raise ServerRefused(e.code, message) from None
                reason, wait, status = f"HTTP {e.code}: {message}", _retry_after(e), e.code
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout) as e:
                reason, wait, status = one_line(getattr(e, "reason", None) or e or type(e).__name__, 200), None, None
            except json.JSONDecodeError:
                raise ServerRefused(200, "the answer is not JSON: not an OpenAI-compatible endpoint?") from None
            if attempt + 1 < attempts:
                time.sleep(min(30.0, wait if wait is not None else self.backoff * 2 ** attempt))
        raise ServerUnreachable(f"{reason} (after {attempts} tries)", status)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return float(err.headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# One completion from the server
# --------------------------------------------------------------------------------------
@dataclass
class Completion:
    text: str
    truncated: bool                  # stopped at max_tokens, not at the end of sequence
    tokens: list[str] | None         # the server's tokens ("token_id:N" from vLLM), None without logprobs
    token_logprobs: list[float] | None


def parse_completion(answer: dict) -> Completion:
    choice = answer["choices"][0]
    lp = choice.get("logprobs") or {}
    tokens, logps = lp.get("tokens"), lp.get("token_logprobs")
    if tokens is None or logps is None or len(tokens) != len(logps) or any(x is None for x in logps):
        tokens, logps = None, None
    return Completion(choice.get("text") or "", choice.get("finish_reason") == "length", tokens, logps)


def request_body(dialect: str, served_model: str, prompt: str, settings: dict, seed: int,
                 logprobs: bool = True) -> dict:
    """Every sampling knob explicit: pi_ref is temperature 1 with nothing cut or penalised."""
    body = {"model": served_model, "prompt": prompt, "max_tokens": settings["max_new_tokens"], "n": 1,
            "temperature": settings["temperature"], "top_p": settings["top_p"], "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "echo": False, "stream": False, "seed": seed}
    if logprobs:
        body["logprobs"] = 1
    body.update(DIALECTS[dialect](settings["top_k"]))
    return body


# --------------------------------------------------------------------------------------
# Local scoring: exact sequence log-probs and per-token statistics in one forward pass
# --------------------------------------------------------------------------------------
def score_with_token_stats(model, prompt_ids: list[int], completion_ids: list[list[int]], pad_token_id: int):
    """For the K completions of one prompt: log pi_ref(y|x) per completion (the call of the hf
    engine, ``vrpo.sampling.sequence_logps_under`` with batch size K, hence the same numbers),
    and per completion token its log-prob, the entropy H_t of pi_ref at that step and
    Var_t[log pi_ref], from the same forward pass."""
    from vrpo.sampling import sequence_logps_under

    scored = sequence_logps_under(model, [prompt_ids] * len(completion_ids), completion_ids, pad_token_id,
                                  len(completion_ids), token_statistics=True)
    return [s[0] for s in scored], [s[1:] for s in scored]


# --------------------------------------------------------------------------------------
# Fidelity statistics
# --------------------------------------------------------------------------------------
def _piece(tokenizer, token_id: int) -> str:
    # servers decode one token at a time, dropping the bytes of a split UTF-8 character
    return tokenizer.decode([token_id]).replace("\ufffd", "")


def aligned_length(completion: Completion, local_ids: list[int], tokenizer) -> int | None:
    """How many leading local tokens are the server's own tokens, or None when the local
    re-tokenisation of the text differs from the tokens the server sampled."""
    if completion.tokens is None:
        return None
    eos = tokenizer.eos_token_id
    body = local_ids[:-1] if not completion.truncated and local_ids and local_ids[-1] == eos else local_ids
    if all(t.startswith("token_id:") for t in completion.tokens):  # vLLM return_tokens_as_token_ids
        ids = [int(t.split(":", 1)[1]) for t in completion.tokens]
        return len(ids) if ids in (body, body + [eos]) and len(ids) <= len(local_ids) else None
    server = [t.replace("\ufffd", "") for t in completion.tokens]
    if len(server) == len(body) + 1 and server[-1] in ("", tokenizer.eos_token):
        server = server[:-1]  # a server that lists the end-of-sequence token it stopped on
    return len(body) if server == [_piece(tokenizer, t) for t in body] else None


def empty_stats() -> dict:
    return {"samples": 0, "truncated": 0, "without_logprobs": 0, "roundtrip_differs": 0, "compared_samples": 0,
            "compared_tokens": 0, "abs_diff_sum": 0.0, "abs_diff_max": 0.0, "diff_sum": 0.0, "sample_diff_sq_sum": 0.0,
            "weight_abs_dev_sum": 0.0, "weight_sq_dev_sum": 0.0,
            "calibration_tokens": 0, "calibration_sum": 0.0, "calibration_var": 0.0}


def add_sample(stats: dict, completion: Completion, local_ids: list[int], token_stats: tuple, tokenizer) -> None:
    """Add one sample's figures to ``stats`` (sufficient statistics, summed over shards)."""
    local_logp, entropy, variance = token_stats
    stats["samples"] += 1
    stats["truncated"] += completion.truncated
    # calibration over the tokens training will see, each one sampled: the body, and the
    # end-of-sequence token when the server stopped there (a truncated sample has none)
    stats["calibration_tokens"] += len(local_ids)
    stats["calibration_sum"] += sum(l + h for l, h in zip(local_logp, entropy))
    stats["calibration_var"] += sum(variance)
    if completion.tokens is None:
        stats["without_logprobs"] += 1
        return
    n = aligned_length(completion, local_ids, tokenizer)
    if n is None:
        stats["roundtrip_differs"] += 1
        return
    diffs = [s - l for s, l in zip(completion.token_logprobs[:n], local_logp[:n])]
    stats["compared_samples"] += 1
    stats["compared_tokens"] += len(diffs)
    stats["abs_diff_sum"] += sum(abs(d) for d in diffs)
    stats["abs_diff_max"] = max([stats["abs_diff_max"]] + [abs(d) for d in diffs])
    stats["diff_sum"] += sum(diffs)
    stats["sample_diff_sq_sum"] += sum(diffs) ** 2
    # importance weight w = pi_ref(y) / q(y) of the sample: E_q|1 - w| = 2 TV(q, pi_ref), E_q(1 - w)^2 = chi2
    w = math.exp(min(-sum(diffs), 50.0))
    stats["weight_abs_dev_sum"] += abs(1.0 - w)
    stats["weight_sq_dev_sum"] += (1.0 - w) ** 2


def merge_stats(parts: list[dict]) -> dict:
    total = empty_stats()
    for part in parts:
        for key, value in part.items():
            total[key] = max(total[key], value) if key == "abs_diff_max" else total[key] + value
    return total


def summarize(stats: dict) -> dict:
    """The fidelity figures recorded in the manifest."""
    n, tok, cal = max(stats["samples"], 1), stats["compared_tokens"], stats["calibration_tokens"]
    k = stats["compared_samples"]
    kl = stats["diff_sum"] / k if k else None
    kl_se = math.sqrt(max(stats["sample_diff_sq_sum"] / k - kl ** 2, 0.0) / k) if k > 1 else None
    return {
        "samples": stats["samples"], "compared_tokens": tok, "calibration_tokens": cal,
        "mean_abs_logprob_diff": stats["abs_diff_sum"] / tok if tok else None,
        "max_abs_logprob_diff": stats["abs_diff_max"] if tok else None,
        "mean_logprob_diff": stats["diff_sum"] / tok if tok else None,
        "kl_server_to_reference_per_sample": kl, "kl_per_sample_se": kl_se,
        "tv_per_sample": stats["weight_abs_dev_sum"] / (2 * k) if k else None,
        "chi2_per_sample": stats["weight_sq_dev_sum"] / k if k else None,
        "excess_loglik": stats["calibration_sum"] / cal if cal else None,
        "excess_loglik_z": stats["calibration_sum"] / math.sqrt(stats["calibration_var"])
        if stats["calibration_var"] > 0 else None,
        "roundtrip_differs_share": stats["roundtrip_differs"] / max(stats["samples"] - stats["without_logprobs"], 1),
        "without_logprobs_share": stats["without_logprobs"] / n,
        "truncated_share": stats["truncated"] / n,
    }


def mismatch_reasons(figures: dict, limits: dict = FIDELITY_LIMITS) -> list[str]:
    """Why the figures say the server samples another policy than the local pi_ref (empty: no evidence)."""
    reasons = []
    with_logprobs = figures["samples"] * (1.0 - figures["without_logprobs_share"])
    if with_logprobs >= 10 and figures["roundtrip_differs_share"] > 1.0 - limits["min_aligned_share"]:
        reasons.append(f"{figures['roundtrip_differs_share']:.0%} of the server's samples re-tokenise differently "
                       "(another tokenizer?)")
    if figures["compared_tokens"] >= limits["min_tokens"] and \
            figures["mean_abs_logprob_diff"] > limits["mean_abs_logprob_diff"]:
        reasons.append(f"its log-probs differ from the reference model's by {figures['mean_abs_logprob_diff']:.3f} "
                       f"nats per token on average (limit {limits['mean_abs_logprob_diff']}: another model?)")
    e, z = figures["excess_loglik"], figures["excess_loglik_z"]
    if figures["calibration_tokens"] >= limits["min_tokens"] and z is not None and \
            abs(e) > limits["excess_loglik"] and abs(z) > limits["excess_z"]:
        what = "sharper than pi_ref (temperature < 1, top-k, top-p or min-p on the server?)" if e > 0 else \
            "less likely under pi_ref than its own draws would be (another model?)"
        reasons.append(f"its samples are {what}: excess log-likelihood {e:+.3f} nats per token, z = {z:+.1f} "
                       f"(limits {limits['excess_loglik']} and {limits['excess_z']})")
    return reasons


# --------------------------------------------------------------------------------------
# The engine the sampling loop calls
# --------------------------------------------------------------------------------------
class ServerEngine:
    """Draws reference samples from an OpenAI-compatible ``/v1/completions`` endpoint.

    The sampling loop (``vrpo.sampling.sample_references``) calls ``connect()`` once,
    ``sample_shard(...)`` for each shard to draw (it returns the rows, as the hf engine's
    ``sample_shard`` does, and writes the shard's fidelity statistics next to it),
    ``check(shard_dir, settings)`` after each written shard and ``summary(shard_dir, settings)``
    before the final manifest. Both raise the one-line refusal when the server evidently runs
    another policy, unless ``allow_reference_mismatch``.
    """

    name = "openai"

    def __init__(self, base_url: str, served_model: str, *, concurrency: int = 4, allow_reference_mismatch: bool = False,
                 client: ServerClient | None = None, limits: dict | None = None, dialect: str | None = None):
        self.base_url, self.served_model, self.concurrency = base_url, served_model, concurrency
        self.allow_reference_mismatch = allow_reference_mismatch
        self.client = client or ServerClient(base_url, api_key=os.environ.get("VRPO_SERVER_API_KEY"))
        self.limits = dict(FIDELITY_LIMITS, **(limits or {}))
        self.dialect = dialect  # None: learnt from /v1/models (owned_by)

    # ---- connection -----------------------------------------------------------------
    def connect(self) -> None:
        """Reach the server and check that it serves ``served_model``; learn its dialect."""
        answer = self._call(self.client.get, "/models", attempts=3)
        models = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(models, list):
            raise UserError(f"--base-url {self.base_url}: /models did not list models; expected an OpenAI-compatible "
                            "server's base URL ending in /v1")
        served = {str(m.get("id")): str(m.get("owned_by", "")).lower() for m in models if isinstance(m, dict)}
        if self.served_model not in served:
            raise UserError(f"--served-model {self.served_model!r}: the server at {self.base_url} serves "
                            f"{sorted(served) or 'no model'}; pass one of those (vLLM: --served-model-name)")
        self.dialect = self.dialect or OWNERS.get(served[self.served_model], "openai")

    def manifest_fields(self) -> dict:
        return {"engine": self.name, "server": {"base_url": self.base_url, "served_model": self.served_model,
                                                "dialect": self.dialect, "prompt_format": "text",
                                                "allow_reference_mismatch": self.allow_reference_mismatch}}

    def _call(self, method, *args, attempts: int | None = None) -> dict:
        try:
            return method(*args, attempts=attempts)
        except ServerUnreachable as e:
            if e.status is not None:
                raise UserError(f"--base-url {self.base_url}: the server kept failing ({e}); finished shards are "
                                "kept, rerun the same command to resume") from None
            raise UserError(f"--base-url {self.base_url}: cannot reach the server ({e}); start it first "
                            "(e.g. `vllm serve MODEL_DIR --served-model-name ref`) or fix the address") from None
        except ServerRefused as e:
            raise UserError(f"--base-url {self.base_url}: the server refused the request ({e}); it must accept "
                            f"/v1/completions with temperature, top_p, logprobs and seed for model "
                            f"{self.served_model!r}") from None

    # ---- drawing --------------------------------------------------------------------
    def draw(self, prompts: list[str], settings: dict, seed: int):
        """Yield, prompt by prompt in order, the K completions of each (requests run ahead, so
        the caller scores one prompt while the server draws the next)."""
        K = settings["num_samples"]
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="vrpo-sample")
        try:
            # the server's log-probs for the first sample of each prompt only: they measure the server's
            # model (per-token differences), the calibration uses every sample; llama.cpp's Python
            # server spends ~4x the drawing time on a request's log-probs
            futures = [[pool.submit(self._complete, prompt, settings, (seed * 1_000_003 + i * K + j) % (2 ** 31 - 1),
                                    j == 0) for j in range(K)] for i, prompt in enumerate(prompts)]
            for row in futures:
                yield [f.result() for f in row]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _complete(self, prompt: str, settings: dict, seed: int, logprobs: bool) -> Completion:
        body = request_body(self.dialect or "openai", self.served_model, prompt, settings, seed, logprobs)
        answer = self._call(self.client.post, "/completions", body)
        try:
            return parse_completion(answer)
        except (KeyError, IndexError, TypeError):
            raise UserError(f"--base-url {self.base_url}: a /completions answer without choices[0].text; "
                            "expected an OpenAI-compatible server") from None

    def sample_shard(self, model, tokenizer, items: list[dict], settings: dict, seed: int, batch_size: int,
                     token_settings: dict, shard_path: Path) -> list[dict]:
        """Rows of one shard (as the hf engine's ``sample_shard``), and its fidelity statistics
        written to ``shard_path`` with the ``.fidelity.json`` suffix."""
        from vrpo.data import tokenize_completions
        from vrpo.provenance import atomic_write_json

        rows, stats = [], empty_stats()
        sent = [prompt_text(tokenizer, it, token_settings) for it in items]  # a too-long prompt fails before any request
        for it, completions in zip(items, self.draw(sent, settings, seed)):
            texts = [c.text for c in completions]
            # as the hf engine: a sample cut at max_new_tokens never drew EOS, so it is scored without one
            p_ids, c_ids = tokenize_completions(tokenizer, it["prompt"], texts, where=f"prompt_id {it['prompt_id']}",
                                                add_eos=[not c.truncated for c in completions], **token_settings)
            logps, token_stats = score_with_token_stats(model, p_ids, c_ids, tokenizer.pad_token_id)
            for completion, ids, ts in zip(completions, c_ids, token_stats):
                add_sample(stats, completion, ids, ts, tokenizer)
            rows.append({"prompt_id": it["prompt_id"], "prompt": it["prompt"], "samples": texts, "ref_logps": logps,
                         "truncated": [c.truncated for c in completions]})
        atomic_write_json(fidelity_path(shard_path), stats)
        return rows

    # ---- verdict --------------------------------------------------------------------
    def figures(self, shard_dir: Path) -> dict:
        parts = [json.loads(p.read_text()) for p in sorted(Path(shard_dir).glob("shard-*" + FIDELITY_SUFFIX))
                 if p.with_name(p.name[: -len(FIDELITY_SUFFIX)] + ".parquet").exists()]
        return summarize(merge_stats(parts))

    def check(self, shard_dir: Path, settings: dict) -> list[str]:
        """The refusal (one line) when the shards drawn so far show another policy; the reasons
        when it is allowed. Sampling settings that are not pi_ref's are already flagged, and
        the calibration test assumes pi_ref's, so they are not judged again here."""
        reasons = mismatch_reasons(self.figures(shard_dir), self.limits) if settings["from_reference_policy"] else []
        if reasons and not self.allow_reference_mismatch:
            raise UserError(f"--base-url {self.base_url}: the server does not sample the reference model: "
                            + "; ".join(reasons) + ". Finished shards are kept; pass --allow-reference-mismatch to "
                            "sample anyway (recorded in the manifest and the model card)")
        return reasons

    def summary(self, shard_dir: Path, settings: dict) -> dict:
        """Manifest fields: the fidelity figures, and the provenance flags when they fail."""
        reasons = self.check(shard_dir, settings)
        out = {"server_fidelity": dict(self.figures(shard_dir), limits=self.limits)}
        if reasons:
            why = "server policy differs from the reference model: " + "; ".join(reasons)
            prior = settings.get("not_reference_reason")
            out.update(from_reference_policy=False, not_reference_reason=f"{prior}; {why}" if prior else why)
        return out


def prompt_text(tokenizer, item: dict, token_settings: dict) -> str:
    """The prompt as the server gets it: the text itself, or, when the training tokenisation keeps
    only its last tokens (``--prompt-truncation left``), the text of those tokens, so that the
    server continues what the local model scores."""
    from vrpo.data import tokenize_completions

    kept = tokenize_completions(tokenizer, item["prompt"], [], where=f"prompt_id {item['prompt_id']}", add_eos=False,
                                **token_settings)[0]
    whole = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
    return item["prompt"] if len(kept) == len(whole) else tokenizer.decode(kept)


def fidelity_path(shard_path: Path) -> Path:
    return Path(shard_path).with_suffix(FIDELITY_SUFFIX)


def make_engine(args) -> ServerEngine | None:
    """The engine ``vrpo sample``'s flags ask for: None for the hf engine (``model.generate``)."""
    server_flags = [f for f, v in (("--base-url", args.base_url), ("--served-model", args.served_model)) if v]
    if args.engine == "hf":
        if server_flags or args.allow_reference_mismatch:
            extra = server_flags or ["--allow-reference-mismatch"]
            raise UserError(f"{extra[0]}: only with --engine openai (the hf engine samples the --model itself)")
        return None
    missing = [f for f, v in (("--base-url", args.base_url), ("--served-model", args.served_model)) if not v]
    if missing:
        raise UserError(f"--engine openai: needs {' and '.join(missing)} (e.g. --base-url http://127.0.0.1:8000/v1 "
                        "--served-model ref)")
    if not args.base_url.startswith(("http://", "https://")):
        raise UserError(f"--base-url {args.base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    return ServerEngine(args.base_url, args.served_model, concurrency=args.concurrency,
                        allow_reference_mismatch=args.allow_reference_mismatch)
