"""Two-stage VRPO against a KNOWN, non-Bradley-Terry truth: bt vs vrpo reward models over seeds,
then TRL RLOO policies on them, judged by the truth; optionally over several independent draws
of the whole pipeline. The figures of docs/two_stage.md.

    .venv/bin/python benchmarks/two_stage_known_truth.py [--out runs/two-stage-known-truth]
        [--seeds 0,1,2,3,4,5,6,7] [--rl-seeds 0,1,2,3] [--rl-steps 40] [--rows bt,vrpo,bt-ramp,vrpo-ramp]
        [--draws 0] [--threads 1] [--cache OUT/cache]

Built through the IMDb experiment's setup API (``vrpo.experiments.imdb``, quick preset): its
pi_ref (a tiny GPT pre-trained on IMDb reviews), its pool of prompts with one pair of pi_ref
samples and K = 4 reference samples each (``pipeline.draw_samples``), the same 256-prompt
subset per seed as the IMDb rows, and held-out pairs of pi_ref samples on its eval prompts.
Only the preference is replaced by one whose truth is known in closed form, with n = the
response's word count:

    p*(a > b) = 0.5 sigmoid(0.5 (n_a - n_b)) + 0.5 (0.5 + 0.45 sign(n_a - n_b))

(a graded and a thresholded reviewer: monotone in n_a - n_b but not logistic-linear, so no
reward r gives p* = sigmoid(r(a) - r(b)): Bradley-Terry is misspecified). Labels ~ Bernoulli(p*),
a fresh draw per seed; g = p* (oracle auxiliary model). Reward models: 4 epochs, lr 1e-3,
batch 16, initialised from pi_ref with a fresh head. Policies: RLOO from pi_ref on the pool
prompts; judged by the mean p* of one policy sample (T = 1) against one pi_ref sample per
eval prompt. Resumable: finished reward models and policies are reused.

A **draw** d is one independent run of the whole pipeline: pi_ref pre-trained with seed d,
its samples, the labels and the prompt subsets (draw 0 is the single-draw default). Seeds
vary the labels, the prompt subset and the training seed within a draw. pi_ref is
pre-trained in the benchmark's own cache (``--cache``, default OUT/cache) with
``--pretrain-threads`` (default ``--threads``) torch threads: the same seed pre-trained with
another thread count (the IMDb demo uses min(cores, 4)) is a different pi_ref and gives other
figures (docs/two_stage.md, "Which pi_ref").
Writes OUT/draw<d>/ (runs), OUT/summary.json and OUT/summary.md (the tables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROWS = {"bt": {"method": "bt"}, "vrpo": {"method": "vrpo", "num_ref_samples": 4},
        "bt-ramp": {"method": "bt", "base_loss": "ramp"},
        "vrpo-ramp": {"method": "vrpo", "base_loss": "ramp", "num_ref_samples": 4}}


def words(texts) -> np.ndarray:
    return np.array([len(t.split()) for t in texts], dtype=float)


def p_star(a, b) -> np.ndarray:
    """The known truth P(a > b) from word counts (antisymmetric: p*(a, b) + p*(b, a) = 1)."""
    d = words(a) - words(b)
    return 0.5 / (1 + np.exp(-0.5 * d)) + 0.5 * (0.5 + 0.45 * np.sign(d))


def label_seed(draw: int, seed: int) -> int:
    """Seed of the labels of (draw, seed); draw 0 keeps the single-draw benchmark's seeds."""
    return 100 + seed + 1_000_003 * draw


def preference_file(setup, sample_dirs: dict, seed: int, folder: Path, draw: int = 0) -> str:
    """Seed ``seed``'s labelled pairs (the IMDb rows' prompt subset, labels ~ p*) with g = p*."""
    from vrpo.provenance import atomic_write_text
    from vrpo.sampling import read_samples

    path = folder / f"seed{seed}.jsonl"
    if path.exists():
        return str(path)
    pool = read_samples(sample_dirs["pairs"])
    refs = {r["prompt_id"]: list(r["samples"]) for r in read_samples(sample_dirs["refs-correct"])}
    pick = np.random.default_rng(10_000 + seed + 1_000_003 * draw).choice(
        len(pool), size=setup.preset.num_train_pairs, replace=False)
    rows = [pool[i] for i in sorted(pick)]  # draw 0: the subset pipeline.labelled_pairs draws for this seed
    a, b = [r["samples"][0] for r in rows], [r["samples"][1] for r in rows]
    a_wins = np.random.default_rng(label_seed(draw, seed)).random(len(rows)) < p_star(a, b)
    lines = []
    for r, ya, yb, w in zip(rows, a, b, a_wins):
        chosen, rejected = (ya, yb) if w else (yb, ya)
        ys = refs[r["prompt_id"]]
        mat = [[0.5 if j == k else float(p_star([ys[j]], [ys[k]])[0]) for k in range(len(ys))] for j in range(len(ys))]
        lines.append(json.dumps({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": chosen,
                                 "rejected": rejected, "aux_prob": float(p_star([chosen], [rejected])[0]),
                                 "ref_samples": ys, "ref_aux_prob": mat}))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return str(path)


