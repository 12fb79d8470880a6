"""The stages before training, each cached or resumable:

    reviews -> splits -> pi_ref (BPE + tiny GPT, cached) -> gold reward (cached)
            -> prompts -> labelled-pair candidates and reference samples (``vrpo.sampling``)
            -> per seed: reviewer labels + auxiliary probabilities -> a preference file

The preference files follow docs/architecture.md's scored-data contract (prompt, chosen,
rejected, prompt_id, aux_prob, ref_samples, ref_aux_prob), so ``vrpo.train`` reads them
like any user's data.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vrpo.experiments.imdb.data import load_reviews, split_reviews
from vrpo.experiments.imdb.policy import cache_dir, config_key, load_or_pretrain, load_policy


class Setup:
    """What every run shares: splits, pi_ref folder, gold reward, reviewers, prompts."""

    def __init__(self, preset, out: Path, progress: bool = True):
        from vrpo.experiments.imdb.gold import load_or_fit_gold
        from vrpo.experiments.imdb.reviewers import SimulatedReviewers

        self.preset, self.out, self.progress = preset, Path(out), progress
        self.splits = split_reviews(load_reviews(), preset.split_sizes, seed=0)
        self.policy_dir = load_or_pretrain([r.text for r in self.splits["pretrain"]], preset.policy, progress)
        self.model, self.tokenizer = load_policy(self.policy_dir)
        gold_key = config_key(preset.policy) + "-" + str(preset.split_sizes["gold"])
        self.gold = load_or_fit_gold(cache_dir() / f"gold-{gold_key}", [r.text for r in self.splits["gold"]],
                                     [r.label for r in self.splits["gold"]])
        self.reviewers = SimulatedReviewers(self.gold)
        self.pool_prompts = review_prompts(self.splits["prompts"], self.tokenizer, preset.prompt_tokens,
                                           preset.num_pool_prompts, "prompts")
        self.eval_prompts = review_prompts(self.splits["eval"], self.tokenizer, preset.prompt_tokens,
                                           preset.num_eval_prompts, "eval")

    def gold_score(self, prompts, completions) -> np.ndarray:
        """The paper's "score": gold P(positive) of the text a reader sees (prompt + continuation)."""
        return self.gold.score([p + c for p, c in zip(prompts, completions)])


def review_prompts(reviews, tokenizer, num_tokens: int, count: int, split: str) -> list[str]:
    """Distinct prompts: the first ``num_tokens`` BPE tokens of each review, decoded."""
    prompts: dict[str, None] = {}
    for r in reviews:
        ids = tokenizer(r.text, add_special_tokens=False)["input_ids"][:num_tokens]
        text = tokenizer.decode(ids).strip()
        if text:
            prompts.setdefault(text)
        if len(prompts) == count:
            return list(prompts)
    raise ValueError(f"imdb: the {split} split gives {len(prompts)} distinct prompts, fewer than the {count} "
                     "the preset asks for; enlarge split_sizes[{split!r}]")


# --------------------------------------------------------------------------------------
# Sampling: the labelled pairs' candidates and the reference samples, via vrpo.sampling
# --------------------------------------------------------------------------------------
def draw_samples(setup: Setup) -> dict[str, Path]:
    """Folders written by ``vrpo.sampling.sample_references`` (resumable, with manifests)."""
    from vrpo.provenance import atomic_write_text
    from vrpo.sampling import sample_references

    p = setup.preset
    data_dir = setup.out / "data"
    prompts_file = data_dir / "prompts.jsonl"
    atomic_write_text(prompts_file, "".join(json.dumps({"prompt": x}) + "\n" for x in setup.pool_prompts))
    settings = {
        "pairs": dict(num_samples=2, temperature=1.0, seed=1),
        "refs-correct": dict(num_samples=p.max_ref_samples, temperature=1.0, seed=2),
        "refs-misspecified": dict(num_samples=p.max_ref_samples, temperature=p.misspecified_temperature, seed=3),
    }
    folders = {}
    for name, kw in settings.items():
        folder = data_dir / name
        sample_references(str(setup.policy_dir), str(prompts_file), str(folder), max_new_tokens=p.max_new_tokens,
                          batch_size=64, shard_size=256, **kw)
        folders[name] = folder
    return folders


# --------------------------------------------------------------------------------------
# Per seed: labels and auxiliary probabilities
# --------------------------------------------------------------------------------------
def labelled_pairs(setup: Setup, pairs_table: list[dict], seed: int) -> list[dict]:
    """``num_train_pairs`` prompts of the pool, each pair labelled by one simulated reviewer."""
    rng = np.random.default_rng(10_000 + seed)
    chosen_rows = rng.choice(len(pairs_table), size=setup.preset.num_train_pairs, replace=False)
    rows = [pairs_table[i] for i in sorted(chosen_rows)]
    prompts = [r["prompt"] for r in rows]
    a, b = [r["samples"][0] for r in rows], [r["samples"][1] for r in rows]
    a_wins = setup.reviewers.label(prompts, a, b, rng)
    return [{"prompt_id": r["prompt_id"], "prompt": x, "chosen": ya if w else yb, "rejected": yb if w else ya}
            for r, x, ya, yb, w in zip(rows, prompts, a, b, a_wins)]


