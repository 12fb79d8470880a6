"""The experiment, top to bottom: per world, the shared samples; per regime, the data, the
checkpoint, the prediction and the measurement; then training in the extreme regimes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vrpo.experiments.lm_regimes import stages
from vrpo.experiments.lm_regimes.presets import KS
from vrpo.experiments.lm_regimes.training import METHODS, baseline_responses, compare, run_method, train_once
from vrpo.experiments.lm_regimes.worlds import WORLDS, get_regimes

MEASURE_SEED = 30_000  # labels of the fresh datasets (independent of every training seed's)
DIAGNOSTIC_SEED = 20_000  # labels of the diagnostic's dataset


class Experiment:
    def __init__(self, preset, out: Path, progress: bool = True, scheduling_model: str | None = None):
        self.preset, self.out, self.progress = preset, Path(out), progress
        self.scheduling_model = scheduling_model
        self.regimes = get_regimes(preset.regimes)

    def run(self) -> dict:
        """IMDb first: its regimes are measured, then the training comparison runs in the chosen
        ones, before the (slow) SmolLM2 world; ``results.partial.json`` holds what is done so
        far after every stage (the finished stages are reused by a rerun)."""
        results: dict = {"preset": self.preset.name, "regimes": {}, "training_regimes": []}
        names = sorted(dict.fromkeys(r.world for r in self.regimes), key=lambda w: w != "imdb")
        for world_name in names:
            world = WORLDS[world_name](self.preset, self.out / world_name, self.progress, self.scheduling_model)
            for regime in (r for r in self.regimes if r.world == world_name):
                results["regimes"][regime.name] = RegimeRun(self, world, regime).predict_and_measure()
                self.save_partial(results)
            if world_name == "imdb":
                results["training_regimes"] = self.training_regimes(results["regimes"])
                for name in results["training_regimes"]:
                    regime = next(r for r in self.regimes if r.name == name)
                    results["regimes"][name]["training"] = RegimeRun(self, world, regime).train_and_compare()
                    self.save_partial(results)
        return results

    def save_partial(self, results: dict) -> None:
        from vrpo.provenance import atomic_write_json

        atomic_write_json(self.out / "results.partial.json", results)

    def training_regimes(self, by_regime: dict) -> list[str]:
        """The IMDb regimes with the largest and the smallest predicted gain at K = 8 (training
        SmolLM2 over seeds is the scheduling experiment's job, docs/scheduling.md)."""
        imdb = {n: r["predicted_ratio"]["8"] for n, r in by_regime.items() if r["world"] == "imdb" and "8" in r["predicted_ratio"]}
        if not imdb or not self.preset.seeds:
            return []
        largest_gain = min(imdb, key=imdb.get)  # the smallest predicted ratio
        if self.preset.train_regimes == "largest":
            return [largest_gain]
        return list(dict.fromkeys([largest_gain, max(imdb, key=imdb.get)]))


class RegimeRun:
    """One regime of one world: its folder is OUT/WORLD/REGIME."""

    def __init__(self, exp: Experiment, world, regime):
        self.exp, self.world, self.regime, self.preset = exp, world, regime, exp.preset
        self.folder = exp.out / world.name / regime.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.reviewer = regime.reviewer(world)

    # ---- data ------------------------------------------------------------------------
    def seed_samples(self, seed: int) -> list[dict]:
        s = self.world.sizes
        return stages.draw_samples(self.world, self.exp.out / self.world.name / "samples" / f"seed{seed}",
                                   self.world.pool_prompts, 2 + s.train_ref_samples, seed=100 + seed,
                                   progress=self.exp.progress)

    def seed_data(self, seed: int, kinds=("oracle",)) -> tuple[dict, dict]:
        """(examples, {aux kind: preference file}) of one seed: the labelled pairs of the seed's data."""
        s = self.world.sizes
        ex = stages.labelled_examples(self.reviewer, self.seed_samples(seed), s.num_train_pairs, s.train_ref_samples,
                                      np.random.default_rng(10_000 + seed))
        return ex, self.data_files(ex, f"seed{seed}", seed, kinds)

    def diagnostic_data(self, kinds=("oracle",)) -> tuple[dict, dict]:
        """The ONE dataset the diagnostic reads, as a user would have it: labelled pairs with K
        reference samples on prompts that neither the checkpoint nor any training run saw."""
        s = self.world.sizes
        rows = stages.draw_samples(self.world, self.exp.out / self.world.name / "samples" / "diagnostic",
                                   self.world.diagnostic_prompts, 2 + s.train_ref_samples, seed=200,
                                   progress=self.exp.progress)
        ex = stages.labelled_examples(self.reviewer, rows, len(rows), s.train_ref_samples,
                                      np.random.default_rng(DIAGNOSTIC_SEED))
        return ex, self.data_files(ex, "diagnostic", 0, kinds)

    def data_files(self, ex: dict, name: str, seed: int, kinds) -> dict:
        files = {}
        for kind in kinds:
            path = self.folder / "data" / f"{name}-{kind}.jsonl"
            if not path.exists():
                aux = self.aux(kind, ex, seed)
                stages.write_rows(path, stages.preference_rows(ex, *aux))
            files[kind] = path
        return files

    def aux(self, kind: str, ex: dict, seed: int) -> tuple:
        if kind == "oracle":
            return stages.oracle_aux(self.reviewer, ex)
        return stages.fitted_aux(self.world, self.reviewer, ex, seed, self.preset, self.exp.progress)

    def read_aux(self, path: Path, n: int) -> tuple:
        import json

        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        return np.array([r["aux_prob"] for r in rows]), np.array([r["ref_aux_prob"] for r in rows])

    def measurement_examples(self) -> dict:
        s = self.world.sizes
        rows = stages.draw_samples(self.world, self.exp.out / self.world.name / "samples" / "measure",
                                   self.world.measure_prompts, s.measure_repeats * (2 + s.measure_ref_samples), seed=7,
                                   progress=self.exp.progress)
        n = len(rows) * s.measure_repeats
        return stages.labelled_examples(self.reviewer, rows, n, s.measure_ref_samples,
                                        np.random.default_rng(MEASURE_SEED), repeats=s.measure_repeats)

    # ---- checkpoints -----------------------------------------------------------------
    def dpo_checkpoint(self) -> Path:
        _, files = self.seed_data(0)
        return train_once(self.world, self.preset, "dpo", files["oracle"], self.folder / "runs" / "dpo" / "seed0", 0)

    def checkpoint(self, key: str):
        """(loader, table key): ``dpo`` = seed 0's DPO run (its folder holds beta, pi_ref, the
        LoRA adapter); ``pi_ref`` = the reference model, all margins 0 (shared by the regimes)."""
        from vrpo.loss_gradients import load_checkpoint

        if key == "dpo":
            path = self.dpo_checkpoint()
            return (lambda: load_checkpoint(str(path))), f"{self.regime.name}-dpo"
        return (lambda: load_checkpoint(str(self.world.policy_dir), beta=self.preset.beta,
                                        lora_r=self.world.lora_r)), "pi_ref"

    def table(self, key: str, dataset: str, ex: dict) -> dict:
        """The cached per-sequence table of ``ex`` at checkpoint ``key``; one fixed sketch (seed 0)
        for every checkpoint of a world, so the diagnostic and the measurement share a space."""
        from vrpo.loss_gradients import CountSketch, trainable_parameters

        loader, table_key = self.checkpoint(key)
        path = self.exp.out / self.world.name / "tables" / f"{table_key}-{dataset}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)

        def make():
            ckpt = loader()
            return ckpt, CountSketch([p.numel() for p in trainable_parameters(ckpt.model)], self.preset.sketch_dim, 0)
        return stages.gradient_table(path, make, ex, self.exp.progress)

    # ---- prediction and measurement --------------------------------------------------
    def predict_and_measure(self) -> dict:
        """The diagnostic reads a dataset the checkpoint (seed 0's DPO run) never saw: on its own
        training pairs the fitted margins shrink the base score, and the removable share comes
        out too large (docs/lm_regimes.md)."""
        s = self.world.sizes
        diag_ex, files = self.diagnostic_data(("oracle", "fitted") if self.wants_fitted() else ("oracle",))
        measure_ex = self.measurement_examples()
        out = {"world": self.world.name, "description": self.regime.description, "by_checkpoint": {},
               "label_stats": label_stats(self.reviewer, measure_ex)}
        keys = s.checkpoints or self.preset.checkpoints
        for key in keys:
            beta = self.preset.beta
            diag_table = self.table(key, "diagnostic", diag_ex)
            entry = {"diagnostic": stages.decomposition(diag_table, diag_ex, self.read_aux(files["oracle"], s.diagnostic_rows), beta)[0]}
            if "fitted" in files:
                entry["diagnostic_fitted_g"] = stages.decomposition(
                    diag_table, diag_ex, self.read_aux(files["fitted"], s.diagnostic_rows), beta)[0]
            entry["measurement"] = self.measure(self.table(key, "measure", measure_ex), measure_ex)
            out["by_checkpoint"][key] = entry
        if self.preset.in_sample_check and "dpo" in keys:
            out["in_sample"] = self.in_sample_diagnosis()
        main = out["by_checkpoint"][keys[0]]
        out.update(checkpoint=keys[0],
                   predicted_ratio={k: main["diagnostic"]["predicted_ratio"][k] for k in map(str, KS)},
                   measured_ratio=main["measurement"]["measured_ratio"], measured_ci=main["measurement"]["ci"],
                   ngram_proxy=self.ngram(diag_ex, files["oracle"], s.diagnostic_rows))
        return out

    def measure(self, table: dict, ex: dict) -> dict:
        """Var(VRPO_K) / Var(DPO) over the fresh examples, in expectation over their labels
        (``stages.label_expected_scores``); the ratio with the one realised label per pair and
        its first block of reference samples are kept beside it."""
        beta = self.preset.beta
        aux = stages.oracle_aux(self.reviewer, ex)
        measured, realised = stages.decomposition(table, ex, aux, beta)
        p_ab = np.asarray(self.reviewer.preference(ex["prompt"], ex["a"], ex["b"]))
        expected = stages.label_expected_scores(table, ex, p_ab, aux[1], beta)
        minibatch, datasets = stages.minibatch_ratios(expected, self.preset.batch_size)
        return dict(measured, measured_ratio=stages.block_measured_ratios(expected),
                    realised_labels_ratio=stages.block_measured_ratios(stages.realised_scores(realised)),
                    realised_labels_spread=stages.label_draw_spread(expected, seed=MEASURE_SEED),
                    first_block_ratio=measured["measured_ratio"], minibatch_ratio=minibatch, datasets=datasets,
                    batch=self.preset.batch_size, ci=stages.bootstrap_ratios(expected, self.preset.n_boot))

    def in_sample_diagnosis(self) -> dict:
        """The diagnostic on the DPO checkpoint's OWN training pairs (seed 0's first rows): what a
        user gets who diagnoses the data the short run trained on."""
        s = self.world.sizes
        ex, files = self.seed_data(0)
        ex = {k: v[:s.diagnostic_rows] for k, v in ex.items()}
        return stages.decomposition(self.table("dpo", "seed0", ex), ex, self.read_aux(files["oracle"], s.diagnostic_rows),
                                    self.preset.beta)[0]

    def wants_fitted(self) -> bool:
        return "vrpo-fitted" in self.preset.train_methods and self.world.name == "imdb"

    def ngram(self, ex: dict, oracle_file: Path, n: int) -> dict:
        """The fast proxy (`vrpo diagnose` without --model) on the same rows, for comparison."""
        import pandas as pd

        from vrpo.diagnostics import diagnose_frame

        frame = pd.read_json(oracle_file, lines=True).iloc[:n]
        return diagnose_frame(frame, KS)["predicted_ratio"]

    # ---- training ---------------------------------------------------------------------
    def train_and_compare(self) -> dict:
        kinds = tuple(dict.fromkeys(METHODS[m][1] for m in self.preset.train_methods))
        baseline = baseline_responses(self.world, self.exp.out / self.world.name)
        results: dict = {m: {} for m in self.preset.train_methods}
        for seed in self.preset.seeds:
            _, files = self.seed_data(seed, kinds)
            for method in self.preset.train_methods:
                folder = self.folder / "runs" / method / f"seed{seed}"
                results[method][seed] = run_method(self.world, self.regime, self.reviewer, self.preset, method, seed,
                                                   files, folder, baseline)
        summary = compare(results, self.preset.eval_temperatures, self.preset.n_boot)
        return dict(summary, primary=self.regime.primary, methods=list(self.preset.train_methods),
                    num_ref_samples=self.world.sizes.train_ref_samples,
                    seeds=list(self.preset.seeds), seconds=sum(r.get("seconds", 0.0) for m in results.values()
                                                                for r in m.values()))


def label_stats(reviewer, ex: dict) -> dict:
    """How deterministic the labels are: mean 4 p*(1 - p*) over the measured pairs (1 = coin
    flips, 0 = every label a function of the pair) and the share of pairs with p* within 0.05 of 0 or 1."""
    p = np.asarray(reviewer.preference(ex["prompt"], ex["a"], ex["b"]))
    return {"mean_4p1mp": float(np.mean(4 * p * (1 - p))), "sharp_share": float(np.mean((p < 0.05) | (p > 0.95)))}
