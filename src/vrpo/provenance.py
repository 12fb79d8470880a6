"""Provenance: which checkpoint, tokenizer, data and settings produced a file.

VRPO's correction has mean zero only when the labelled pairs and the reference samples
come from the same pi_ref as the reference log-probs (docs/method.md): a mismatch is the
paper's "reference policy misspecified" case. So every stage writes a ``manifest.json``
with fingerprints, and training compares them with the model it is given.

Fingerprints are sha256 digests: of the weight and config files of a model folder, of the
tokenizer files, of a data file's bytes (or a folder's files). Writes are atomic.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterable

MANIFEST = "manifest.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
PACKAGES = ("vrpo", "torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "peft", "trl", "numpy")

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "file_sha256", "fingerprint_files", "fingerprint_model",
    "fingerprint_tokenizer", "fingerprint_data", "package_versions", "now_utc", "write_manifest",
    "read_manifest", "reference_problems", "check_reference",
]


# --------------------------------------------------------------------------------------
# Atomic writes: write a temporary file in the same folder, then os.replace
# --------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------
def _hash_file(h, path: Path, chunk: int = 1 << 20) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (what ``sha256sum FILE`` prints): the checksum a manifest
    records for the table beside it."""
    h = hashlib.sha256()
    _hash_file(h, Path(path))
    return h.hexdigest()


def fingerprint_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over (relative name, bytes) of the files, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        _hash_file(h, p)
    return h.hexdigest()


def _local_dir(model_or_path) -> Path | None:
    path = getattr(model_or_path, "name_or_path", model_or_path)
    if isinstance(path, (str, Path)) and Path(path).is_dir():
        return Path(path)
    return None


def fingerprint_model(model_or_path) -> str:
    """Fingerprint of a model folder's weights and config (``*.safetensors``, ``*.bin``,
    ``*.gguf``, ``config.json``), or of an in-memory model's state dict ("state:" prefix)
    when it was not loaded from a folder."""
    folder = _local_dir(model_or_path) if isinstance(model_or_path, (str, Path)) else None
    if folder is not None:
        files = sorted({p for pat in WEIGHT_PATTERNS for p in folder.glob(pat)})
        if not any(p.name != "config.json" for p in files):
            raise ValueError(f"{folder}: no model weights (*.safetensors, *.bin, *.gguf) to fingerprint")
        return fingerprint_files(files, folder)
    if isinstance(model_or_path, (str, Path)):
        raise ValueError(f"{model_or_path}: not a local model folder (nothing is downloaded); expected a save_pretrained directory")
    h = hashlib.sha256()
    for name, tensor in sorted(model_or_path.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def fingerprint_tokenizer(tokenizer_or_path) -> str:
    """Fingerprint of a tokenizer folder's files, or of an in-memory fast tokenizer's
    serialisation plus its chat template and special tokens."""
    folder = _local_dir(tokenizer_or_path)
    if folder is not None and isinstance(tokenizer_or_path, (str, Path)):
        files = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
        if not files:
            raise ValueError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
        return fingerprint_files(files, folder)
    tok = tokenizer_or_path
    parts = [getattr(getattr(tok, "backend_tokenizer", None), "to_str", lambda: repr(tok.get_vocab()))(),
             str(getattr(tok, "chat_template", None)), json.dumps(tok.special_tokens_map, sort_keys=True, default=str)]
    return "mem:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


# the table a vrpo folder holds (`vrpo score`, `vrpo label`, `vrpo sample`): a folder passed as data is
# identified by it, not by its manifest's time stamps or its resumable shards
DATA_TABLES = ("data.parquet", "pairs.jsonl", "samples.parquet")


def fingerprint_data(path_or_dataset) -> str:
    """Fingerprint of a data file's bytes, a vrpo folder's table (``DATA_TABLES``), any other
    folder's files, or a ``datasets.Dataset``."""
    if hasattr(path_or_dataset, "_fingerprint"):
        return "dataset:" + str(path_or_dataset._fingerprint)
    p = Path(path_or_dataset)
    table = next((p / name for name in DATA_TABLES if (p / name).is_file()), None) if p.is_dir() else None
    if table is not None:
        return fingerprint_files([table])
    if p.is_dir():
        return fingerprint_files([q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")], p)
    if p.is_file():
        return fingerprint_files([p])
    raise ValueError(f"{p}: no such file or directory to fingerprint")


# --------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically, adding versions and time if absent."""
    manifest = dict(manifest)
    manifest.setdefault("versions", package_versions())
    manifest.setdefault("created", now_utc())
    return atomic_write_json(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder)
    path = path / MANIFEST if path.is_dir() else path
    if not path.exists():
        raise ValueError(f"{path}: no manifest.json; expected a folder written by `vrpo sample` / `vrpo score`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None


def read_run_config(folder: str | Path, flag: str) -> dict | None:
    """The resolved settings a `vrpo train` / `train-rm` run saved as ``folder/config.yaml``;
    None when the folder has none (a plain model folder). A damaged file is the user's one-line
    error naming ``flag``, not a YAML traceback."""
    import yaml

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {folder}: config.yaml is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{flag} {folder}: config.yaml holds {type(record).__name__}; expected the settings of a run")
    return record


def reference_problems(manifest: dict, model_fingerprint: str, tokenizer_fingerprint: str | None = None,
                       what: str = "samples") -> list[str]:
    """Reasons the data of ``manifest`` are not draws from the given reference model."""
    problems = []
    if manifest.get("model_fingerprint") not in (None, model_fingerprint):
        problems.append(f"{what} were drawn from model {str(manifest['model_fingerprint'])[:12]}, "
                        f"the reference model is {model_fingerprint[:12]}")
    if tokenizer_fingerprint and manifest.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint):
        problems.append(f"{what} used tokenizer {str(manifest['tokenizer_fingerprint'])[:12]}, "
                        f"the reference tokenizer is {tokenizer_fingerprint[:12]}")
    if manifest.get("from_reference_policy") is False:
        problems.append(f"{what} were not drawn from pi_ref itself ({manifest.get('not_reference_reason', 'modified sampling')})")
    return problems


def check_reference(manifest: dict, model_fingerprint: str, tokenizer_fingerprint: str | None = None, *,
                    allow_mismatch: bool = False, what: str = "samples") -> list[str]:
    """Raise a one-line ValueError on a provenance mismatch unless ``allow_mismatch``;
    return the problems (to record in the run folder) otherwise."""
    problems = reference_problems(manifest, model_fingerprint, tokenizer_fingerprint, what)
    if problems and not allow_mismatch:
        raise ValueError("; ".join(problems) + " (pass --allow-reference-mismatch to train anyway; it is recorded)")
    return problems