def paired(rows: dict, a: str, b: str, key) -> dict:
    """vrpo - bt per seed: mean, standard error, number of seeds where the difference is > 0."""
    seeds = sorted(set(rows[a]) & set(rows[b]))
    d = np.array([key(rows[a][s]) - key(rows[b][s]) for s in seeds])
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "positive": int((d > 0).sum()), "seeds": len(d)}


PAIRS = (("vrpo", "bt"), ("vrpo-ramp", "bt-ramp"))


def run_draw(args, draw: int, out: Path, rows: list, seeds: tuple, rl_seeds: tuple) -> dict:
    """One draw of the whole pipeline: pi_ref (pre-trained with seed ``draw``), samples,
    labels; reward models over ``seeds``; RLOO policies for ``rl_seeds``. Returns its report."""
    from dataclasses import replace

    import torch

    from vrpo.evaluate import generate
    from vrpo.experiments.imdb.pipeline import Setup, draw_samples
    from vrpo.experiments.imdb.policy import load_policy
    from vrpo.experiments.imdb.presets import get_preset
    from vrpo.experiments.imdb.two_stage import eval_candidates
    from vrpo.policy_stage import RLConfig, run_rl
    from vrpo.provenance import atomic_write_json
    from vrpo.train.reward_two_stage import EvalPairs, TwoStageSpec, run_two_stage

    t0 = time.perf_counter()
    progress = not args.no_progress
    preset = get_preset("quick")
    preset = replace(preset, policy=replace(preset.policy, seed=draw))
    torch.set_num_threads(args.pretrain_threads or args.threads)  # pi_ref depends on it (docstring)
    setup = Setup(preset, out / "imdb", progress)
    torch.set_num_threads(args.threads)
    sample_dirs = draw_samples(setup)
    prompts, candidates = eval_candidates(setup, out / "eval", 4)
    a, b, ref_y = [c[0] for c in candidates], [c[1] for c in candidates], [c[2] for c in candidates]
    pairs = EvalPairs(prompts, a, b, true_prob=p_star(a, b))
    spec = TwoStageSpec(
        rows={r: ROWS[r] for r in rows}, seeds=seeds,
        reward_model=dict(learning_rate=1e-3, num_train_epochs=4, per_device_train_batch_size=16,
                          max_length=281, max_prompt_length=256, logging_steps=50, save_steps=10_000,
                          training_args={"disable_tqdm": True, "use_cpu": True, "dataloader_num_workers": 0}))
    res = run_two_stage(spec, base_model=str(setup.policy_dir), out=out / "reward_models",
                        data_for_seed=lambda s: preference_file(setup, sample_dirs, s, out / "data", draw),
                        eval_pairs=pairs, progress=progress)
    report = {"draw": draw, "pi_ref": {"folder": str(setup.policy_dir)},
              "rm_accuracy_ceiling": float(np.mean(np.maximum(pairs.true_prob, 1 - pairs.true_prob))),
              "reward_models": {r: {k: v for k, v in res[r].items() if k != "seeds"} for r in rows},
              "rm_accuracy_by_seed": {r: {s: res[r]["seeds"][s]["rm_accuracy"] for s in seeds} for r in rows},
              "reward_model_seconds": time.perf_counter() - t0}
    acc = report["rm_accuracy_by_seed"]
    report["rm_accuracy_vrpo_minus_bt"] = {f"{v} - {b_}": paired(acc, v, b_, float) for v, b_ in PAIRS
                                           if v in rows and b_ in rows}

    def judge(model_dir, seed):
        model, tok = load_policy(model_dir)
        _, _, ys = generate(model, tok, prompts, temperature=1.0, max_new_tokens=setup.preset.max_new_tokens, seed=seed)
        return {"p_star_vs_pi_ref": float(np.mean(p_star(ys, ref_y))), "mean_words": float(words(ys).mean())}

    if rl_seeds:
        report["pi_ref"].update(judge(setup.policy_dir, 0))
        policies: dict = {r: {} for r in rows}
        for r in rows:
            for s in rl_seeds:
                t = time.perf_counter()
                folder = out / "policies" / r / f"seed{s}"
                done = folder / "judged.json"
                if done.exists():
                    policies[r][s] = json.loads(done.read_text())
                    continue
                d = run_rl(RLConfig(model=str(setup.policy_dir), reward_model=res[r]["seeds"][s]["reward_model"],
                                    prompts=str(setup.out / "data" / "prompts.jsonl"), out=str(folder),
                                    max_steps=args.rl_steps, num_generations=4, batch_size=16,
                                    max_completion_length=setup.preset.max_new_tokens, learning_rate=3e-4, beta=0.05,
                                    seed=s, save_steps=10_000, logging_steps=10, engine_args={"disable_tqdm": True}))
                policies[r][s] = {**judge(d, s), "seconds": time.perf_counter() - t}
                atomic_write_json(done, policies[r][s])
                print(f"draw {draw} policy {r} seed {s}: {policies[r][s]}", file=sys.stderr, flush=True)
        report["policies"] = {
            r: {"p_star_vs_pi_ref_mean": float(np.mean([p["p_star_vs_pi_ref"] for p in by.values()])),
                "p_star_vs_pi_ref_sd": float(np.std([p["p_star_vs_pi_ref"] for p in by.values()], ddof=1))
                if len(by) > 1 else 0.0,
                "mean_words": float(np.mean([p["mean_words"] for p in by.values()])), "by_seed": by}
            for r, by in policies.items()}
        win = {r: {s: p["p_star_vs_pi_ref"] for s, p in by.items()} for r, by in policies.items()}
        report["policy_vrpo_minus_bt"] = {f"{v} - {b_}": paired(win, v, b_, float) for v, b_ in PAIRS
                                          if v in rows and b_ in rows}
    report["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", report)
    return report


