"""Shared builders for the pipeline tests (data, sampling, scoring, training): one tiny
offline GPT-2 per test process, and a small preference file."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

PAIRS = [
    ("The movie was", " wonderful and great.", " terrible and boring."),
    ("I think the film", " was beautiful.", " was the worst."),
    ("The acting was", " excellent.", " bad."),
    ("The story", " moved me.", " bored me."),
    ("Please book", " an appointment for Tuesday.", " nothing."),
    ("The music", " was great.", " was bad."),
]


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    from vrpo.testing import build_tiny_causal_lm

    out = Path(tempfile.mkdtemp(prefix="vrpo-tiny-")) / "model"
    return build_tiny_causal_lm(out, n_positions=128)


def write_pairs(path: Path, n: int = 6, aux: bool = True) -> Path:
    rows = []
    for i in range(n):
        p, c, r = PAIRS[i % len(PAIRS)]
        row = {"prompt": p if i < len(PAIRS) else f"{p} ({i})", "chosen": c, "rejected": r}
        if aux:
            row["aux_prob"] = 0.6 + 0.05 * (i % 5)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_scored(path: Path, n: int = 6, k: int = 3) -> Path:
    """Preference rows that already carry K reference samples and their g (as `vrpo score`
    writes them, minus ref_logps, which training then computes with the reference model)."""
    import math

    rows = []
    extra = [" great fun.", " dull.", " a story.", " loved it.", " bad acting."]
    for i in range(n):
        p, c, r = PAIRS[i % len(PAIRS)]
        samples = [extra[(i + j) % len(extra)] for j in range(k)]
        g = [[0.5 if a == b else 1 / (1 + math.exp(-(len(samples[a]) - len(samples[b])) / 4)) for b in range(k)]
             for a in range(k)]
        rows.append({"prompt": p if i < len(PAIRS) else f"{p} ({i})", "chosen": c, "rejected": r,
                     "aux_prob": 0.6 + 0.05 * (i % 5), "ref_samples": samples, "ref_aux_prob": g})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_samples_folder(folder: Path, table: list[dict], **manifest) -> Path:
    """A samples folder as `vrpo sample` leaves it: samples.parquet and a manifest that records
    the table's sha256 (what training and scoring verify)."""
    from vrpo.provenance import file_sha256, write_manifest
    from vrpo.sampling import SAMPLES_FILE, write_parquet

    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(folder / SAMPLES_FILE, table)
    write_manifest(folder, {**manifest, "complete": True, "table_sha256": file_sha256(folder / SAMPLES_FILE)})
    return folder
