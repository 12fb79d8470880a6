"""DPO vs VRPO training in one regime: ``vrpo.train`` runs, evaluated under the regime's truth.

Methods (all sigmoid, beta, learning rate, epochs and batch of the preset; VRPO with the K
reference samples of the training data, K = 8 in quick and full):
- ``dpo``: the base estimator;
- ``vrpo-oracle``: VRPO with g = p* (the reviewer's exact preference);
- ``vrpo-fitted``: VRPO with the cross-fitted GPM (what a user without p* has).

Each (method, seed) leaves ``runs/METHOD/seedK/result.json``; a rerun skips it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

METHODS: dict[str, tuple[str, str]] = {  # name -> (vrpo.train method, auxiliary model of its data)
    "dpo": ("dpo", "oracle"),  # DPO reads only prompt/chosen/rejected
    "vrpo-oracle": ("vrpo", "oracle"),
    "vrpo-fitted": ("vrpo", "fitted"),
}


def train_config(world, preset, method: str, data_file: Path, folder: Path, seed: int):
    """The ``vrpo.train.VRPOConfig`` of one run (the IMDb experiment's settings; LoRA steps for SmolLM2)."""
    from vrpo.experiments.lm_regimes.presets import MAX_PROMPT_TOKENS
    from vrpo.train import VRPOConfig

    s = world.sizes
    lora = {"lora_r": world.lora_r, "max_steps": preset.scheduling_steps, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3} if world.lora_r else {"per_device_train_batch_size": preset.batch_size,
                                                         "learning_rate": preset.learning_rate}
    return VRPOConfig(
        model=str(world.policy_dir), data=str(data_file), out=str(folder / "model"), method=METHODS[method][0],
        base_loss="sigmoid", beta=preset.beta, num_ref_samples=s.train_ref_samples if METHODS[method][0] == "vrpo" else None,
        num_train_epochs=preset.num_train_epochs, seed=seed, warmup_steps=0, logging_steps=50, save_steps=10_000,
        save_total_limit=1, ref_batch_size=64, max_length=MAX_PROMPT_TOKENS + s.max_new_tokens + 1,
        max_prompt_length=MAX_PROMPT_TOKENS,
        cache_dir=str(folder.parent.parent.parent / "cache" / "ref-logps"),
        training_args={"use_cpu": True, "dataloader_num_workers": 0}, **lora)


def train_once(world, preset, method: str, data_file: Path, folder: Path, seed: int) -> Path:
    """Train (once: ``trained.json`` marks a finished run) and return the model folder."""
    from vrpo.experiments import run_log
    from vrpo.provenance import atomic_write_json
    from vrpo.train import train

    done = folder / "trained.json"
    if not done.exists():
        t0 = time.perf_counter()
        cfg = train_config(world, preset, method, data_file, folder, seed)
        with run_log(folder / "train.log"):  # the Trainer's dictionaries and bars go to the run's log, not the terminal
            train(cfg)
        atomic_write_json(done, {"seconds": time.perf_counter() - t0, "data": str(data_file)})
    return folder / "model"


def baseline_responses(world, folder: Path, temperature: float = 1.0, seed: int = 999) -> list[str]:
    """pi_ref's answers to the evaluation prompts (T = 1), the opponent of every win rate; cached."""
    from vrpo.evaluate import generate
    from vrpo.experiments.imdb.policy import load_policy
    from vrpo.provenance import atomic_write_json

    path = folder / "baseline_responses.json"
    if path.exists():
        return json.loads(path.read_text())
    model, tok = load_policy(world.policy_dir)
    _, _, texts = generate(model, tok, world.eval_prompts, temperature=temperature,
                           max_new_tokens=world.sizes.max_new_tokens, seed=seed)
    atomic_write_json(path, texts)
    return texts


def evaluate(world, regime, reviewer, model_dir: Path, baseline: list[str], seed: int, temperatures) -> dict:
    """Per temperature, per prompt: the truth metrics (``worlds.truth``); KL(pi || pi_ref) from T = 1 samples."""
    from vrpo.evaluate import completion_logps, generate
    from vrpo.experiments.imdb.policy import load_policy
    from vrpo.experiments.lm_regimes.worlds import truth

    model, tok = load_policy(model_dir)
    out: dict = {"metrics": {}, "examples": {}}
    prompts = world.eval_prompts
    for i, t in enumerate(temperatures):
        p_ids, c_ids, texts = generate(model, tok, prompts, temperature=t, max_new_tokens=world.sizes.max_new_tokens,
                                       seed=1_000 * seed + i)
        out["metrics"][str(float(t))] = {k: v.tolist() for k, v in truth(regime, reviewer, prompts, texts, baseline).items()}
        out["examples"][str(float(t))] = texts[:3]
        if float(t) == 1.0:
            ref_model, _ = load_policy(world.policy_dir)
            pad = tok.pad_token_id or 0
            kl = completion_logps(model, p_ids, c_ids, pad_token_id=pad) - completion_logps(ref_model, p_ids, c_ids,
                                                                                            pad_token_id=pad)
            out["kl"] = kl.tolist()  # per prompt; their mean is the KL estimate
    return out


def run_method(world, regime, reviewer, preset, method: str, seed: int, data_files: dict, folder: Path,
               baseline: list[str]) -> dict:
    """One (method, seed): train on the seed's data, evaluate; reuse ``result.json`` when present."""
    from vrpo.provenance import atomic_write_json

    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    model_dir = train_once(world, preset, method, data_files[METHODS[method][1]], folder, seed)
    result = {"method": method, "seed": seed,
              **evaluate(world, regime, reviewer, model_dir, baseline, seed, preset.eval_temperatures),
              "seconds": time.perf_counter() - t0}
    atomic_write_json(done, result)
    return result


def compare(results: dict, temperatures, n_boot: int) -> dict:
    """Per method: mean +- sd over seeds of each metric and KL; per VRPO method: the paired
    difference to DPO (same seed, same prompt) with a seed-and-prompt bootstrap 95% CI."""
    from vrpo.evaluate import mean_sd, seed_prompt_bootstrap_ci

    temps = [str(float(t)) for t in temperatures]
    table, diffs = {}, {}
    for method, by_seed in results.items():
        seeds = sorted(by_seed)
        row = {}
        for t in temps:
            for metric in by_seed[seeds[0]]["metrics"][t]:
                m, sd = mean_sd([np.mean(by_seed[s]["metrics"][t][metric]) for s in seeds])
                row[f"{metric}@T={t}"] = {"mean": m, "sd": sd}
        if "kl" in by_seed[seeds[0]]:
            m, sd = mean_sd([np.mean(by_seed[s]["kl"]) for s in seeds])
            row["kl"] = {"mean": m, "sd": sd}
        table[method] = dict(row, seeds=len(seeds))
    if "dpo" in results:
        for method in results:
            if method == "dpo" or sorted(results[method]) != sorted(results["dpo"]):
                continue
            seeds = sorted(results[method])
            per = {}
            for t in temps:
                for metric in results["dpo"][seeds[0]]["metrics"][t]:
                    d = np.array([np.asarray(results[method][s]["metrics"][t][metric]) -
                                  np.asarray(results["dpo"][s]["metrics"][t][metric]) for s in seeds])
                    lo, hi = seed_prompt_bootstrap_ci(d, np.mean, n_boot=n_boot)
                    per[f"{metric}@T={t}"] = {"diff": float(d.mean()), "ci": [lo, hi]}
            diffs[f"{method} - dpo"] = per
    return {"table": table, "paired": diffs}
