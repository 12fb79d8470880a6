"""``vrpo reproduce scheduling --preset {quick,full}``: the clinic scheduling scenario end to end.

A clinic's scheduling assistant (SmolLM2-135M-Instruct + a system prompt) is pi_ref. Every
step is a ``vrpo`` command, run in order, each skipped when its output already exists (so a
killed run resumes; the commands themselves resume too):

    prompts  -> sample (K=2, the candidates the panel labels) -> label (reviewer panel)
             -> sample (K reference samples, another seed) -> fit-aux (GPM on MiniLM, cross-fitted)
             -> audit -> score -> train DPO and VRPO (LoRA, same steps, same batch)
             -> responses on held-out prompts -> evaluate by slice under p*
             -> vrpo gate vs pi_ref (--rubrics panel:rubrics --judge panel:oracle_prob)

Outputs in OUT: ``results.json``, ``results.md`` (slice tables + gate verdicts),
``win_rates.png``, ``rubrics.png``, every step's folder, and ``logs/``: what each command
printed (the terminal shows a progress bar and one line per command).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Preset sizes. quick: runs on 2 CPU cores in minutes, to show the workflow, not to measure
# it (a few pairs, two LoRA steps). full: 80 labelled prompts per slice, a LoRA epoch.
PRESETS: dict[str, dict] = {
    "quick": {"train_per_slice": 2, "eval_per_slice": 1, "num_ref_samples": 2, "max_new_tokens": 16,
              "max_steps": 2, "batch_size": 2, "learning_rate": 5e-4, "lora_r": 8, "folds": 2,
              "aux_epochs": 20, "methods": ["dpo", "vrpo"]},
    "full": {"train_per_slice": 80, "eval_per_slice": 20, "num_ref_samples": 4, "max_new_tokens": 64,
             "max_steps": 120, "batch_size": 4, "learning_rate": 2e-4, "lora_r": 16, "folds": 5,
             "aux_epochs": None, "methods": ["dpo", "vrpo", "vrpo_oracle"]},
}
# method name in results -> (vrpo train --method, auxiliary spec for `vrpo score`, or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "dpo": ("dpo", None),
    "vrpo": ("vrpo", "aux"),  # the cross-fitted GPM written by `vrpo fit-aux` into OUT/aux
    "vrpo_oracle": ("vrpo", "vrpo.experiments.scheduling.panel:oracle_prob"),  # g = p*
}
REFERENCE = "pi_ref"
# The reviewer panel through `vrpo gate`'s general interface: its rubrics and its p* as the judge.
PANEL_RUBRICS = "vrpo.experiments.scheduling.panel:rubrics"
PANEL_JUDGE = "vrpo.experiments.scheduling.panel:oracle_prob"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import PROBABILITY, SEED, POSITIVE_INT, add_overwrite_flag, int_at_least

    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes of every step")
    parser.add_argument("--out", default=None, help="output folder (default: runs/scheduling-PRESET); rerun to resume")
    parser.add_argument("--model", default=None,
                        help="pi_ref folder (default: SmolLM2-135M-Instruct, converted and cached)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of prompts, samples, labels and training")
    parser.add_argument("--max-regression", type=PROBABILITY, default=0.1, help="gate threshold (see `vrpo gate`)")
    for key in ("train_per_slice", "eval_per_slice", "max_steps", "max_new_tokens", "num_ref_samples"):
        kind = int_at_least(2) if key == "num_ref_samples" else POSITIVE_INT
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                            help="override the preset's value (default: the preset's)")
    add_overwrite_flag(parser)


def run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    out = Path(args.out or f"runs/scheduling-{args.preset}")
    start = time.time()
    steps = Workflow(out, settings, args.model, args.seed, args.max_regression, overwrite=args.overwrite)
    results = steps.run_all()
    results["seconds"] = round(time.time() - start, 1)
    results["step_seconds"] = dict(STEP_SECONDS)  # steps run this time (finished steps are skipped on resume)
    from vrpo.experiments.scheduling.report import write_report

    write_report(out, results)
    print((out / "results.md").read_text())
    return 0


def resolve_settings(args: argparse.Namespace) -> dict:
    settings = dict(PRESETS[args.preset], preset=args.preset)
    for key in ("train_per_slice", "eval_per_slice", "max_steps", "max_new_tokens", "num_ref_samples"):
        value = getattr(args, key, None)
        if value is not None:
            from vrpo.cli_args import POSITIVE_INT

            POSITIVE_INT.check(value, f"--{key.replace('_', '-')}")
            settings[key] = value
    if settings["num_ref_samples"] < 2:
        raise ValueError(f"--num-ref-samples {settings['num_ref_samples']}: expected at least 2")
    return settings


STEP_SECONDS: dict[str, float] = {}  # wall time of each command run in this process (for runtime estimates)


def vrpo(*argv: str, logs: Path, bar=None, ok_codes: tuple = (0,)) -> int:
    """Run one ``vrpo`` command in this process. What it prints (its own bars, Trainer
    dictionaries) goes to ``logs/<command>-<out folder>.log``; the terminal gets one line
    (on ``bar``); an exit status outside ``ok_codes`` stops the workflow, naming the log."""
    from vrpo.cli import main
    from vrpo.experiments import run_log

    key = f"{argv[0]} {argv[argv.index('--out') + 1]}" if "--out" in argv else argv[0]
    log = Path(logs) / (key.replace(" ", "-").replace("/", "_").strip("_.") + ".log")
    if bar is not None:
        bar.set_postfix_str(f"vrpo {argv[0]}")
    start = time.time()
    with run_log(log):
        print(f"$ vrpo {' '.join(argv)}", flush=True)
        code = main(list(argv))
    STEP_SECONDS[key] = round(time.time() - start, 1)
    line = f"$ vrpo {' '.join(argv)}  [exit {code}, {STEP_SECONDS[key]:.0f} s, log: {log}]"
    (bar.write if bar is not None else print)(line)
    if bar is not None:
        bar.update(1)
    if code not in ok_codes:
        last = [t for t in log.read_text(errors="replace").splitlines() if t.strip()][-1:] or [""]
        raise RuntimeError(f"`vrpo {argv[0]}` exited with status {code}: {last[0].strip()} (full output: {log})")
    return code


class Workflow:
    def __init__(self, out: Path, settings: dict, model: str | None, seed: int, max_regression: float,
                 overwrite: bool = False):
        self.out, self.s, self.seed, self.max_regression = out, settings, seed, max_regression
        self.model_arg, self.overwrite = model, overwrite

    def path(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    def run_all(self) -> dict:
        from tqdm.auto import tqdm

        from vrpo.experiments.scheduling.model import smollm2_path

        self.bar = tqdm(desc="scheduling workflow", unit="step")  # one line per command run; logs in OUT/logs
        try:
            return self._run_all(smollm2_path)
        finally:
            self.bar.close()

    def run(self, *argv: str, ok_codes: tuple = (0,)) -> int:
        return vrpo(*argv, logs=self.out / "logs", bar=self.bar, ok_codes=ok_codes)

    def _run_all(self, smollm2_path) -> dict:
        self.model = str(self.model_arg or smollm2_path())
        self.check_resume()
        train_rows, eval_rows = self.write_prompts()
        self.sample("pairs_samples", 2, self.seed + 1)
        if not Path(self.path("labelled", "pairs.jsonl")).exists():
            self.run("label", "--samples", self.path("pairs_samples"), "--out", self.path("labelled"), "--seed", str(self.seed + 2))
        self.sample("ref_samples", self.s["num_ref_samples"], self.seed + 3)
        self.fit_aux()
        if not Path(self.path("audit", "audit.csv")).exists():
            self.run("audit", "--data", self.path("labelled", "pairs.jsonl"), "--aux", self.path("aux"), "--out", self.path("audit"))
        for name in self.s["methods"]:
            self.train(name)
        policies = {REFERENCE: self.model, **{m: self.path("train", m) for m in self.s["methods"]}}
        responses = {name: self.respond(name, folder, eval_rows) for name, folder in policies.items()}
        gates = {m: self.gate(m) for m in self.s["methods"]}
        return self.evaluate(eval_rows, responses, gates)

    def check_resume(self) -> None:
        """Finished steps are skipped on a rerun: only safe when the inputs are the same
        (``vrpo.outputs.claim_output``; ``--overwrite`` starts over). The gate threshold is
        not among them: the gate runs again every time."""
        from vrpo.outputs import claim_output
        from vrpo.provenance import fingerprint_model

        model = fingerprint_model(self.model) if Path(self.model).is_dir() else self.model
        claim_output(self.out, "reproduce scheduling", {"settings": self.s, "model": model, "seed": self.seed},
                     overwrite=self.overwrite)

    # ---- data ------------------------------------------------------------------------
    def write_prompts(self) -> tuple[list[dict], list[dict]]:
        """Disjoint train / evaluation prompts, rendered with the chat template + system prompt."""
        from transformers import AutoTokenizer

        from vrpo.experiments.scheduling.model import chat_prompt
        from vrpo.experiments.scheduling.prompts import patient_messages, split_disjoint
        from vrpo.provenance import atomic_write_text

        per_slice = self.s["train_per_slice"] + self.s["eval_per_slice"]
        train, evaluation = split_disjoint(patient_messages(per_slice, seed=self.seed), self.s["eval_per_slice"])
        tokenizer = AutoTokenizer.from_pretrained(self.model)
        for name, rows in (("train", train), ("eval", evaluation)):
            for r in rows:
                r["prompt"] = chat_prompt(tokenizer, r["message"])
            atomic_write_text(self.path("prompts", f"{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        return train, evaluation

    def sample(self, folder: str, k: int, seed: int) -> None:
        manifest = Path(self.path(folder, "manifest.json"))
        if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
            return
        self.run("sample", "--model", self.model, "--prompts", self.path("prompts", "train.jsonl"), "--num-samples", str(k),
             "--max-new-tokens", str(self.s["max_new_tokens"]), "--seed", str(seed), "--out", self.path(folder))

    def fit_aux(self) -> None:
        if Path(self.path("aux", "aux_config.json")).exists():
            return
        extra = ["--epochs", str(self.s["aux_epochs"])] if self.s.get("aux_epochs") else []
        self.run("fit-aux", "--data", self.path("labelled", "pairs.jsonl"), "--model", "gpm-minilm", "--folds",
             str(self.s["folds"]), "--seed", str(self.seed), "--out", self.path("aux"), *extra)

    # ---- training --------------------------------------------------------------------
    def train(self, name: str) -> None:
        method, aux = METHODS[name]
        run_dir = Path(self.path("train", name))
        if (run_dir / "config.json").exists():
            return
        data = self.path("labelled", "pairs.jsonl")
        if aux is not None:  # VRPO: g on observed (out-of-fold) and reference pairs
            scored = self.path("scored", name)
            if not Path(scored, "data.parquet").exists():
                self.run("score", "--aux", self.path(aux) if aux == "aux" else aux, "--data", data,
                     "--samples", self.path("ref_samples"), "--out", scored)
            data = scored
        # Same budget for every method: the same steps, batch, learning rate and LoRA rank.
        self.run("train", "--method", method, "--model", self.model, "--data", data, "--out", str(run_dir), "--max-steps", str(self.s["max_steps"]),
             "--per-device-train-batch-size", str(self.s["batch_size"]), "--learning-rate", str(self.s["learning_rate"]),
             "--lora-r", str(self.s["lora_r"]), "--seed", str(self.seed), "--save-steps", "1000000")

    # ---- evaluation ------------------------------------------------------------------
    def respond(self, name: str, folder: str, rows: list[dict]) -> list[str]:
        """Greedy responses (the deployed behaviour) of one policy to the evaluation prompts."""
        from vrpo.gate import RESPONSES, generate_responses, read_responses, write_responses

        target = Path(self.path("eval", name, RESPONSES))
        if target.exists():
            return read_responses(target, [r["prompt_id"] for r in rows], name)
        from vrpo.experiments import run_log

        start = time.time()
        self.bar.set_postfix_str(f"responses of {name}")
        with run_log(self.out / "logs" / f"respond-{name}.log"):
            texts = generate_responses(Path(folder), [r["prompt"] for r in rows], self.s["max_new_tokens"])
        STEP_SECONDS[f"respond {name}"] = round(time.time() - start, 1)
        self.bar.write(f"# greedy responses of {name} to {len(rows)} held-out prompts  [{STEP_SECONDS[f'respond {name}']:.0f} s]")
        self.bar.update(1)
        write_responses(target, rows, texts, extra={"slice": [r["slice"] for r in rows]})
        return texts

    def gate(self, name: str) -> dict:
        """Would we deploy ``name`` in place of pi_ref? (exit 1 = blocked)."""
        argv = ["gate", "--policy", self.path("eval", name), "--baseline", self.path("eval", REFERENCE),
                "--data", self.path("prompts", "eval.jsonl"), "--rubrics", PANEL_RUBRICS, "--judge", PANEL_JUDGE,
                "--max-regression", str(self.max_regression), "--seed", str(self.seed), "--out", self.path("gate", name),
                "--overwrite"]  # the gate runs again every time, with this run's --max-regression
        code = self.run(*argv, ok_codes=(0, 1))  # 1: the gate failed the policy, a result, not an error
        report = json.loads(Path(self.path("gate", name, "gate.json")).read_text())
        self.bar.write(f"  gate {name} vs {REFERENCE}: {'PASSED' if code == 0 else 'FAILED'}: {report['reason']}")
        return {"passed": code == 0, "failed": [r for r in report["rows"] if r["verdict"] == "FAIL"]}

    def evaluate(self, rows: list[dict], responses: dict[str, list[str]], gates: dict) -> dict:
        from vrpo.aux.io import load_oof
        from vrpo.data import read_rows
        from vrpo.experiments.scheduling import evaluation as ev
        from vrpo.experiments.scheduling.panel import oracle_prob, rubrics as panel_rubrics

        prompts, slices = [r["prompt"] for r in rows], [r["slice"] for r in rows]
        methods = self.s["methods"]
        wins = {f"{m}_vs_{REFERENCE}": ev.win_rates(oracle_prob, prompts, slices, responses[m], responses[REFERENCE],
                                                    seed=self.seed) for m in methods}
        wins.update({f"{m}_vs_dpo": ev.win_rates(oracle_prob, prompts, slices, responses[m], responses["dpo"], seed=self.seed)
                     for m in methods if m != "dpo"})
        rubrics = {name: ev.rubric_rates(panel_rubrics, prompts, slices, texts) for name, texts in responses.items()}
        pairs = read_rows(self.path("labelled", "pairs.jsonl"))
        g = load_oof(self.path("aux"), [p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                     [p["rejected"] for p in pairs])
        calibration = ev.aux_calibration(g, [p["p_star"] for p in pairs], [p["slice"] for p in pairs]) if g is not None else {}
        audit = ev.audit_truth(read_rows(self.path("audit", "audit.csv")), pairs)
        label_manifest = json.loads(Path(self.path("labelled", "manifest.json")).read_text())
        return {"settings": self.s, "model": self.model, "seed": self.seed, "max_regression": self.max_regression,
                "eval_prompts": len(rows), "labelled_pairs": len(pairs), "win_rates": wins, "rubrics": rubrics,
                "aux_calibration": calibration, "audit": audit, "label_noise": label_manifest["by_slice"],
                "gates": gates, "provenance": {"samples_manifest": label_manifest.get("samples_manifest", {})}}
