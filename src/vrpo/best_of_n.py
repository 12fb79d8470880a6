"""``vrpo best-of-n``: keep, for each prompt, the reference sample the reward model scores highest.

    vrpo sample --model POLICY --prompts prompts.jsonl --num-samples N --out SAMPLES
    vrpo best-of-n --reward-model RM_DIR --samples SAMPLES --out BON_DIR

Writes ``BON_DIR/best_of_n.parquet`` (``prompt_id``, ``prompt``, ``best``, ``best_index``,
``best_reward``, ``rewards``) and ``BON_DIR/manifest.json`` (the samples' manifest and the
reward model's fingerprint).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward-model", required=True, help="reward-model folder written by `vrpo train-rm`")
    parser.add_argument("--samples", required=True, help="folder written by `vrpo sample` (samples.parquet)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per reward-model forward pass")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_samples(folder: str | Path):
    """The rows of ``samples.parquet`` (prompt_id, prompt, samples) as a pandas DataFrame."""
    import pandas as pd

    path = Path(folder) / "samples.parquet"
    if not path.is_file():
        raise ValueError(f"--samples: {path} not found; expected a folder written by `vrpo sample`")
    table = pd.read_parquet(path)
    missing = [c for c in ("prompt", "samples") if c not in table.columns]
    if missing:
        raise ValueError(f"--samples: {path} lacks column(s) {missing}; has {list(table.columns)}")
    return table


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from vrpo.policy_stage import RewardModelScorer, best_of_n
    from vrpo.provenance import atomic_write_json, fingerprint_model

    table = load_samples(args.samples)
    scorer = RewardModelScorer.from_pretrained(args.reward_model, batch_size=args.batch_size,
                                               trust_remote_code=args.trust_remote_code)
    rows = best_of_n(scorer, list(table["prompt"]), [list(s) for s in table["samples"]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = pd.DataFrame(rows)
    result.insert(0, "prompt", list(table["prompt"]))
    if "prompt_id" in table.columns:
        result.insert(0, "prompt_id", list(table["prompt_id"]))
    tmp = out / "best_of_n.parquet.tmp"
    result.to_parquet(tmp, index=False)
    tmp.replace(out / "best_of_n.parquet")
    manifest_in = Path(args.samples) / "manifest.json"
    manifest = {
        "reward_model": str(args.reward_model),
        "reward_model_fingerprint": fingerprint_model(args.reward_model),
        "samples": str(args.samples),
        "samples_manifest": json.loads(manifest_in.read_text()) if manifest_in.is_file() else None,
        "n": int(table["samples"].map(len).max()),
    }
    atomic_write_json(out / "manifest.json", manifest)
    print(f"best-of-n over {len(result)} prompts: mean best reward {result['best_reward'].mean():.4f} -> {out}")
    return 0
