"""``vrpo gate``: a deployment gate by slice, with the user's own slices, rubrics and judge.

A better average can hide a regression on the rare case that matters: a policy can win
more often overall while it stops doing the one thing a slice requires. The gate compares
a candidate policy with a baseline on the same prompts, slice by slice, and FAILS (exit
status 1) when in any slice (``all`` included):

- a rubric's pass rate is below the baseline's by more than ``--max-regression``
  (point estimate: a rubric is a requirement, and a small slice must not hide behind a
  wide interval), or
- the candidate's win rate against the baseline under the judge is below
  1/2 - ``--max-regression`` AND the upper end of its 95% bootstrap CI is below 1/2: the
  loss is both larger than the tolerance and clear of the judge's noise. A win rate below
  the tolerance whose CI still reaches 1/2 is reported as ``warn`` and does not fail.

Exit status 0: PASS; 1: FAIL; 2: bad input (one line naming the flag, file or row).

Inputs
------
``--data``: the prompts (JSONL / Parquet / CSV / saved folder with ``prompt``, as a string
or a message list; optional ``prompt_id`` and ``slice``). Rows without a slice belong only
to ``all``; ``all`` (every prompt) is always reported.

``--policy`` / ``--baseline``: each either
- an evaluation folder: ``responses.jsonl`` with ``prompt_id`` and ``response``, one row per
  prompt of ``--data``, or
- a model folder (``config.json`` and ``*.safetensors`` weights, as every command loads
  models: ``vrpo.sampling.load_model_and_tokenizer``): its GREEDY responses (T = 0, up to
  ``--max-new-tokens``) to the prompts are generated and saved under ``--out``. A LoRA
  adapter folder alone is refused: ``vrpo train`` writes the merged model into its ``--out``.

``--rubrics module:function`` (or ``file.py:function``): ``fn(prompts, responses, slices)
-> list`` of one dict per prompt, ``{rubric name: True | False | None}`` (None: the rubric
does not apply to this prompt; NaN is read as None). Called once for each policy.

``--judge module:function``: the contract of ``--aux``: ``fn(prompts, responses_a,
responses_b) -> [N]`` probabilities that a is better than b; antisymmetrised as every
auxiliary model is (g_sym(a, b) = (g(a, b) + 1 - g(b, a)) / 2), so a policy against itself
scores exactly 1/2. A ``vrpo fit-aux`` folder works too. Win rate of a slice = mean over
its prompts of g(x, y_policy, y_baseline), with a percentile bootstrap CI over prompts.

``--out`` is reused only when every input is the same (``vrpo.outputs.claim_output``: the
policy's and baseline's responses file or model, the prompts, the rubric and judge code,
the thresholds, the bootstrap and the tokenizer); a rerun then reads the responses it had
generated instead of generating them again. ``--overwrite`` starts over.

Rubrics and the judge see the prompt as the model sees it (rendered with the reference
model's chat template for message lists: ``--tokenizer``, or the model folder given as
policy or baseline) and each response as plain text, as every auxiliary model does
(docs/pipeline.md).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

RESPONSES = "responses.jsonl"
WIN_RATE = "win_rate_vs_baseline"
MEAN_PASS = "mean_rubric_pass"
ALL = "all"
LEVEL = 0.95
TOLERANCE = 1e-12  # a change of exactly -max_regression passes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, RATE_BELOW_ONE, SEED, add_overwrite_flag, add_tokenizer_flag

    parser.add_argument("--policy", required=True, help="candidate: an evaluation folder (responses.jsonl) or a model "
                        "folder (safetensors; its greedy responses are generated)")
    parser.add_argument("--baseline", required=True, help="baseline: an evaluation folder or a model folder")
    parser.add_argument("--data", required=True, help="prompts (JSONL/Parquet/CSV with `prompt`; optional `prompt_id`, "
                        "`slice`: rows without a slice count only in `all`)")
    parser.add_argument("--rubrics", default=None, help="module:function or file.py:function: fn(prompts, responses, "
                        "slices) -> one dict {rubric: True/False/None} per prompt (None: does not apply)")
    parser.add_argument("--judge", default=None, help="module:function, file.py:function (fn(prompts, a, b) -> "
                        "P(a better than b), as --aux) or a `vrpo fit-aux` folder: win rates by slice")
    parser.add_argument("--max-regression", type=RATE_BELOW_ONE, default=0.05,
                        help="largest allowed drop of a slice's pass rate, or of its win rate below 1/2 (default 0.05)")
    parser.add_argument("--out", default=None, help="folder for gate.json, gate.md and generated responses; a rerun "
                        "with the same inputs reuses the responses generated there (default: print only)")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, help="when a model folder is given (default 64)")
    add_tokenizer_flag(parser, "default: the model folder given as --policy or --baseline")
    parser.add_argument("--bootstrap", type=POSITIVE_INT, default=2000, help="bootstrap resamples for the CIs (default 2000)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the bootstrap (default 0)")
    add_overwrite_flag(parser)


def run(args: argparse.Namespace) -> int:
    from vrpo.cli_args import RATE_BELOW_ONE
    from vrpo.errors import UserError

    RATE_BELOW_ONE.check(args.max_regression, "--max-regression")  # also for a Namespace built in Python
    if not (args.rubrics or args.judge):
        raise UserError("nothing to check: give --rubrics module:function and/or --judge module:function")
    rubrics = load_rubrics(args.rubrics) if args.rubrics else None
    judge = load_judge(args.judge) if args.judge else None
    sources = {role: ResponseSource.of(getattr(args, role), f"--{role}") for role in ROLES}
    if not args.out:
        return gate(args, sources, rubrics, judge)
    from vrpo.outputs import claim_output, folder_lock

    inputs = gate_inputs(args, sources)  # before the claim: a bad file is named before --out is touched
    with folder_lock(args.out, "gate"):
        claim_output(args.out, "gate", inputs, overwrite=args.overwrite)
        return gate(args, sources, rubrics, judge)


def gate(args: argparse.Namespace, sources: dict, rubrics: Callable | None, judge: Callable | None) -> int:
    """Responses of both policies, the verdicts by slice, the report (and gate.md / gate.json under --out)."""
    from vrpo.data import load_prompts

    items = load_prompts(args.data, gate_chat_template(args, sources))
    prompts, slices = [p["prompt"] for p in items], [p.get("slice", ALL) for p in items]
    responses = {role: responses_for(sources[role], items, args, role) for role in ROLES}
    rows = gate_rows(prompts, slices, responses["policy"], responses["baseline"], rubrics=rubrics, judge=judge,
                     max_regression=args.max_regression, n_boot=args.bootstrap, seed=args.seed)
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    settings = {"policy": args.policy, "baseline": args.baseline, "data": args.data, "rubrics": args.rubrics,
                "judge": args.judge, "max_regression": args.max_regression, "bootstrap": args.bootstrap,
                "seed": args.seed, "responses": {role: sources[role].describe(args.max_new_tokens) for role in ROLES}}
    print(format_report(rows, settings, full=not args.out))
    if args.out:
        from vrpo.provenance import atomic_write_json, atomic_write_text

        atomic_write_json(Path(args.out) / "gate.json", {"passed": not failed, "reason": verdict_reason(rows, settings),
                                                         **settings, "rules": RULES, "rows": rows})
        atomic_write_text(Path(args.out) / "gate.md", format_report(rows, settings, full=True) + "\n")
        print(f"\nwrote {Path(args.out) / 'gate.md'} (every slice and check) and gate.json")
    return 1 if failed else 0


def gate_inputs(args: argparse.Namespace, sources: dict) -> dict:
    """Everything that determines what ``--out`` holds (its reuse record): each policy's
    responses file or model and tokenizer by fingerprint, the prompts, the rubric and judge
    code (``aux_identity``: the file, module source or fit-aux folder behind the spec), the
    thresholds and the bootstrap; ``--max-new-tokens`` only when a model generates."""
    from vrpo.aux.base import aux_identity
    from vrpo.data import tokenizer_identity
    from vrpo.errors import check_readable
    from vrpo.provenance import fingerprint_data

    generates = any(src.kind == "model" for src in sources.values())
    return {**{role: sources[role].identity() for role in ROLES},
            "data": fingerprint_data(check_readable(args.data, "--data", "a prompts file")),
            "rubrics": aux_identity(args.rubrics) if args.rubrics else None,
            "judge": aux_identity(args.judge) if args.judge else None,
            "max_regression": args.max_regression, "bootstrap": args.bootstrap, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens if generates else None,
            "tokenizer": tokenizer_identity(args.tokenizer)}


RULES = {
    "rubric": "FAIL when policy pass rate - baseline pass rate < -max_regression (point estimate)",
    "judge": "FAIL when win rate < 1/2 - max_regression and the upper end of its 95% CI < 1/2; "
             "warn (no failure) when the win rate is below the tolerance but its CI reaches 1/2",
}


# --------------------------------------------------------------------------------------
# The user's code: rubrics and judge
# --------------------------------------------------------------------------------------
def load_rubrics(spec: str) -> Callable:
    """``fn(prompts, responses, slices)`` behind ``--rubrics SPEC``, its output checked."""
    from vrpo.aux.base import load_callable
    from vrpo.errors import user_code

    fn = load_callable(spec, "--rubrics")

    def rubrics(prompts, responses, slices):
        with user_code(f"--rubrics {spec}"):
            table = fn(list(prompts), list(responses), list(slices))
        return check_rubric_table(table, len(prompts), f"--rubrics {spec}")

    return rubrics


def check_rubric_table(table, n: int, where: str) -> list[dict[str, bool | None]]:
    """One dict per prompt, ``{name: True | False | None}`` (NaN read as None), or a one-line error."""
    from vrpo.errors import UserError

    if not isinstance(table, (list, tuple)) or len(table) != n:
        got = f"{len(table)} items" if isinstance(table, (list, tuple)) else f"a {type(table).__name__}"
        raise UserError(f"{where}: returned {got}; expected a list of {n} dicts {{rubric: True/False/None}}, one per prompt")
    out = []
    for i, cells in enumerate(table):
        if not isinstance(cells, dict):
            raise UserError(f"{where}: item {i} is a {type(cells).__name__}; expected a dict {{rubric: True/False/None}}")
        out.append({str(name): _pass_value(v, f"{where}: prompt {i}, rubric {name!r}") for name, v in cells.items()})
    return out


def _pass_value(value, where: str) -> bool | None:
    from vrpo.errors import UserError

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1)):
        return bool(value)
    raise UserError(f"{where}: {value!r}; expected True, False or None (the rubric does not apply)")


def load_judge(spec: str) -> Callable:
    """``g(prompts, a, b)``: P(a better than b), antisymmetrised (``vrpo.aux``), behind ``--judge SPEC``."""
    from vrpo.aux.base import CallableAux, load_callable, resolve_aux
    from vrpo.errors import UserError, user_code

    if spec.startswith("column:"):
        raise UserError(f"--judge {spec}: a column cannot judge new responses; expected module:function, "
                        "file.py:function or a `vrpo fit-aux` folder")
    model = resolve_aux(spec) if Path(spec).is_dir() else CallableAux(load_callable(spec, "--judge"), name=spec)

    def judge(prompts, a, b):
        with user_code(f"--judge {spec}"):
            return np.asarray(model.predict_proba(list(prompts), list(a), list(b)), dtype=np.float64)

    return judge


# --------------------------------------------------------------------------------------
# Responses of the two policies
# --------------------------------------------------------------------------------------
ROLES = ("policy", "baseline")


class ResponseSource:
    """Where a policy's responses come from: an evaluation folder's ``responses.jsonl``
    (``kind`` "responses"), or a model folder whose greedy responses are generated ("model")."""

    def __init__(self, folder: Path, kind: str, flag: str):
        self.folder, self.kind, self.flag = folder, kind, flag

    @classmethod
    def of(cls, folder: str, flag: str) -> "ResponseSource":
        """The source behind ``--policy`` / ``--baseline``, or a one-line error. A model folder
        must hold config.json and safetensors weights (``vrpo.sampling.check_model_folder``)."""
        from vrpo.errors import UserError
        from vrpo.sampling import check_model_folder

        path = Path(folder)
        if (path / RESPONSES).exists():
            return cls(path, "responses", flag)
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            raise UserError(f"{flag} {folder}: a LoRA adapter without its base model; give the merged model folder "
                            "(`vrpo train` writes it into its --out) or an evaluation folder with responses.jsonl")
        if (path / "config.json").exists():
            return cls(check_model_folder(path, flag), "model", flag)
        raise UserError(f"{flag} {folder}: neither {RESPONSES} nor a model (config.json + *.safetensors) found")

    def identity(self) -> dict:
        """The fingerprints that decide this policy's responses (for the reuse record of --out)."""
        from vrpo.provenance import file_sha256, fingerprint_model, fingerprint_tokenizer

        if self.kind == "responses":
            return {"responses": file_sha256(self.folder / RESPONSES)}
        return {"model": fingerprint_model(self.folder), "tokenizer": fingerprint_tokenizer(self.folder)}

    def describe(self, max_new_tokens: int) -> str:
        if self.kind == "responses":
            return f"read from {self.folder / RESPONSES}"
        return f"generated greedily (T = 0, up to {max_new_tokens} new tokens) by the model in {self.folder}"


