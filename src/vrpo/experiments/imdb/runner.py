"""One (method, seed) at a time: train with ``vrpo.train``, evaluate, cache the result.

Each finished (method, seed) leaves ``OUT/runs/<method>/seed<k>/result.json`` (written
atomically, last): a rerun skips it, so an interrupted experiment resumes where it stopped.
What a run's training prints (Trainer dictionaries, its own bars) goes to ``train.log``
beside it; the terminal shows one progress bar and one summary line per run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from vrpo.experiments.imdb.methods import MethodSpec


def run_dir(out: Path, spec: MethodSpec, seed: int) -> Path:
    return Path(out) / "runs" / spec.name / f"seed{seed}"


def train_config(setup, spec: MethodSpec, seed: int, data_file: Path, samples_dir: Path, folder: Path):
    """The ``vrpo.train.VRPOConfig`` of one row: the spec's method, loss, K, beta."""
    from vrpo.train import VRPOConfig

    p = setup.preset
    return VRPOConfig(
        model=str(setup.policy_dir), data=str(data_file), out=str(folder / "model"), method=spec.method,
        samples=str(samples_dir) if spec.num_ref_samples else None, base_loss=spec.base_loss,
        beta=spec.beta or p.beta, num_ref_samples=spec.num_ref_samples, learning_rate=p.learning_rate,
        num_train_epochs=p.num_train_epochs, per_device_train_batch_size=p.batch_size, seed=seed,
        # logging every 50 steps: the per-step dicts of ~30 short runs would bury the demo's table
        warmup_steps=0, logging_steps=50, save_steps=10_000, save_total_limit=1, ref_batch_size=64,
        # the tokenisation vrpo.sampling used for the stored log-probs (a re-tokenised sample
        # can be longer than the tokens generated): same limits, so nothing is truncated
        max_length=256 + p.max_new_tokens + 1, max_prompt_length=256,
        cache_dir=str(Path(setup.out) / "cache" / "ref-logps"),
        # the misspecified-pi_ref rows use samples of a tempered pi_ref ON PURPOSE; the
        # mismatch is recorded in the run's provenance instead of refused
        allow_reference_mismatch=spec.reference == "misspecified",
        training_args={"use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True},
    )


def evaluate_policy(setup, model, seed: int) -> dict:
    """Gold scores at each temperature (per eval prompt) and KL(pi || pi_ref) at T = 1."""
    from vrpo.evaluate import scores_at_temperatures

    p = setup.preset
    res = scores_at_temperatures(model, setup.tokenizer, setup.eval_prompts, setup.gold_score, p.temperatures,
                                 max_new_tokens=p.max_new_tokens, seed=1_000 * seed, ref_model=setup.model)
    kl = res.pop("kl", (0.0, 0.0))
    return {"scores": {str(t): r["scores"].tolist() for t, r in res.items()},
            "mean_score": {str(t): r["mean"] for t, r in res.items()},
            "kl": kl[0], "kl_se": kl[1], "examples": {str(t): r["texts"][:3] for t, r in res.items()}}


def run_one(setup, spec: MethodSpec, seed: int, data_files: dict, sample_dirs: dict) -> dict:
    """Train (unless SFT) and evaluate one (method, seed); reuse its result.json if present."""
    import time

    from vrpo.experiments import run_log
    from vrpo.provenance import atomic_write_json

    folder = run_dir(setup.out, spec, seed)
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    with run_log(folder / "train.log"):
        result = _train_and_evaluate(setup, spec, seed, data_files, sample_dirs, folder, time.perf_counter(),
                                     time.process_time())
    atomic_write_json(done, result)
    _drop_checkpoints(folder / "model")
    return result


def _train_and_evaluate(setup, spec: MethodSpec, seed: int, data_files: dict, sample_dirs: dict, folder: Path,
                        t0: float, c0: float) -> dict:
    import time

    model, provenance, train_s = setup.model, None, 0.0
    if spec.method is not None:
        from vrpo.experiments.imdb.policy import load_policy
        from vrpo.train import train

        key = (spec.reference, spec.aux or "oracle")
        cfg = train_config(setup, spec, seed, data_files[key], sample_dirs[f"refs-{spec.reference}"], folder)
        train(cfg)
        train_s = time.perf_counter() - t0
        model, _ = load_policy(cfg.out)
        provenance = json.loads((Path(cfg.out) / "manifests" / "provenance.json").read_text())
    result = {"method": spec.name, "seed": seed, **evaluate_policy(setup, model, seed),
              "train_seconds": train_s, "seconds": time.perf_counter() - t0,
              # CPU seconds of this process: on a shared machine a steadier cost measure than wall time
              "cpu_seconds": time.process_time() - c0,
              "allowed_mismatches": (provenance or {}).get("allowed_mismatches", [])}
    return result


def summary_line(spec: MethodSpec, seed: int, result: dict, folder: Path) -> str:
    """One line per finished run: its gold score at the lowest and highest temperature, KL, time."""
    scores = result["mean_score"]
    lo, hi = min(scores, key=float), max(scores, key=float)
    return (f"{spec.name} seed {seed}: gold score {scores[lo]:.3f} at T={float(lo):g}, {scores[hi]:.3f} at "
            f"T={float(hi):g}; KL {result['kl']:.2f}; {result['seconds']:.0f} s  (log: {folder / 'train.log'})")


def _drop_checkpoints(model_dir: Path) -> None:
    """The finished model is kept; intermediate Trainer checkpoints are not needed once result.json exists."""
    for ckpt in model_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)


def needed_files(specs) -> set[tuple[str, str]]:
    """(reference kind, aux kind) preference files the rows need; base methods read (correct, oracle)."""
    return {(s.reference, s.aux or "oracle") for s in specs if s.method is not None}


def run_all(setup, specs: list[MethodSpec], progress: bool = True) -> dict:
    """``{method: {seed: result}}`` over all rows and seeds, with one progress bar."""
    from tqdm.auto import tqdm

    from vrpo.experiments import run_log
    from vrpo.experiments.imdb.pipeline import draw_samples, write_preference_files

    sample_dirs = draw_samples(setup)
    results: dict = {s.name: {} for s in specs}
    jobs = [(spec, seed) for seed in setup.preset.seeds for spec in specs]
    bar = tqdm(jobs, desc="imdb: train + evaluate", unit="run", disable=not progress)
    files_by_seed: dict = {}
    for spec, seed in bar:
        bar.set_postfix_str(f"{spec.name} seed {seed}")
        if seed not in files_by_seed:
            with run_log(Path(setup.out) / "data" / f"seed{seed}.log"):  # reviewer labels, fitted g (its bar)
                files_by_seed[seed] = write_preference_files(setup, sample_dirs, seed, needed_files(specs))
        fresh = not (run_dir(setup.out, spec, seed) / "result.json").exists()
        results[spec.name][seed] = run_one(setup, spec, seed, files_by_seed[seed], sample_dirs)
        if fresh and progress:
            bar.write(summary_line(spec, seed, results[spec.name][seed], run_dir(setup.out, spec, seed)))
    return results

