"""``vrpo reproduce bandit``: the statistical testbed (docs/testbed.md).

Writes DIR/results.json, DIR/results.md (the paper's theory-table layout: settings x
{variance, MSE, suboptimality} with arrows and ratios; the exact-limit row and the
fraction-of-limit columns; the ablation rows), DIR/config.json (resolved arguments,
versions) and PNG plots (MSE and regret against n and against K). Each part is saved under
DIR/parts/ as it finishes, so a rerun with the same arguments resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SETTINGS = ["bt", "bt_flip", "mixture", "nonlinear", "cyclic", "mixture_wrong_ref", "bt_wrong_ref"]
AUX_CURVE_SETTINGS = ["nonlinear"]  # the learning curve of the fitted g (where g has something to learn)
MAIN_METHODS = [
    "base", "cdpo", "rdpo",
    "vrpo_oracle_k2", "vrpo_oracle_k4", "vrpo_oracle", "vrpo_oracle_k16", "vrpo_oracle_exact",
    "vrpo_oracle_optc", "vrpo_oracle_k2_optc", "vrpo_fitted", "vrpo_crossfit", "vrpo_wrong_aux",
    "ramp_dpo", "vrpo_ramp_oracle_k2", "vrpo_ramp_oracle", "vrpo_ramp_oracle_exact",
]
ONE_STAGE_METHODS = ["base", "vrpo_oracle_k2", "vrpo_oracle", "vrpo_oracle_exact", "vrpo_crossfit"]
SWEEP_METHODS = ["base", "vrpo_oracle_k2", "vrpo_oracle", "vrpo_oracle_exact"]
SWEEP_SETTINGS = ["bt", "mixture", "nonlinear"]
SWEEP_FACTORS = [0.25, 0.5, 2.0, 4.0]  # n-sweep: these multiples of --n (and --n itself)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import NONNEGATIVE_FLOAT, SEED, add_overwrite_flag

    parser.add_argument("--replicates", type=int, default=200,
                        help="simulated datasets per setting (default 200)")
    parser.add_argument("--n", type=int, default=400, help="labelled pairs per dataset (default 400)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of worlds and datasets (default 0)")
    parser.add_argument("--out", default="runs/bandit", help="output folder (default runs/bandit); rerun to resume")
    add_overwrite_flag(parser)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated settings (default all: {','.join(SETTINGS)})")
    parser.add_argument("--quick", action="store_true",
                        help="the demo's quick run: 60 replicates, no one-stage model, a short n-sweep (~1 min)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the n-sweep (MSE and regret against n)")
    parser.add_argument("--no-one-stage", action="store_true", help="skip the tabular DPO (one-stage) primary model")
    parser.add_argument("--ridge", type=NONNEGATIVE_FLOAT, default=1e-3,
                        help="ridge of the linear primary model's fits and target (default 1e-3; near 0 shows the "
                             "sigmoid control variate's divergent fits)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> dict:
    """The resolved configuration (what config.json records and parts are keyed by)."""
    if args.replicates < 2:
        raise ValueError(f"--replicates {args.replicates}: expected at least 2 (variance needs two datasets)")
    if args.n < 8:
        raise ValueError(f"--n {args.n}: expected at least 8 labelled pairs per dataset")
    if not args.ridge >= 0:
        raise ValueError(f"--ridge {args.ridge}: expected a non-negative number")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"--settings {args.settings!r}: unknown {bad or 'empty'}; expected a comma-separated subset of {SETTINGS}")
    replicates = min(args.replicates, 60) if args.quick else args.replicates
    return {
        "replicates": replicates, "n": args.n, "seed": args.seed, "settings": settings,
        "quick": bool(args.quick), "ridge": {"linear_bt": args.ridge, "tabular_dpo": 1e-2}, "max_k": 16,
        "one_stage": not (args.quick or args.no_one_stage),
        "aux_curve": [] if args.quick else [s for s in AUX_CURVE_SETTINGS if s in settings],
        "diagnostic_datasets": 5 if args.quick else 20,  # datasets the one-dataset diagnostic is repeated on
        "sweep": None if args.no_sweep else {
            "settings": [s for s in (["nonlinear"] if args.quick else SWEEP_SETTINGS) if s in settings],
            "n": sorted({max(8, int(round(args.n * f))) for f in ([0.5, 2.0] if args.quick else SWEEP_FACTORS)}),
            "replicates": min(replicates, 100), "methods": SWEEP_METHODS},
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(obj):
    """numpy arrays (per-replicate errors, kept in parts for paired bootstrap) -> lists."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


PART_VERSION = 2  # bump when a change of the code changes the numbers of a part


