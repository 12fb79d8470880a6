"""``vrpo score``: attach the auxiliary probabilities g to every observed and reference pair.

For each labelled pair, ``aux_prob`` = g(x, y+, y-) (the out-of-fold prediction when the
auxiliary model was cross-fitted by ``vrpo fit-aux``, so the label does not leak); for the
K reference samples of each prompt, ``ref_aux_prob`` = the K x K matrix [j][k] = g(x, y~_j, y~_k)
(diagonal 1/2, [k][j] = 1 - [j][k]). Every model is antisymmetrised (vrpo.aux).

Conversational rows are rendered with the reference model's chat template: the model the
samples' manifest names, or ``--tokenizer``. g sees the rendered prompt and each reply as
plain text (``vrpo.data.aux_texts``), for observed and reference pairs alike.

The K(K-1)/2 reference pairs of a chunk of prompts go to the model in ONE batched call
(``AuxModel.predict_pairwise_batch``; embedding models embed each distinct response once).
Chunks are written atomically to ``OUT/shards/`` so a killed run resumes; the result is
``OUT/data.parquet`` + ``OUT/manifest.json`` (docs/architecture.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

DATA_FILE = "data.parquet"


def _observed_probs(aux, spec: str, rows: list[dict], source: str):
    """aux_prob of the labelled pairs: a column, out-of-fold predictions, or the model."""
    from vrpo.aux.base import ColumnAux
    from vrpo.data import aux_texts, check_probability_column

    if isinstance(aux, ColumnAux):
        if aux.column not in rows[0]:
            raise ValueError(f"--aux {spec}: {source} has no column {aux.column!r}")
        return check_probability_column([r.get(aux.column) for r in rows], aux.column, source)
    if Path(spec).is_dir():
        from vrpo.aux.io import load_oof

        oof = load_oof(spec, *aux_texts(rows))
        if oof is not None:
            return [float(p) for p in oof]
    return None  # scored with the model, chunk by chunk


def _reference_matrices(aux, spec: str, chunk: list[dict], source: str) -> list[list[list[float]]]:
    from vrpo.aux.base import ColumnAux

    if isinstance(aux, ColumnAux):
        if chunk[0].get("ref_aux_prob") is None:
            raise ValueError(f"--aux {spec}: precomputed columns cannot score new reference pairs and {source} has no "
                             "ref_aux_prob column; use a model or a callable")
        return [r["ref_aux_prob"] for r in chunk]
    mats = aux.predict_pairwise_batch([r["prompt"] for r in chunk], [list(r["ref_samples"]) for r in chunk])
    return [m.tolist() for m in mats]


def score_chunk(aux, spec: str, chunk: list[dict], observed: list[float] | None, source: str) -> list[dict]:
    """The chunk's rows with aux_prob and ref_aux_prob attached."""
    from vrpo.data import aux_texts

    if observed is None:
        observed = aux.predict_proba(*aux_texts(chunk)).tolist()
    mats = _reference_matrices(aux, spec, chunk, source)
    return [dict(r, aux_prob=float(p), ref_aux_prob=m) for r, p, m in zip(chunk, observed, mats)]


def score_inputs(aux_spec: str, data: str, samples: str | None, *, chunk_size: int, max_rows: int | None,
                 tokenizer: str | None = None) -> dict:
    """Everything that determines the scored table (the reuse record of ``--out``). The chunk
    size is in it: finished chunks are found by their index."""
    from vrpo.aux.base import aux_identity
    from vrpo.data import tokenizer_identity
    from vrpo.errors import check_readable
    from vrpo.provenance import fingerprint_data
    from vrpo.sampling import samples_fingerprint

    data_fp = fingerprint_data(check_readable(data, "--data", "a preference file"))
    return {"aux": aux_identity(aux_spec), "data": data_fp, "max_rows": max_rows,
            "samples": samples_fingerprint(samples) if samples else None, "chunk_size": chunk_size,
            "tokenizer": tokenizer_identity(tokenizer)}


def score_pairs(aux_spec: str, data: str, samples: str | None, out: str, *, chunk_size: int = 256,
                max_rows: int | None = None, overwrite: bool = False, tokenizer: str | None = None) -> Path:
    """Write ``out/data.parquet`` (preference columns + aux_prob, ref_samples, ref_aux_prob,
    ref_logps, ref_truncated) and ``out/manifest.json``; resumes from finished chunks when
    ``out`` was made from the same inputs (refused when from others, unless ``overwrite``).
    ``tokenizer``: the reference model's folder, whose chat template renders conversational
    rows (default: the model the samples' manifest names). Returns the table path."""
    from vrpo.cli_args import POSITIVE_INT
    from vrpo.outputs import claim_output, folder_lock

    POSITIVE_INT.check(chunk_size, "--chunk-size")
    POSITIVE_INT.check(max_rows, "--max-rows", allow_none=True)
    inputs = score_inputs(aux_spec, data, samples, chunk_size=chunk_size, max_rows=max_rows, tokenizer=tokenizer)
    out_dir = Path(out)
    with folder_lock(out_dir, "score"):
        claim_output(out_dir, "score", inputs, overwrite=overwrite)
        return _score_into(out_dir, aux_spec, data, samples, chunk_size=chunk_size, max_rows=max_rows,
                           tokenizer=tokenizer)


