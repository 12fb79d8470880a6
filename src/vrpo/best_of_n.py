"""``vrpo best-of-n``: keep, for each prompt, the reference sample the reward model scores highest.

    vrpo sample --model POLICY --prompts prompts.jsonl --num-samples N --out SAMPLES
    vrpo best-of-n --reward-model RM_DIR --samples SAMPLES --out BON_DIR

Writes ``BON_DIR/best_of_n.parquet`` (``prompt_id``, ``prompt``, ``best``, ``best_index``,
``best_reward``, ``rewards``) and ``BON_DIR/manifest.json`` (the samples' manifest and the
reward model's fingerprint).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, add_overwrite_flag

    parser.add_argument("--reward-model", required=True, help="reward-model folder written by `vrpo train-rm`")
    parser.add_argument("--samples", required=True, help="folder written by `vrpo sample` (samples.parquet)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="sequences per reward-model forward pass")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code")
    add_overwrite_flag(parser)


def load_samples(folder: str | Path):
    """The rows of ``samples.parquet`` (prompt_id, prompt, samples), checked against the
    checksum of the samples' manifest, as a pandas DataFrame."""
    import pandas as pd

    from vrpo.sampling import read_samples

    table = pd.DataFrame(read_samples(folder))
    missing = [c for c in ("prompt", "samples") if c not in table.columns]
    if missing:
        raise ValueError(f"--samples {folder}: samples.parquet lacks column(s) {missing}; has {list(table.columns)}")
    return table


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from vrpo.outputs import claim_output
    from vrpo.policy_stage import RewardModelScorer, best_of_n
    from vrpo.provenance import atomic_write_json, fingerprint_model, read_manifest
    from vrpo.sampling import check_model_folder, samples_fingerprint

    reward_fp = fingerprint_model(check_model_folder(args.reward_model, "--reward-model"))
    # the batch size is in the record: padding a batch can change a reward in its last bits
    out = claim_output(args.out, "best-of-n", {"reward_model": reward_fp, "samples": samples_fingerprint(args.samples),
                                               "batch_size": args.batch_size}, overwrite=args.overwrite)
    table = load_samples(args.samples)
    scorer = RewardModelScorer.from_pretrained(args.reward_model, batch_size=args.batch_size,
                                               trust_remote_code=args.trust_remote_code)
    rows = best_of_n(scorer, list(table["prompt"]), [list(s) for s in table["samples"]])
    result = pd.DataFrame(rows)
    result.insert(0, "prompt", list(table["prompt"]))
    if "prompt_id" in table.columns:
        result.insert(0, "prompt_id", list(table["prompt_id"]))
    tmp = out / "best_of_n.parquet.tmp"
    result.to_parquet(tmp, index=False)
    tmp.replace(out / "best_of_n.parquet")
    manifest = {"reward_model": str(args.reward_model), "reward_model_fingerprint": reward_fp,
                "samples": str(args.samples), "samples_manifest": read_manifest(args.samples),
                "n": int(table["samples"].map(len).max())}
    atomic_write_json(out / "manifest.json", manifest)
    print(f"best-of-n over {len(result)} prompts: mean best reward {result['best_reward'].mean():.4f} -> {out}")
    return 0