def gate_chat_template(args: argparse.Namespace, sources: dict):
    """The chat template that renders message-list prompts: ``--tokenizer``, else the model
    folder given as policy or baseline (``vrpo.data.chat_template_source``)."""
    from vrpo.data import chat_template_source

    if args.tokenizer:
        return chat_template_source(tokenizer=args.tokenizer)
    for role in ROLES:
        if sources[role].kind == "model":
            return chat_template_source(tokenizer=str(sources[role].folder), tokenizer_flag=f"--{role}")
    return chat_template_source(tokenizer=None)


def responses_for(source: ResponseSource, prompts: list[dict], args: argparse.Namespace, role: str) -> list[str]:
    """The policy's response to each prompt, in the order of ``prompts``: read from its
    evaluation folder, or from the responses generated into ``--out`` by an earlier run of
    the same inputs, or generated now (and saved under ``--out``)."""
    ids = [p["prompt_id"] for p in prompts]
    if source.kind == "responses":
        return read_responses(source.folder / RESPONSES, ids, source.flag)
    saved = Path(args.out) / f"responses-{role}.jsonl" if args.out else None
    if saved is not None and saved.exists():  # the same inputs made it (claim_output): resume
        print(f"reading the greedy responses of {source.flag} generated by an earlier run: {saved}", flush=True)
        return read_responses(saved, ids, source.flag)
    print(f"generating greedy responses (T = 0, up to {args.max_new_tokens} new tokens) of {source.flag} "
          f"{source.folder} to {len(prompts)} prompts", flush=True)
    texts = generate_responses(source.folder, [p["prompt"] for p in prompts], args.max_new_tokens, what=source.flag)
    if saved is not None:
        write_responses(saved, prompts, texts)
    return texts