def _score_into(out_dir: Path, aux_spec: str, data: str, samples: str | None, *, chunk_size: int,
                max_rows: int | None, tokenizer: str | None) -> Path:
    from tqdm.auto import tqdm

    from vrpo.aux import resolve_aux
    from vrpo.data import attach_reference_samples, chat_template_source, load_preferences
    from vrpo.provenance import file_sha256, read_manifest, write_manifest
    from vrpo.sampling import read_samples, write_parquet

    chat = chat_template_source(tokenizer=tokenizer, samples=samples)
    rows = load_preferences(data, chat, max_rows=max_rows).to_list()
    samples_manifest = None
    if samples:
        rows = attach_reference_samples(rows, read_samples(samples), f"--samples {samples}")
        samples_manifest = read_manifest(samples)
    elif rows[0].get("ref_samples") is None:
        raise ValueError(f"--data {data}: rows have no ref_samples; pass --samples DIR from `vrpo sample`")
    aux = resolve_aux(aux_spec)
    observed = _observed_probs(aux, aux_spec, rows, data)
    manifest = {"kind": "scored_pairs", "aux": aux_spec, "data": str(data), "samples": samples,
                "samples_manifest": samples_manifest, "num_rows": len(rows), "chat_template": chat.path,
                "observed_pairs": "column" if observed is not None and not Path(aux_spec).is_dir() else
                ("out-of-fold" if observed is not None else "model"), "chunk_size": chunk_size}
    write_manifest(out_dir, dict(manifest, complete=False))
    starts = range(0, len(rows), chunk_size)
    for start in tqdm(starts, desc="scoring pairs", unit="chunk"):
        shard = out_dir / "shards" / f"chunk-{start // chunk_size:05d}.parquet"
        if shard.exists():
            continue
        chunk = rows[start:start + chunk_size]
        obs = None if observed is None else observed[start:start + chunk_size]
        write_parquet(shard, score_chunk(aux, aux_spec, chunk, obs, str(data)))
    _merge(out_dir, len(starts))
    # the checksum `vrpo train` verifies: the reference log-probs travel in this table
    write_manifest(out_dir, dict(manifest, complete=True, table_sha256=file_sha256(out_dir / DATA_FILE)))
    return out_dir / DATA_FILE


def _merge(out_dir: Path, num_chunks: int) -> None:
    import pyarrow.parquet as pq

    from vrpo.sampling import write_parquet

    rows = []
    for c in range(num_chunks):
        rows.extend(pq.read_table(out_dir / "shards" / f"chunk-{c:05d}.parquet").to_pylist())
    write_parquet(out_dir / DATA_FILE, rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, add_overwrite_flag, add_tokenizer_flag

    p.add_argument("--aux", required=True, help="module:function | file.py:function (a batched callable "
                   "fn(prompts, a, b) -> P(a > b); vrpo imports and RUNS this code, so pass only code you trust) | "
                   "column:NAME (precomputed g of the labelled pairs) | a `vrpo fit-aux` folder")
    p.add_argument("--data", required=True, help="preference data (JSONL/Parquet/CSV/saved folder)")
    p.add_argument("--samples", help="a `vrpo sample` folder with the reference samples of the same prompts "
                   "(default: none; the data must then hold ref_samples)")
    p.add_argument("--out", required=True, help="output folder: data.parquet + manifest.json; rerun the same command "
                   "to resume")
    p.add_argument("--chunk-size", type=POSITIVE_INT, default=256, help="prompts per batched call and per resumable chunk")
    p.add_argument("--max-rows", type=POSITIVE_INT, default=None, help="score only the first N rows (default: all)")
    add_overwrite_flag(p)
    # conversational data (message lists): which chat template renders it
    add_tokenizer_flag(p, "default: the model the --samples manifest names; plain-string data needs none")


def run(args: argparse.Namespace) -> int:
    path = score_pairs(args.aux, args.data, args.samples, args.out, chunk_size=args.chunk_size, max_rows=args.max_rows,
                       overwrite=args.overwrite, tokenizer=args.tokenizer)
    from vrpo.provenance import read_manifest

    m = read_manifest(path.parent)
    print(f"wrote {path} ({m['num_rows']} pairs; g of the labelled pairs from {m['observed_pairs']})")
    return 0