def across_draws(reports: dict) -> dict:
    """What holds over independent draws of the pipeline: per comparison, the per-draw paired
    differences (mean over seeds), their mean and standard error over draws (the draws are
    the independent units), and the ratio of the seed sd of vrpo's accuracy to bt's."""
    out = {}
    for key in ("rm_accuracy_vrpo_minus_bt", "policy_vrpo_minus_bt"):
        comps = {c for r in reports.values() for c in r.get(key, {})}
        out[key] = {}
        for c in sorted(comps):
            d = np.array([r[key][c]["mean"] for r in reports.values() if c in r.get(key, {})])
            out[key][c] = {"by_draw": [float(x) for x in d], "mean": float(d.mean()),
                           "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
                           "positive_draws": int((d > 0).sum()), "draws": len(d)}
    out["seed_sd_ratio"] = {}
    for v, b_ in PAIRS:
        ratios = [r["reward_models"][v]["rm_accuracy_sd"] / r["reward_models"][b_]["rm_accuracy_sd"]
                  for r in reports.values() if v in r["reward_models"] and b_ in r["reward_models"]
                  and r["reward_models"][b_]["rm_accuracy_sd"] > 0]
        if ratios:
            out["seed_sd_ratio"][f"{v} / {b_}"] = {"by_draw": ratios, "median": float(np.median(ratios)),
                                                    "below_one": int(sum(x < 1 for x in ratios)), "draws": len(ratios)}
    return out


def _pm(mean: float, se: float) -> str:
    return f"{mean:+.3f} (se {se:.3f})"


def summary_markdown(reports: dict, across: dict, command: str) -> str:
    """The tables of docs/two_stage.md, per draw and across draws."""
    L = [f"# Two-stage VRPO against a known truth", "", f"Printed by `{command}`.", ""]
    for d, r in reports.items():
        rms = r["reward_models"]
        L += [f"## Draw {d}: reward models", "",
              f"Accuracy vs p* on {len(next(iter(r['rm_accuracy_by_seed'].values())))} seeds; ceiling "
              f"{r['rm_accuracy_ceiling']:.3f}.", "",
              "| reward model | accuracy vs p* (mean, sd over seeds) | margin variance across seeds (unit-RMS margins) | "
              "P(two seeds disagree on a pair) |", "|---|---|---|---|"]
        for row, m in rms.items():
            sp = m.get("reward_spread", {})
            L.append(f"| {ROW_LABELS[row]} | {m['rm_accuracy_mean']:.3f} ({m['rm_accuracy_sd']:.3f}) | "
                     f"{sp.get('normalized_margin_variance', float('nan')):.3f} | {sp.get('sign_disagreement', float('nan')):.3f} |")
        L += [""] + [f"- {c} accuracy, paired by seed: {_pm(x['mean'], x['se'])}, higher on {x['positive']} of "
                     f"{x['seeds']} seeds" for c, x in r["rm_accuracy_vrpo_minus_bt"].items()]
        if "policies" in r:
            L += ["", f"## Draw {d}: RLOO policies", "",
                  f"pi_ref against itself: {r['pi_ref']['p_star_vs_pi_ref']:.3f}; mean words "
                  f"{r['pi_ref']['mean_words']:.1f}.", "",
                  "| policy optimised against | P*(policy sample beats pi_ref sample), mean (sd) over seeds | words |",
                  "|---|---|---|"]
            for row, p in r["policies"].items():
                L.append(f"| {ROW_LABELS[row]} | {p['p_star_vs_pi_ref_mean']:.3f} ({p['p_star_vs_pi_ref_sd']:.3f}) | "
                         f"{p['mean_words']:.1f} |")
            L += [""] + [f"- {c}, paired by seed: {_pm(x['mean'], x['se'])}, higher on {x['positive']} of "
                         f"{x['seeds']} seeds" for c, x in r["policy_vrpo_minus_bt"].items()]
        L.append("")
    if len(reports) > 1:
        L += ["## Across draws of the whole pipeline", "",
              "Per draw, the paired difference averaged over its seeds; then the mean over draws and its standard "
              "error over draws (each draw: its own pi_ref, samples, labels).", "",
              "| comparison | per draw | mean over draws (se) | draws with vrpo higher |", "|---|---|---|---|"]
        for key, what in (("rm_accuracy_vrpo_minus_bt", "reward-model accuracy"), ("policy_vrpo_minus_bt", "policy P*")):
            for c, x in across[key].items():
                L.append(f"| {what}: {c} | {' '.join(f'{v:+.3f}' for v in x['by_draw'])} | {_pm(x['mean'], x['se'])} | "
                         f"{x['positive_draws']} of {x['draws']} |")
        L += ["", "| seed sd of accuracy | per draw | median | draws below 1 |", "|---|---|---|---|"]
        for c, x in across["seed_sd_ratio"].items():
            L.append(f"| {c} | {' '.join(f'{v:.2f}' for v in x['by_draw'])} | {x['median']:.2f} | "
                     f"{x['below_one']} of {x['draws']} |")
        L.append("")
    return "\n".join(L)