def read_responses(path: Path, prompt_ids: Sequence[str], flag: str) -> list[str]:
    from vrpo.data import read_rows
    from vrpo.errors import UserError

    by_id: dict[str, str] = {}
    for i, row in enumerate(read_rows(path)):
        if "prompt_id" not in row or not isinstance(row.get("response"), str):
            raise UserError(f"{flag} {path}: row {i}: expected `prompt_id` and a string `response`")
        by_id[str(row["prompt_id"])] = row["response"]
    missing = [pid for pid in prompt_ids if pid not in by_id]
    if missing:
        raise UserError(f"{flag} {path}: no response for prompt_id {missing[0]!r} ({len(missing)} of "
                        f"{len(prompt_ids)} prompts of --data missing)")
    return [by_id[pid] for pid in prompt_ids]


def write_responses(path: Path, prompts: list[dict], texts: Sequence[str], extra: dict | None = None) -> Path:
    """``responses.jsonl``: one row per prompt (``prompt_id``, ``prompt``, ``response`` + extra columns)."""
    from vrpo.provenance import atomic_write_text

    lines = []
    for i, (p, t) in enumerate(zip(prompts, texts)):
        row = {"prompt_id": p["prompt_id"], "prompt": p["prompt"], "response": t}
        row.update({k: v[i] for k, v in (extra or {}).items()})
        lines.append(json.dumps(row))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def generate_responses(model_dir: Path, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                       what: str = "--policy") -> list[str]:
    """Greedy responses of the model folder to each prompt (loaded as every command loads a
    model: local, safetensors only)."""
    from vrpo.evaluate import generate
    from vrpo.sampling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_dir), what=what)
    model.eval()
    return generate(model, tokenizer, list(prompts), temperature=0.0, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)[2]


