"""Two-stage VRPO against a KNOWN, non-Bradley-Terry truth: bt vs vrpo reward models over seeds,
then TRL RLOO policies on them, judged by the truth. The figures of docs/two_stage.md.

    .venv/bin/python benchmarks/two_stage_known_truth.py [--out runs/two-stage-known-truth]
        [--seeds 0,1,2,3,4,5,6,7] [--rl-seeds 0,1,2,3] [--rl-steps 40] [--rows bt,vrpo,bt-ramp,vrpo-ramp]

Built through the IMDb experiment's setup API (``vrpo.experiments.imdb``, quick preset): its
pi_ref (the cached tiny GPT), its pool of prompts with one pair of pi_ref samples and K = 4
reference samples each (``pipeline.draw_samples``), the same 256-prompt subset per seed as
the IMDb rows, and held-out pairs of pi_ref samples on its eval prompts. Only the preference
is replaced by one whose truth is known in closed form, with n = the response's word count:

    p*(a > b) = 0.5 sigmoid(0.5 (n_a - n_b)) + 0.5 (0.5 + 0.45 sign(n_a - n_b))

(a graded and a thresholded reviewer: monotone in n_a - n_b but not logistic-linear, so no
reward r gives p* = sigmoid(r(a) - r(b)): Bradley-Terry is misspecified). Labels ~ Bernoulli(p*),
a fresh draw per seed; g = p* (oracle auxiliary model). Reward models: 4 epochs, lr 1e-3,
batch 16, initialised from pi_ref with a fresh head. Policies: RLOO from pi_ref on the pool
prompts; judged by the mean p* of one policy sample (T = 1) against one pi_ref sample per
eval prompt. Resumable: finished reward models and policies are reused.
"""
from __future__ import annotations

import argparse
import json
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


def preference_file(setup, sample_dirs: dict, seed: int, folder: Path) -> str:
    """Seed ``seed``'s labelled pairs (the IMDb rows' prompt subset, labels ~ p*) with g = p*."""
    from vrpo.provenance import atomic_write_text
    from vrpo.sampling import read_samples

    path = folder / f"seed{seed}.jsonl"
    if path.exists():
        return str(path)
    pool = read_samples(sample_dirs["pairs"])
    refs = {r["prompt_id"]: list(r["samples"]) for r in read_samples(sample_dirs["refs-correct"])}
    pick = np.random.default_rng(10_000 + seed).choice(len(pool), size=setup.preset.num_train_pairs, replace=False)
    rows = [pool[i] for i in sorted(pick)]  # the subset pipeline.labelled_pairs draws for this seed
    a, b = [r["samples"][0] for r in rows], [r["samples"][1] for r in rows]
    a_wins = np.random.default_rng(100 + seed).random(len(rows)) < p_star(a, b)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/two-stage-known-truth")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="reward-model seeds")
    parser.add_argument("--rl-seeds", default="0,1,2,3", help="seeds that get an RLOO policy ('' for none)")
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared 2-core machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"--rows: unknown row {bad[0]!r}; expected names from {list(ROWS)}")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    rl_seeds = tuple(int(s) for s in args.rl_seeds.split(",") if s.strip())
    if not set(rl_seeds) <= set(seeds):
        raise ValueError(f"--rl-seeds {args.rl_seeds}: expected seeds from --seeds {args.seeds}")
    if args.rl_steps < 1 and rl_seeds:
        raise ValueError(f"--rl-steps {args.rl_steps}: expected at least 1 (or --rl-seeds '')")

    import torch
    from transformers.utils import logging as hf_logging

    from vrpo.evaluate import generate
    from vrpo.experiments.imdb.pipeline import Setup, draw_samples
    from vrpo.experiments.imdb.policy import load_policy
    from vrpo.experiments.imdb.presets import get_preset
    from vrpo.experiments.imdb.two_stage import eval_candidates
    from vrpo.policy_stage import RLConfig, run_rl
    from vrpo.provenance import atomic_write_json
    from vrpo.train.reward_two_stage import EvalPairs, TwoStageSpec, run_two_stage

    hf_logging.set_verbosity_error()  # weight-loading reports and padding hints would bury the summary
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    progress = not args.no_progress
    setup = Setup(get_preset("quick"), out / "imdb", progress)
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
                        data_for_seed=lambda s: preference_file(setup, sample_dirs, s, out / "data"),
                        eval_pairs=pairs, progress=progress)
    rm_seconds = time.perf_counter() - t0
    report = {"command": "python benchmarks/two_stage_known_truth.py " + " ".join(argv or sys.argv[1:]),
              "rm_accuracy_ceiling": float(np.mean(np.maximum(pairs.true_prob, 1 - pairs.true_prob))),
              "reward_models": {r: {k: v for k, v in res[r].items() if k != "seeds"} for r in rows},
              "reward_model_seconds": rm_seconds}
    acc = {r: {s: res[r]["seeds"][s]["rm_accuracy"] for s in seeds} for r in rows}
    report["rm_accuracy_vrpo_minus_bt"] = {
        f"{v} - {b_}": paired(acc, v, b_, float) for v, b_ in (("vrpo", "bt"), ("vrpo-ramp", "bt-ramp"))
        if v in rows and b_ in rows}

    def judge(model_dir, seed):
        model, tok = load_policy(model_dir)
        _, _, ys = generate(model, tok, prompts, temperature=1.0, max_new_tokens=setup.preset.max_new_tokens, seed=seed)
        return {"p_star_vs_pi_ref": float(np.mean(p_star(ys, ref_y))), "mean_words": float(words(ys).mean())}

    if rl_seeds:
        report["pi_ref"] = judge(setup.policy_dir, 0)
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
                                    seed=s, save_steps=10_000, logging_steps=10, engine_args={"disable_tqdm": True}),
                           resume=True)
                policies[r][s] = {**judge(d, s), "seconds": time.perf_counter() - t}
                atomic_write_json(done, policies[r][s])
                print(f"policy {r} seed {s}: {policies[r][s]}", file=sys.stderr, flush=True)
        report["policies"] = {
            r: {"p_star_vs_pi_ref_mean": float(np.mean([p["p_star_vs_pi_ref"] for p in by.values()])),
                "p_star_vs_pi_ref_sd": float(np.std([p["p_star_vs_pi_ref"] for p in by.values()], ddof=1))
                if len(by) > 1 else 0.0,
                "mean_words": float(np.mean([p["mean_words"] for p in by.values()])), "by_seed": by}
            for r, by in policies.items()}
        win = {r: {s: p["p_star_vs_pi_ref"] for s, p in by.items()} for r, by in policies.items()}
        report["policy_vrpo_minus_bt"] = {
            f"{v} - {b_}": paired(win, v, b_, float) for v, b_ in (("vrpo", "bt"), ("vrpo-ramp", "bt-ramp"))
            if v in rows and b_ in rows}
    report["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", report)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as e:  # bad flags: one line, no traceback
        raise SystemExit(f"two_stage_known_truth: error: {e}") from None
