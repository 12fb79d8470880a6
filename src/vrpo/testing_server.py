"""A real OpenAI-compatible server on loopback, for tests and benchmarks of the server engine.

``LlamaCppServer`` starts llama.cpp's server (``python -m llama_cpp.server``, from the
``serve`` extra: ``pip install 'vrpo[serve]'``) on 127.0.0.1 serving a GGUF file, waits until
it answers ``/v1/models``, and stops it. ``RewritingProxy`` forwards requests to a server
and overwrites fields of each JSON body on the way: a gateway that silently changes the
sampling settings (``{"temperature": 0.7}``), which the fidelity check must catch. Nothing
here is mocked: both speak HTTP to a real inference engine.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["llama_cpp_server_available", "free_port", "LlamaCppServer", "RewritingProxy", "perturbed_copy"]


def llama_cpp_server_available() -> bool:
    """Whether ``python -m llama_cpp.server`` can run here (llama-cpp-python and its server extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """``with LlamaCppServer(gguf) as server: server.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, gguf: str | Path, *, alias: str = "ref", n_threads: int = 1, n_ctx: int = 1024,
                 log: str | Path | None = None, startup_timeout: float = 300.0):
        self.gguf, self.alias, self.n_threads, self.n_ctx = Path(gguf), alias, n_threads, n_ctx
        self.log, self.startup_timeout = Path(log) if log else None, startup_timeout
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.alias,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(self.n_threads),
                "--n_threads_batch", str(self.n_threads), "--n_ctx", str(self.n_ctx), "--verbose", "false"]

    def __enter__(self) -> "LlamaCppServer":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        if self.log:
            out.close()
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log else ""
                raise RuntimeError(f"llama_cpp.server exited with status {self.process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer on {self.base_url} within {self.startup_timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


class RewritingProxy:
    """``with RewritingProxy(target_base_url, {"temperature": 0.7}) as proxy: proxy.base_url``."""

    def __init__(self, target_base_url: str, overrides: dict):
        self.target, self.overrides = target_base_url.rstrip("/"), dict(overrides)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self, data: bytes | None) -> None:
                path = self.path[len("/v1"):] if self.path.startswith("/v1") else self.path
                req = urllib.request.Request(proxy.target + path, data=data, method=self.command,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=600) as resp:
                        status, body = resp.status, resp.read()
                except urllib.error.HTTPError as e:
                    status, body = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                body.update(proxy.overrides)
                self._forward(json.dumps(body).encode())

        return Handler

    def __enter__(self) -> "RewritingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def perturbed_copy(model_dir: str | Path, out_dir: str | Path, relative_noise: float, seed: int = 0) -> Path:
    """Save a copy of a model folder whose every weight tensor W gets Gaussian noise of standard
    deviation ``relative_noise * std(W)`` (same tokenizer and architecture): "another
    checkpoint" of the same model family, at a controlled distance from the original."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():  # tied weights are one parameter: perturbed once
            if tensor.numel() > 1:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * relative_noise * tensor.std())
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