# --------------------------------------------------------------------------------------
# Statistics by slice (also used by the scheduling experiment's evaluation)
# --------------------------------------------------------------------------------------
def slice_members(slices: Sequence[str]) -> dict[str, np.ndarray]:
    """``{slice: boolean mask over prompts}``: each named slice (sorted), then ``all``."""
    labels = np.asarray(list(slices), dtype=object)
    named = sorted({s for s in slices if s != ALL})
    return {**{s: labels == s for s in named}, ALL: np.ones(len(labels), dtype=bool)}


def slice_win_rates(wins: Sequence[float], slices: Sequence[str], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """``{slice: {"win_rate", "ci_low", "ci_high", "n"}}`` from the per-prompt judge
    probabilities ``wins`` [N] = g(x, y_policy, y_other); 95% percentile bootstrap over prompts."""
    from vrpo.evaluate import bootstrap_ci

    w = np.asarray(wins, dtype=np.float64)
    out = {}
    for name, mask in slice_members(slices).items():
        if mask.any():
            lo, hi = bootstrap_ci(w[mask], np.mean, n_boot=n_boot, level=LEVEL, seed=seed)
            out[name] = {"win_rate": float(w[mask].mean()), "ci_low": lo, "ci_high": hi, "n": int(mask.sum())}
    return out


def slice_pass_rates(table: Sequence[dict], slices: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{slice: {rubric: pass rate}}`` over the prompts where the rubric applies (not None)."""
    names = rubric_names(table)
    out: dict[str, dict] = {}
    for name, mask in slice_members(slices).items():
        cells = [table[i] for i in np.flatnonzero(mask)]
        rates = {r: _rate([c.get(r) for c in cells]) for r in names}
        out[name] = {r: v for r, v in rates.items() if v is not None}
    return out


def rubric_names(table: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(name for cells in table for name in cells))


def _rate(values: Sequence) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# --------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------
def gate_rows(prompts: Sequence[str], slices: Sequence[str], policy: Sequence[str], baseline: Sequence[str], *,
              rubrics: Callable | None = None, judge: Callable | None = None, max_regression: float,
              n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (slice, check), each slice then ``all``: the rubrics (and the mean pass
    rate over every rubric that applies), then the judge's win rate. Each row has n,
    baseline, policy, change, ci_low/ci_high (95% bootstrap CI of the change), verdict
    (FAIL / warn / ok) and the verdict's reason."""
    rows: list[dict] = []
    rub_p = rub_b = None
    if rubrics is not None:
        rub_p, rub_b = rubrics(prompts, policy, slices), rubrics(prompts, baseline, slices)
    wins = None if judge is None else slice_win_rates(judge(prompts, policy, baseline), slices, n_boot, seed)
    for name, mask in slice_members(slices).items():
        idx = np.flatnonzero(mask)
        if rub_p is not None:
            for rubric in rubric_names(rub_p + rub_b):
                rows.append(rubric_row(name, rubric, [rub_b[i].get(rubric) for i in idx],
                                       [rub_p[i].get(rubric) for i in idx], max_regression, n_boot, seed))
            every = lambda rub: [v for i in idx for v in rub[i].values()]  # noqa: E731 (every applicable cell)
            mean = rubric_row(name, MEAN_PASS, every(rub_b), every(rub_p), max_regression, n_boot, seed, paired=False)
            rows.append(mean and dict(mean, n=len(idx)))
        if wins is not None:
            rows.append(win_row(name, wins[name], max_regression))
    return [r for r in rows if r is not None]


def rubric_row(slice_name: str, rubric: str, baseline: Sequence, policy: Sequence, max_regression: float,
               n_boot: int, seed: int, paired: bool = True) -> dict | None:
    """Pass rates over the prompts where the rubric applies; the CI of the change from the
    prompts where it applies to both responses (paired), when ``paired``."""
    from vrpo.evaluate import bootstrap_ci

    b, p = _rate(baseline), _rate(policy)
    if b is None and p is None:
        return None  # the rubric applies nowhere in this slice
    row = {"slice": slice_name, "check": "rubric", "metric": rubric, "n": sum(v is not None for v in policy),
           "baseline": _round(b), "policy": _round(p), "change": None, "ci_low": None, "ci_high": None}
    if b is None or p is None:
        return dict(row, verdict="ok", reason="applies to one policy's responses only; not compared")
    diffs = [float(q) - float(c) for c, q in zip(baseline, policy) if c is not None and q is not None]
    if paired and diffs:
        lo, hi = bootstrap_ci(diffs, np.mean, n_boot=n_boot, level=LEVEL, seed=seed)
        row.update(ci_low=_round(lo), ci_high=_round(hi))
    change = p - b
    row["change"] = _round(change)
    if change < -max_regression - TOLERANCE:
        return dict(row, verdict="FAIL", reason=f"pass rate fell {b:.3f} -> {p:.3f}, by more than {max_regression:g}")
    return dict(row, verdict="ok", reason=f"change {change:+.3f} within -{max_regression:g}")


def win_row(slice_name: str, win: dict, max_regression: float) -> dict:
    """The judge's win rate of policy over baseline in a slice, and its verdict (module docstring)."""
    w, lo, hi = win["win_rate"], win["ci_low"], win["ci_high"]
    row = {"slice": slice_name, "check": "judge", "metric": WIN_RATE, "n": win["n"], "baseline": 0.5,
           "policy": _round(w), "change": _round(w - 0.5), "ci_low": _round(lo - 0.5), "ci_high": _round(hi - 0.5)}
    threshold = 0.5 - max_regression
    if w >= threshold - TOLERANCE:
        return dict(row, verdict="ok", reason=f"win rate {w:.3f} >= {threshold:.3f}")
    if hi < 0.5:
        return dict(row, verdict="FAIL", reason=f"win rate {w:.3f} < {threshold:.3f} and its 95% CI "
                                                f"[{lo:.3f}, {hi:.3f}] lies below 1/2")
    return dict(row, verdict="warn", reason=f"win rate {w:.3f} < {threshold:.3f}, but its 95% CI "
                                            f"[{lo:.3f}, {hi:.3f}] reaches 1/2: not clear of the judge's noise")


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def verdict_reason(rows: list[dict], settings: dict) -> str:
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    x = settings["max_regression"]
    if failed:
        named = "; ".join(f"{r['slice']} {r['metric']}: {r['reason']}" for r in failed[:3])
        return f"{len(failed)} slice check(s) regressed beyond {x:g}: {named}" + ("; ..." if len(failed) > 3 else "")
    warned = sum(r["verdict"] == "warn" for r in rows)
    return f"no slice check regressed beyond {x:g}" + (f" ({warned} win rate(s) below it but within the judge's noise: "
                                                       "warn)" if warned else "")


def _cell(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def format_report(rows: list[dict], settings: dict, full: bool = True) -> str:
    """The verdict and its reason, what was compared, the rules, and the table: every row
    (``full``) or the rows that failed or warned plus those of ``all``."""
    failed = any(r["verdict"] == "FAIL" for r in rows)
    lines = [f"GATE {'FAILED' if failed else 'PASSED'}: {verdict_reason(rows, settings)}", "",
             f"- policy: `{settings['policy']}` ({settings['responses']['policy']})",
             f"- baseline: `{settings['baseline']}` ({settings['responses']['baseline']})",
             f"- prompts: `{settings['data']}`; rubrics: `{settings['rubrics'] or 'none'}`; "
             f"judge: `{settings['judge'] or 'none'}`; max regression {settings['max_regression']:g}",
             f"- rubric rule: {RULES['rubric']}", f"- win-rate rule: {RULES['judge']}",
             f"- CIs: 95% percentile bootstrap over prompts ({settings['bootstrap']} resamples, seed {settings['seed']}); "
             "for a rubric, over the prompts where it applies to both responses", ""]
    shown = rows if full else [r for r in rows if r["verdict"] != "ok" or r["slice"] == ALL]
    lines += ["| slice | check | n | baseline | policy | change [95% CI] | verdict | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for r in shown:
        ci = f" [{_cell(r['ci_low'], '{:+.3f}')}, {_cell(r['ci_high'], '{:+.3f}')}]" if r["ci_low"] is not None else ""
        lines.append(f"| {r['slice']} | {r['metric']} | {r['n']} | {_cell(r['baseline'])} | {_cell(r['policy'])} | "
                     f"{_cell(r['change'], '{:+.3f}')}{ci} | {r['verdict']} | {r['reason']} |")
    if not full and len(shown) < len(rows):
        lines += ["", f"({len(rows) - len(shown)} slice checks within the tolerance not shown; gate.md lists every one)"]
    return "\n".join(lines)