def _part(parts: Path, key: str, part_cfg: dict, compute):
    """Load a finished part computed with the same ``part_cfg`` or compute and save it."""
    path = parts / f"{key}.json"
    cfg_key = json.dumps({**part_cfg, "part_version": PART_VERSION}, sort_keys=True)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == cfg_key:
            return saved["result"]
    result = _jsonable(compute())
    _atomic_write(path, json.dumps({"config": cfg_key, "result": result}))
    return result


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from vrpo.simulate.experiment import run_setting, aux_learning_curve, ORACLE_K
    from vrpo.simulate.gradvar import gradient_variance
    from vrpo.simulate.report import write_plots, write_markdown, build_results
    from vrpo.simulate.world import make_world

    from vrpo.outputs import claim_output

    cfg = resolve(args)
    out = claim_output(args.out, "reproduce bandit", {**cfg, "part_version": PART_VERSION}, overwrite=args.overwrite)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    # the tensors are small: one thread is as fast, and far faster on a shared, busy machine
    torch.set_num_threads(1)
    R, n, seed = cfg["replicates"], cfg["n"], cfg["seed"]
    ridge, ridge_one = cfg["ridge"]["linear_bt"], cfg["ridge"]["tabular_dpo"]
    sweep = cfg["sweep"]
    total = len(cfg["settings"]) * (len(MAIN_METHODS) + (len(ONE_STAGE_METHODS) if cfg["one_stage"] else 0) + 1)
    if sweep:
        total += len(sweep["settings"]) * len(sweep["n"]) * len(SWEEP_METHODS)
    total += len(cfg["aux_curve"])
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="bandit fits", unit="fit", disable=args.no_progress)
    main, one_stage, grad_var, sweep_res, aux_curve = {}, {}, {}, {}, {}
    for name in cfg["settings"]:
        world = make_world(name, seed=seed)
        s_seed = seed * 1000 + SETTINGS.index(name)  # the same datasets for every method of a setting
        key = {"setting": name, "replicates": R, "n": n, "seed": s_seed}
        bar.set_postfix_str(name)
        main[name] = _part(parts, f"main_{name}", {**key, "ridge": ridge, "methods": MAIN_METHODS}, lambda: run_setting(
            world, R, n, MAIN_METHODS, ridge=ridge, seed=s_seed, progress=bar))
        grad_var[name] = _part(parts, f"gradvar_{name}", {**key, "ridge": ridge, "spread": cfg["diagnostic_datasets"]},
                               lambda: gradient_variance(world, R, n, seed=s_seed, ridge=ridge,
                                                         spread=cfg["diagnostic_datasets"]))
        bar.update(1)
        if cfg["one_stage"]:
            one_stage[name] = _part(parts, f"onestage_{name}", {**key, "ridge": ridge_one, "methods": ONE_STAGE_METHODS},
                                    lambda: run_setting(world, R, n, ONE_STAGE_METHODS, primary="tabular_dpo",
                                                        ridge=ridge_one, seed=s_seed, progress=bar))
    if sweep:
        for name in sweep["settings"]:
            world = make_world(name, seed=seed)
            s_seed = seed * 1000 + SETTINGS.index(name)
            for m in sweep["n"]:
                bar.set_postfix_str(f"{name} n={m}")
                key = {"setting": name, "replicates": sweep["replicates"], "n": m, "seed": s_seed + 7919 * m,
                       "ridge": ridge, "methods": SWEEP_METHODS}
                sweep_res.setdefault(name, {})[str(m)] = _part(parts, f"sweep_{name}_{m}", key, lambda: run_setting(
                    world, sweep["replicates"], m, SWEEP_METHODS, ridge=ridge, seed=s_seed + 7919 * m, progress=bar))
    for name in cfg["aux_curve"]:
        s_seed = seed * 1000 + SETTINGS.index(name)
        bar.set_postfix_str(f"{name} aux labels")
        aux_curve[name] = _part(parts, f"auxcurve_{name}", {"setting": name, "replicates": R, "n": n, "seed": s_seed,
                                                            "ridge": ridge}, lambda: aux_learning_curve(
            make_world(name, seed=seed), R, n, seed=s_seed, ridge=ridge))
        bar.update(1)
    bar.close()
    results = build_results(cfg, main, one_stage, grad_var, sweep_res, ORACLE_K, aux_curve)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    _atomic_write(out / "results.json", json.dumps(results, indent=1))
    _atomic_write(out / "config.json", json.dumps({**cfg, "versions": _versions(), "command": _command(args)}, indent=1))
    md = write_markdown(results)
    _atomic_write(out / "results.md", md)
    write_plots(results, out)
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and plots in {results['seconds']:.0f} s")
    return 0


def _command(args) -> str:
    parts = ["vrpo reproduce bandit", f"--replicates {args.replicates}", f"--n {args.n}", f"--seed {args.seed}",
             f"--out {args.out}"]
    if args.quick:
        parts.append("--quick")
    if args.ridge != 1e-3:
        parts.append(f"--ridge {args.ridge:g}")
    return " ".join(parts)


def _versions() -> dict:
    import numpy
    import torch

    import vrpo

    return {"vrpo": vrpo.__version__, "torch": torch.__version__, "numpy": numpy.__version__}