ROW_LABELS = {"bt": "bt (sigmoid)", "vrpo": "vrpo (sigmoid)", "bt-ramp": "bt (ramp)", "vrpo-ramp": "vrpo (ramp)"}


def _ints(text: str, flag: str) -> tuple:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/two-stage-known-truth")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="reward-model seeds")
    parser.add_argument("--rl-seeds", default="0,1,2,3", help="seeds that get an RLOO policy ('' for none)")
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--draws", default="0", help="independent draws of the whole pipeline (pi_ref seed, samples, "
                        "labels), e.g. 0,1,2,3 (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for pre-training pi_ref and for "
                        "training (1: robust on a shared 2-core machine; another count gives another pi_ref)")
    parser.add_argument("--pretrain-threads", type=int, default=None, help="torch threads for pre-training pi_ref "
                        "(default --threads; the IMDb demo pre-trains with min(cores, 4))")
    parser.add_argument("--cache", default=None, help="pi_ref cache of this benchmark (default OUT/cache)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"--rows: unknown row {bad[0]!r}; expected names from {list(ROWS)}")
    seeds, rl_seeds, draws = _ints(args.seeds, "--seeds"), _ints(args.rl_seeds, "--rl-seeds"), _ints(args.draws, "--draws")
    if not seeds or not draws:
        raise ValueError("--seeds and --draws: expected at least one value each")
    if not set(rl_seeds) <= set(seeds):
        raise ValueError(f"--rl-seeds {args.rl_seeds}: expected seeds from --seeds {args.seeds}")
    if args.rl_steps < 1 and rl_seeds:
        raise ValueError(f"--rl-steps {args.rl_steps}: expected at least 1 (or --rl-seeds '')")
    if args.threads < 1 or (args.pretrain_threads is not None and args.pretrain_threads < 1):
        raise ValueError(f"--threads {args.threads} / --pretrain-threads {args.pretrain_threads}: expected at least 1")

    import torch
    from transformers.utils import logging as hf_logging

    from vrpo.provenance import atomic_write_json, atomic_write_text

    hf_logging.set_verbosity_error()  # weight-loading reports and padding hints would bury the summary
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    # the benchmark's own pi_ref cache, read by vrpo.experiments.imdb.policy.cache_dir
    os.environ["VRPO_CACHE"] = str(Path(args.cache) if args.cache else out / "cache")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    command = "python benchmarks/two_stage_known_truth.py " + " ".join(argv if argv is not None else sys.argv[1:])
    reports = {d: run_draw(args, d, out / f"draw{d}", rows, seeds, rl_seeds) for d in draws}
    across = across_draws(reports) if len(reports) > 1 else {}
    summary = {"command": command.strip(), "threads": args.threads, "draws": reports, "across_draws": across,
               "seconds": time.perf_counter() - t0}
    atomic_write_json(out / "summary.json", summary)
    markdown = summary_markdown(reports, across, command.strip())
    atomic_write_text(out / "summary.md", markdown)
    print(markdown)
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'} in {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as e:  # bad flags: one line, no traceback
        raise SystemExit(f"two_stage_known_truth: error: {e}") from None
