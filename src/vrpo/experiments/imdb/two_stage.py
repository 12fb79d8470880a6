"""The IMDb experiment's two-stage rows: reward models bt vs vrpo, then policies on them.

Registered in ``vrpo.experiments.imdb.EXTRA_SECTIONS``; :func:`two_stage_section` receives the
experiment's ``Setup`` and output folder and returns ``{"json": ..., "markdown": ...}``
(``results.json["two_stage"]`` and a section of results.md).

For each row of the preset's ``TwoStageSettings`` (a ``vrpo train-rm`` method, base loss and K)
and each of the preset's seeds, ``vrpo.train.reward_two_stage.run_two_stage`` fits a reward
model on THE SAME labelled pairs and reference samples as the one-stage rows of that seed
(the (correct pi_ref, oracle g) preference file: DPO's pairs, VRPO (correct, oracle)'s
auxiliary probabilities), initialised from pi_ref with a fresh scalar head. Then:

- accuracy against the TRUE preference on held-out pairs: two pi_ref samples (T = 1) of
  each eval prompt, truth p* = the simulated reviewers' exact expected preference
  (``OracleAux``); the expected agreement mean(p* 1[z > 0] + (1 - p*) 1[z < 0]), with the
  Bayes rule's value as the ceiling;
- the reward model's variance across seeds: the spread of the margins z of those pairs
  (``margin_variance_across_seeds``: unit-RMS margins, and P(two seeds disagree on a sign));
- best-of-n (the cheap baseline): of the n pi_ref samples of each eval prompt keep the one
  the reward model scores highest; its gold score, against a random pick (n = 1) and the
  gold reward's own pick (the ceiling of best-of-n);
- where the preset asks for it (``rl_steps > 0``), RLOO from pi_ref against the reward model
  (``vrpo.policy_stage``, TRL's RLOOTrainer) and the gold score of the policy at the preset's
  temperatures, evaluated exactly as the one-stage rows (``runner.evaluate_policy``).

Every (row, seed) leaves ``OUT/two_stage/<row>/seed<k>/result.json``; a rerun reuses it.
"""
from __future__ import annotations

import contextlib

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

PAIRS_KEY = ("correct", "oracle")  # the preference file the one-stage DPO / VRPO (correct, oracle) rows read


@dataclass(frozen=True)
class TwoStageSettings:
    """The two-stage rows of one preset: row name -> ``RewardModelConfig`` fields, and the stages run."""

    rows: dict = field(default_factory=lambda: {
        "bt-ramp": {"method": "bt", "base_loss": "ramp"},
        "vrpo-ramp-k4": {"method": "vrpo", "base_loss": "ramp", "num_ref_samples": 4}})
    best_of_n: int = 4  # pi_ref samples per eval prompt (the first two are also the held-out pairs)
    rl_steps: int = 0  # RLOO steps per policy; 0 skips the policy stage
    rl_seeds: Optional[tuple] = None  # seeds that get a policy (None: all of the preset's)
    rl: dict = field(default_factory=lambda: {"num_generations": 4, "batch_size": 16, "learning_rate": 3e-4,
                                              "beta": 0.05})


# quick (the demo) must stay within minutes: reward models + best-of-n only, the ramp pair (the
# paper code's loss for both, so the rows differ by the control variate alone). paper adds the
# sigmoid pair (Bradley-Terry proper) and 40 RLOO steps per (row, seed). micro exercises every
# stage in seconds (one RLOO step on one seed).
SETTINGS: dict[str, TwoStageSettings] = {
    "quick": TwoStageSettings(),
    "paper": TwoStageSettings(
        rows={"bt-sigmoid": {"method": "bt", "base_loss": "sigmoid"},
              "vrpo-sigmoid-k4": {"method": "vrpo", "base_loss": "sigmoid", "num_ref_samples": 4},
              "bt-ramp": {"method": "bt", "base_loss": "ramp"},
              "vrpo-ramp-k4": {"method": "vrpo", "base_loss": "ramp", "num_ref_samples": 4}},
        best_of_n=8, rl_steps=40),
    "micro": TwoStageSettings(rl_steps=1, rl_seeds=(0,), rl={"num_generations": 2, "batch_size": 4,
                                                            "learning_rate": 1e-4, "beta": 0.05}),
}


def get_settings(preset_name: str) -> TwoStageSettings:
    if preset_name not in SETTINGS:
        raise ValueError(f"--preset {preset_name}: no two-stage settings; expected one of {sorted(SETTINGS)}")
    return SETTINGS[preset_name]


