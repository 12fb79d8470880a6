"""Synthetic preference data with KNOWN truth, for tests, docs and benchmarks.

- ``rock_paper_scissors_pairs``: a cyclic (intransitive) preference, rock < paper <
  scissors < rock, each won with probability ``p_win``. No scalar reward can order a cycle,
  so Bradley-Terry gets at most 2 of the 3 matchups right; a GPM can get all 3.
- ``flipped_label_pairs``: a transitive preference (higher quality wins with probability
  ``p_win``) where a known set of labels is then flipped, as a labelling error would.
"""
from __future__ import annotations

import numpy as np

RPS = ("rock", "paper", "scissors")
RPS_BEATS = {("paper", "rock"), ("scissors", "paper"), ("rock", "scissors")}  # (winner, loser)


def rps_true_preference(prompts, responses_a, responses_b) -> np.ndarray:
    """p*(a > b): ``p_win`` = 0.9 if a beats b in the cycle, 0.1 if b beats a, 1/2 if equal."""
    return np.array([0.5 if a == b else (0.9 if (a, b) in RPS_BEATS else 0.1)
                     for a, b in zip(responses_a, responses_b)])


def rock_paper_scissors_pairs(n: int, p_win: float = 0.9, prompt: str = "Pick one.", random_state: int | None = 0):
    """n labelled pairs of two different moves; returns (prompts, a, b, labels), label 1 = a won."""
    rng = np.random.default_rng(random_state)
    pairs = [tuple(rng.choice(len(RPS), 2, replace=False)) for _ in range(n)]
    a, b = [RPS[i] for i, _ in pairs], [RPS[j] for _, j in pairs]
    p = np.where([(x, y) in RPS_BEATS for x, y in zip(a, b)], p_win, 1.0 - p_win)
    labels = (rng.random(n) < p).astype(float)
    return [prompt] * n, a, b, labels


def flipped_label_pairs(n: int, num_items: int = 8, flip_rate: float = 0.1, p_win: float = 0.97,
                        random_state: int | None = 0):
    """Preference records (prompt, chosen, rejected) over ``num_items`` responses "answer q"
    of quality q (higher wins w.p. ``p_win``), then a random ``flip_rate`` share of the
    records swapped. Returns (records, flipped row indices)."""
    rng = np.random.default_rng(random_state)
    records = []
    for _ in range(n):
        i, j = sorted(rng.choice(num_items, 2, replace=False))
        hi, lo = f"answer {j}", f"answer {i}"
        chosen, rejected = (hi, lo) if rng.random() < p_win else (lo, hi)
        records.append({"prompt": "Rate the answers.", "chosen": chosen, "rejected": rejected})
    flipped = np.sort(rng.choice(n, int(round(flip_rate * n)), replace=False))
    for k in flipped:
        r = records[k]
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    return records, flipped
