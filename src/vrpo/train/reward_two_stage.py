"""Two-stage VRPO as an experiment: reward models (bt vs vrpo) over seeds, then policies on them.

For each row (a reward-model method and its settings, ``spec.rows``) and seed s in ``spec.seeds``:

1. fit a reward model on that seed's preference file (:func:`train_reward_model`);
2. measure it on held-out pairs against the true preference: accuracy, and the margins
   z = r(x, y+) - r(x, y-) that give its spread across seeds (the estimator's variance);
3. optionally run the policy stage (:func:`vrpo.policy_stage.run_rl`) and hand the policy
   folder to the caller's ``evaluate_policy`` (e.g. gold score at several temperatures);
4. optionally best-of-n: on each eval prompt keep the candidate the reward model scores
   highest and report the caller's gold score of it.

Experiment-agnostic: the caller supplies data files, evaluation pairs and scoring
callbacks. Each finished (row, seed) leaves ``OUT/<row>/seed<s>/result.json``
(atomic, written last); a rerun reuses it, so an interrupted experiment resumes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["TwoStageSpec", "EvalPairs", "run_two_stage", "summarize_two_stage"]


def _default_rows() -> dict:
    # the paper code's reward trainer uses the bounded ramp loss for VRPO (see vrpo.losses on why)
    return {"bt": {"method": "bt"}, "vrpo": {"method": "vrpo", "base_loss": "ramp"}}


@dataclass
class TwoStageSpec:
    """Which reward models to compare and how to train them.

    ``rows``: row name -> RewardModelConfig fields of that row (at least ``method``), e.g.
    ``{"bt": {"method": "bt"}, "bt-ramp": {"method": "bt", "base_loss": "ramp"},
    "vrpo": {"method": "vrpo", "base_loss": "ramp"}}``; ``reward_model``: fields every row shares.
    """

    rows: dict = field(default_factory=_default_rows)
    seeds: tuple = (0, 1, 2)
    reward_model: dict = field(default_factory=dict)
    rl: Optional[dict] = None  # RLConfig fields; None skips the policy stage (its costly part)
    rl_seeds: Optional[tuple] = None  # seeds that get a policy (default: all of ``seeds``)


@dataclass
class EvalPairs:
    """Held-out pairs for the reward model; ``true_prob`` = P*(chosen > rejected) when known."""

    prompts: Sequence[str]
    chosen: Sequence[str]
    rejected: Sequence[str]
    true_prob: Optional[Sequence[float]] = None


def _one_seed(spec: TwoStageSpec, row: str, seed: int, *, base_model: str, folder: Path, data_file: str,
              eval_pairs: EvalPairs, rl_prompts: Optional[str], evaluate_policy, best_of_n_candidates, gold_score,
              samples: Optional[str]) -> dict:
    from vrpo.policy_stage import RLConfig, RewardModelScorer, best_of_n, run_rl
    from vrpo.train.reward_model import RewardModelConfig, pair_margins, reward_accuracy, train_reward_model

    settings = {**spec.reward_model, **spec.rows[row]}
    rm_cfg = RewardModelConfig(model=base_model, data=str(data_file), out=str(folder / "reward_model"),
                               seed=seed, samples=samples, **settings)
    rm_dir = train_reward_model(rm_cfg)  # resumes a folder made from the same inputs
    scorer = RewardModelScorer.from_pretrained(rm_dir)
    z = pair_margins(scorer, eval_pairs.prompts, eval_pairs.chosen, eval_pairs.rejected)
    result = {"row": row, "method": rm_cfg.method, "base_loss": rm_cfg.base_loss, "seed": seed,
              "reward_model": str(rm_dir), "margins": z.tolist(),
              "rm_accuracy": reward_accuracy(z, eval_pairs.true_prob)}
    if best_of_n_candidates is not None and gold_score is not None:
        prompts, candidates = best_of_n_candidates
        picks = best_of_n(scorer, prompts, candidates)
        result["best_of_n_gold"] = [float(s) for s in gold_score(list(prompts), [r["best"] for r in picks])]
    if spec.rl is not None and rl_prompts and seed in (spec.rl_seeds or spec.seeds):
        rl_cfg = RLConfig(model=base_model, reward_model=str(rm_dir), prompts=str(rl_prompts),
                          out=str(folder / "policy"), seed=seed, **spec.rl)
        policy_dir = run_rl(rl_cfg)  # resumes a folder made from the same inputs
        result["policy"] = str(policy_dir)
        if evaluate_policy is not None:
            result["policy_eval"] = evaluate_policy(policy_dir, seed)
    return result


def run_two_stage(spec: TwoStageSpec, *, base_model: str, out: str | Path, data_for_seed: Callable[[int], str],
                  eval_pairs: EvalPairs, rl_prompts: Optional[str] = None,
                  evaluate_policy: Optional[Callable[[Path, int], dict]] = None,
                  best_of_n_candidates: Optional[tuple[Sequence[str], Sequence[Sequence[str]]]] = None,
                  gold_score: Optional[Callable[[list, list], Sequence[float]]] = None,
                  samples_for_seed: Optional[Callable[[int], Optional[str]]] = None, progress: bool = True) -> dict:
    """Run every (row, seed); return ``{row: {"seeds": {seed: result}, **summary}}``.

    ``data_for_seed(seed)``: that seed's preference file (for vrpo: scored data with
    aux_prob, ref_samples, ref_aux_prob). ``evaluate_policy(policy_dir, seed) -> dict``: the
    caller's policy evaluation (e.g. gold scores). ``best_of_n_candidates``: (prompts,
    candidates per prompt) and ``gold_score(prompts, completions) -> [N]`` to score the picks.
    """
    from tqdm.auto import tqdm

    from vrpo.provenance import atomic_write_json

    out = Path(out)
    results: dict = {row: {"seeds": {}} for row in spec.rows}
    jobs = [(row, s) for s in spec.seeds for row in spec.rows]
    for row, seed in tqdm(jobs, desc="two-stage: reward model (+ policy)", unit="run", disable=not progress):
        folder = out / row / f"seed{seed}"
        done = folder / "result.json"
        if done.exists():
            results[row]["seeds"][seed] = json.loads(done.read_text())
            continue
        res = _one_seed(spec, row, seed, base_model=base_model, folder=folder, data_file=data_for_seed(seed),
                        eval_pairs=eval_pairs, rl_prompts=rl_prompts, evaluate_policy=evaluate_policy,
                        best_of_n_candidates=best_of_n_candidates, gold_score=gold_score,
                        samples=samples_for_seed(seed) if samples_for_seed else None)
        atomic_write_json(done, res)
        results[row]["seeds"][seed] = res
    for row in spec.rows:
        results[row].update(summarize_two_stage(results[row]["seeds"]))
    return results


def summarize_two_stage(by_seed: dict) -> dict:
    """Across seeds: mean and sd of reward-model accuracy, the margins' spread
    (:func:`margin_variance_across_seeds`), mean best-of-n gold score."""
    import numpy as np

    from vrpo.train.reward_model import margin_variance_across_seeds

    runs = [by_seed[s] for s in sorted(by_seed)]
    acc = np.array([r["rm_accuracy"] for r in runs])
    out = {"rm_accuracy_mean": float(acc.mean()), "rm_accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0}
    if len(runs) > 1:
        out["reward_spread"] = margin_variance_across_seeds([r["margins"] for r in runs])
    bon = [np.mean(r["best_of_n_gold"]) for r in runs if "best_of_n_gold" in r]
    if bon:
        out["best_of_n_gold_mean"] = float(np.mean(bon))
    return out