def aux_models(setup: Setup, rows: list[dict], seed: int, needed: set[str]) -> dict:
    """``kind -> (observed-pair probabilities [n], model scoring new pairs)`` for the kinds needed.

    The fitted GPM is cross-fitted: observed pairs get out-of-fold predictions (no label
    leak), reference pairs the fold-average model (vrpo.aux.crossfit)."""
    from vrpo.experiments.imdb.reviewers import OracleAux, WordCountJudge

    prompts = [r["prompt"] for r in rows]
    chosen, rejected = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    out = {}
    fixed = {"oracle": lambda: OracleAux(setup.reviewers), "misspecified": WordCountJudge}
    for kind in sorted(needed & set(fixed)):
        model = fixed[kind]()
        out[kind] = (model.predict_proba(prompts, chosen, rejected), model)
    if "fitted" in needed:
        from vrpo.aux import GPM
        from vrpo.aux.crossfit import cross_fit

        p = setup.preset
        # labels as the fit sees them: a = chosen won (1); the pairs are re-oriented at random
        # so the model cannot learn "first is better" (the label must come from the text)
        rng = np.random.default_rng(20_000 + seed)
        flip = rng.random(len(rows)) < 0.5
        a = [r if f else c for c, r, f in zip(chosen, rejected, flip)]
        b = [c if f else r for c, r, f in zip(chosen, rejected, flip)]
        y = (~flip).astype(float)
        factory = lambda: GPM(backbone="minilm", epochs=p.aux_epochs, random_state=seed)  # noqa: E731
        fit = cross_fit(factory, prompts, a, b, y, folds=p.aux_folds, random_state=seed, groups=None,
                        progress=setup.progress)
        oof_a = fit.oof_proba  # P(a wins), out of fold
        out["fitted"] = (np.where(flip, 1.0 - oof_a, oof_a), fit.reference_model)
    return out


def reference_matrices(model, prompts: list[str], samples: list[list[str]]) -> np.ndarray:
    """[n, K, K] with [i, j, k] = g(x_i, y~_j, y~_k)."""
    if hasattr(model, "predict_pairwise_batch"):
        return np.stack(model.predict_pairwise_batch(prompts, samples))
    K = len(samples[0])
    j, k = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
    xs = [x for x, s in zip(prompts, samples) for _ in range(K * K)]
    ya = [s[jj] for s in samples for jj in j.ravel()]
    yb = [s[kk] for s in samples for kk in k.ravel()]
    return model.predict_proba(xs, ya, yb).reshape(len(prompts), K, K)


def write_preference_files(setup: Setup, folders: dict[str, Path], seed: int, needed: set[tuple[str, str]]) -> dict:
    """``(reference kind, aux kind) -> preference file`` for one seed; skips files that exist."""
    from vrpo.data import check_same_prompt
    from vrpo.provenance import atomic_write_text
    from vrpo.sampling import read_samples

    seed_dir = setup.out / "data" / f"seed{seed}"
    files = {key: seed_dir / f"{key[0]}-{key[1]}.jsonl" for key in needed}
    todo = {key for key, f in files.items() if not f.exists()}
    if not todo:
        return files
    rows = labelled_pairs(setup, read_samples(folders["pairs"]), seed)
    aux = aux_models(setup, rows, seed, {a for _, a in todo})
    for ref_kind, aux_kind in sorted(todo):
        refs = {r["prompt_id"]: r for r in read_samples(folders[f"refs-{ref_kind}"])}
        for r in rows:  # joined by id: the prompt text must be the same too
            check_same_prompt(r["prompt"], refs[r["prompt_id"]]["prompt"], f"imdb refs-{ref_kind}: {r['prompt_id']}")
        samples = [refs[r["prompt_id"]]["samples"] for r in rows]
        observed, model = aux[aux_kind]
        mats = reference_matrices(model, [r["prompt"] for r in rows], samples)
        lines = [json.dumps(dict(r, aux_prob=float(g), ref_samples=s, ref_aux_prob=m.tolist()))
                 for r, g, s, m in zip(rows, observed, samples, mats)]
        atomic_write_text(files[(ref_kind, aux_kind)], "\n".join(lines) + "\n")
    return files


def describe(setup: Setup) -> dict:
    """The resolved setup for results.json: sizes, the policy, the gold reward's accuracy."""
    ev = setup.splits["eval"][:1000]
    return {"preset": asdict(setup.preset), "policy_dir": str(setup.policy_dir),
            "pretrain": json.loads((setup.policy_dir / "pretrain.json").read_text()),
            "gold_accuracy_eval_reviews": setup.gold.accuracy([r.text for r in ev], [r.label for r in ev]),
            "num_reviews": {k: len(v) for k, v in setup.splits.items()}}