def _spec(setup, settings: TwoStageSettings):
    from vrpo.train.reward_two_stage import TwoStageSpec

    p = setup.preset
    reward_model = dict(
        # the one-stage rows' optimisation settings (runner.train_config), unchanged
        learning_rate=p.learning_rate, num_train_epochs=p.num_train_epochs, per_device_train_batch_size=p.batch_size,
        warmup_steps=0, max_length=256 + p.max_new_tokens + 1, max_prompt_length=256, logging_steps=50,
        save_steps=10_000, save_total_limit=1,
        training_args={"use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True})
    rl = None
    if settings.rl_steps > 0:
        rl = dict(settings.rl, max_steps=settings.rl_steps, max_completion_length=p.max_new_tokens,
                  save_steps=10_000, logging_steps=10, engine_args={"disable_tqdm": True})
    return TwoStageSpec(rows=dict(settings.rows), seeds=tuple(p.seeds), reward_model=reward_model, rl=rl,
                        rl_seeds=settings.rl_seeds)


def eval_candidates(setup, folder: Path, n: int):
    """n pi_ref samples (T = 1) of each eval prompt, drawn once by ``vrpo.sampling`` (resumable)."""
    import json

    from vrpo.provenance import atomic_write_text
    from vrpo.sampling import read_samples, sample_references

    prompts_file = folder / "eval_prompts.jsonl"
    atomic_write_text(prompts_file, "".join(json.dumps({"prompt": x}) + "\n" for x in setup.eval_prompts))
    samples_dir = folder / "eval-samples"
    sample_references(str(setup.policy_dir), str(prompts_file), str(samples_dir), num_samples=n, temperature=1.0,
                      seed=7, max_new_tokens=setup.preset.max_new_tokens, batch_size=64, shard_size=256)
    rows = read_samples(samples_dir)
    return [r["prompt"] for r in rows], [list(r["samples"]) for r in rows]


def two_stage_section(setup, out) -> dict:
    """Run the preset's two-stage rows; ``{"json": results.json["two_stage"], "markdown": section}``."""
    from vrpo.experiments.imdb.pipeline import draw_samples, write_preference_files
    from vrpo.experiments.imdb.reviewers import OracleAux
    from vrpo.train.reward_two_stage import EvalPairs, run_two_stage

    t0, c0 = time.perf_counter(), time.process_time()
    settings = get_settings(setup.preset.name)
    folder = Path(out) / "two_stage"
    folder.mkdir(parents=True, exist_ok=True)
    sample_dirs = draw_samples(setup)  # reuses the one-stage rows' samples (resumable, already drawn)
    prompts, candidates = eval_candidates(setup, folder, settings.best_of_n)
    a, b = [c[0] for c in candidates], [c[1] for c in candidates]
    p_star = OracleAux(setup.reviewers).predict_proba(prompts, a, b)
    pairs = EvalPairs(prompts, a, b, true_prob=p_star)

    def data_for_seed(seed: int) -> str:
        return str(write_preference_files(setup, sample_dirs, seed, {PAIRS_KEY})[PAIRS_KEY])

    def evaluate_policy(policy_dir: Path, seed: int) -> dict:
        from vrpo.experiments.imdb.policy import load_policy
        from vrpo.experiments.imdb.runner import evaluate_policy as gold_at_temperatures

        model, _ = load_policy(policy_dir)
        return gold_at_temperatures(setup, model, seed)

    spec = _spec(setup, settings)
    # the Trainers' dictionaries (stdout) go to a log; the progress bar (stderr) stays on the terminal
    with open(folder / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        res = run_two_stage(spec, base_model=str(setup.policy_dir), out=folder,
                            data_for_seed=data_for_seed, eval_pairs=pairs,
                            rl_prompts=str(setup.out / "data" / "prompts.jsonl"), evaluate_policy=evaluate_policy,
                            best_of_n_candidates=(prompts, candidates), gold_score=setup.gold_score,
                            progress=setup.progress)
    gold = np.array([setup.gold_score(prompts, [c[j] for c in candidates]) for j in range(settings.best_of_n)])
    context = {
        "rm_accuracy_ceiling": float(np.mean(np.maximum(p_star, 1 - p_star))),  # the Bayes rule's agreement
        "num_eval_pairs": len(prompts),
        "pi_ref_gold_T1": float(gold.mean()),  # a random pick of the n samples (n = 1)
        "best_of_n_gold_by_gold": float(gold.max(0).mean()),  # best-of-n's ceiling: the judge picks
        "best_of_n": settings.best_of_n,
    }
    rows = {name: _row_summary(setup, settings, name, r) for name, r in res.items()}
    data = {"settings": asdict(settings), "reward_model": spec.reward_model, **context,
            "rows": rows, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    return {"json": data, "markdown": section_markdown(data, [str(float(t)) for t in setup.preset.temperatures],
                                                       setup.preset.seeds)}


def _row_summary(setup, settings: TwoStageSettings, name: str, r: dict) -> dict:
    """One row over seeds: its settings, the summary of ``run_two_stage`` and the policies' gold scores."""
    cfg = settings.rows[name]
    seeds = sorted(r["seeds"])
    out = {"method": cfg["method"], "base_loss": cfg.get("base_loss", "sigmoid"), "K": cfg.get("num_ref_samples"),
           **{k: v for k, v in r.items() if k != "seeds"},
           "rm_accuracy": {str(s): r["seeds"][s]["rm_accuracy"] for s in seeds},
           "best_of_n_gold": {str(s): float(np.mean(r["seeds"][s]["best_of_n_gold"])) for s in seeds},
           "margins": {str(s): r["seeds"][s]["margins"] for s in seeds}}
    bon = list(out["best_of_n_gold"].values())
    out["best_of_n_gold_sd"] = float(np.std(bon, ddof=1)) if len(bon) > 1 else 0.0
    evals = {str(s): r["seeds"][s]["policy_eval"] for s in seeds if "policy_eval" in r["seeds"][s]}
    if evals:
        out["policy"] = {"mean_score": {s: e["mean_score"] for s, e in evals.items()},
                         "kl": {s: e["kl"] for s, e in evals.items()}, "rl_steps": settings.rl_steps}
    return out


def _mean_sd(values) -> str:
    v = np.asarray(list(values), dtype=float)
    return f"{v.mean():.3f} +- {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def section_markdown(data: dict, temps: list[str], seeds) -> str:
    """The results.md section: reward models, best-of-n, policies (when run)."""
    s = data["settings"]
    rm = data["reward_model"]
    lines = [
        "## Two-stage rows: reward model, then best-of-n / RLOO on it", "",
        f"Reward models initialised from pi_ref with a fresh scalar head, trained with `vrpo train-rm` on each seed's "
        f"labelled pairs and reference samples (the same as the one-stage DPO and VRPO (correct, oracle) rows: "
        f"oracle g), {rm['num_train_epochs']:g} epochs, lr {rm['learning_rate']:g}, batch "
        f"{rm['per_device_train_batch_size']}; seeds {', '.join(map(str, seeds))}. Held-out: "
        f"{data['num_eval_pairs']} pairs of pi_ref samples on the eval prompts, truth = the reviewers' exact p*; "
        f"accuracy = expected agreement with p* (ceiling, the Bayes rule: {data['rm_accuracy_ceiling']:.3f}). "
        f"Spread across seeds: variance of the unit-RMS margins z of the same pairs, and P(two seeds "
        f"disagree on the sign). Best-of-{s['best_of_n']}: gold score of the sample the reward model ranks first "
        f"(random pick: {data['pi_ref_gold_T1']:.3f}; the gold reward's own pick: "
        f"{data['best_of_n_gold_by_gold']:.3f}).", "",
        f"| reward model | base loss | K | accuracy vs p* (mean +- sd) | margin variance (unit RMS) | "
        f"P(seeds disagree) | best-of-{s['best_of_n']} gold (mean +- sd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in data["rows"].items():
        spread = r.get("reward_spread", {})
        lines.append(f"| {name} | {r['base_loss']} | {r['K'] or '-'} | {_mean_sd(r['rm_accuracy'].values())} | "
                     f"{spread.get('normalized_margin_variance', float('nan')):.3f} | "
                     f"{spread.get('sign_disagreement', float('nan')):.3f} | {_mean_sd(r['best_of_n_gold'].values())} |")
    with_policy = {n: r["policy"] for n, r in data["rows"].items() if "policy" in r}
    if with_policy:
        rl = s["rl"]
        lines += ["", f"Policies: TRL RLOO from pi_ref against each reward model (`vrpo.policy_stage.run_rl`), "
                  f"{s['rl_steps']} steps, {rl['batch_size']} completions per step ({rl['num_generations']} per prompt), "
                  f"lr {rl['learning_rate']:g}, beta {rl['beta']:g}; gold score at each temperature as in the table "
                  "above (mean +- sd over the seeds with a policy).", "",
                  "| policy on | " + " | ".join(f"T={float(t):g}" for t in temps) + " | KL |",
                  "|---|" + "---|" * (len(temps) + 1)]
        for name, pol in with_policy.items():
            cells = [_mean_sd(v[t] for v in pol["mean_score"].values()) for t in temps]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean_sd(pol['kl'].values())} |")
    else:
        lines += ["", "No RL in this preset (it would add minutes); `--preset paper` runs "
                  f"{SETTINGS['paper'].rl_steps} RLOO steps per (row, seed) and adds the policies' gold scores."]
    lines += ["", f"Two-stage wall time in this invocation: {data['seconds']:.0f} s.", ""]
    return "\n".join(lines)
