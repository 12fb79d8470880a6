"""``vrpo audit``: rank the labelled pairs by how strongly the auxiliary model g disagrees
with the human label, to find labels that are likely noisy or genuinely disputed.

    vrpo audit --data prefs.jsonl --aux AUX_DIR --out AUDIT_DIR

For pair i, g_i = g(x_i, chosen_i, rejected_i) is g's probability that the label is right;
the disagreement is the surprise -log g_i (nats). When AUX_DIR holds the out-of-fold
predictions of this data (``oof.parquet`` from ``vrpo fit-aux``) they are used: a model
that saw a label would agree with it and hide the disagreement. Writes to AUDIT_DIR:
``audit.csv`` (every pair, most disputed first), ``audit.md`` (summary, by slice when the
data has a slice/category column, the top pairs) and ``disagreement.png`` (histogram of g).

Conversational rows are rendered with the chat template of ``--tokenizer`` (the reference
model's folder, as ``vrpo fit-aux`` got it); g sees, and the tables show, the rendered
prompt and each reply as plain text (``vrpo.data.aux_texts``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

SLICE_COLUMNS = ("slice", "category")

PLURALISM_NOTE = (
    "**Read this before relabelling.** A pair where g disagrees with the label is not "
    "necessarily a labelling error. Some disagreement is genuine pluralism: reviewers with "
    "different values, contexts or risk tolerances can prefer different answers to the same "
    "prompt, and both can be right. g is trained to predict the *average* reviewer, so it "
    "flags minority judgements as surprising. Treat the list as pairs to look at, not labels "
    "to flip: check for clear mistakes (swapped responses, a factually wrong or unsafe "
    "'chosen'), and where the disagreement reflects a real difference of values (e.g. when "
    "to schedule versus when to escalate), record it rather than averaging it away. Variance "
    "reduction stabilises the estimate of the average preference; it does not settle whose "
    "preference should count."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.cli_args import POSITIVE_INT, add_overwrite_flag, add_tokenizer_flag

    parser.add_argument("--data", required=True, help="labelled preference pairs (JSONL, Parquet, CSV, saved dataset)")
    parser.add_argument("--aux", required=True,
                        help="a `vrpo fit-aux` folder (its out-of-fold predictions are used when they cover the data), "
                             "module:function / file.py:function (a judge: vrpo imports and RUNS this code, so pass "
                             "only code you trust), or column:NAME (precomputed g)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--slice-column", default=None,
                        help=f"column to summarise by (default: the first of {list(SLICE_COLUMNS)} present)")
    parser.add_argument("--top", type=POSITIVE_INT, default=20, help="pairs listed in audit.md")
    parser.add_argument("--max-rows", type=POSITIVE_INT, default=None, help="use only the first N pairs (default: all)")
    add_overwrite_flag(parser)
    # conversational data (message lists): which chat template renders it
    add_tokenizer_flag(parser, "as `vrpo sample` and `vrpo fit-aux` did; plain-string data needs none")


def aux_probabilities(spec: str, data) -> tuple[list[float], str]:
    """g(x, chosen, rejected) per row and where it came from (out-of-fold / column / model)."""
    from vrpo.aux import ColumnAux, resolve_aux
    from vrpo.aux.io import load_oof
    from vrpo.data import aux_texts, check_probability_column

    prompts, chosen, rejected = aux_texts(data)
    if Path(spec).is_dir():
        try:
            oof = load_oof(spec, prompts, chosen, rejected)
        except ValueError:
            oof = None  # other data than the fit's: score with the model (not in-sample for these pairs)
        if oof is not None:
            return list(oof), "out-of-fold predictions of `vrpo fit-aux` (no model saw the label it is judged against)"
    aux = resolve_aux(spec)
    if isinstance(aux, ColumnAux):
        if aux.column not in data.column_names:
            raise ValueError(f"--aux column:{aux.column}: the data has no column {aux.column!r}; has {data.column_names}")
        return check_probability_column(data[aux.column], aux.column, "--data"), f"precomputed column {aux.column!r}"
    note = ("predictions of the saved model; if it was fitted on these pairs they are in-sample and "
            "understate disagreement (run `vrpo fit-aux` on this data to get out-of-fold predictions)")
    return list(aux.predict_proba(prompts, chosen, rejected)), note


def slice_column(data, requested: str | None) -> str | None:
    if requested is not None:
        if requested not in data.column_names:
            raise ValueError(f"--slice-column {requested}: not a column of the data; has {data.column_names}")
        return requested
    return next((c for c in SLICE_COLUMNS if c in data.column_names), None)


def disagreement_table(data, g, slice_col):
    """One row per pair, most disputed first: surprise = -log g(x, chosen, rejected)."""
    import numpy as np
    import pandas as pd

    from vrpo.data import aux_texts

    prompts, chosen, rejected = aux_texts(data)
    p = np.clip(np.asarray(g, dtype=np.float64), 1e-12, 1.0)
    table = pd.DataFrame({
        "row": np.arange(len(p)),
        "prompt_id": list(data["prompt_id"]),
        "slice": [str(s) for s in data[slice_col]] if slice_col else "all",
        "aux_prob": np.asarray(g, dtype=np.float64),
        "surprise": -np.log(p),
        "prompt": prompts,
        "chosen": chosen,
        "rejected": rejected,
    })
    table = table.sort_values(["surprise", "row"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def slice_summary(table):
    """Per slice: pairs, mean g, share where g sides against the label (g < 1/2), share of
    strong disagreement (g < 0.2), mean surprise; most disputed slice first."""
    s = table.groupby("slice").agg(pairs=("aux_prob", "size"), mean_g=("aux_prob", "mean"),
                                   against=("aux_prob", lambda v: float((v < 0.5).mean())),
                                   strong=("aux_prob", lambda v: float((v < 0.2).mean())),
                                   mean_surprise=("surprise", "mean"))
    return s.sort_values("mean_surprise", ascending=False)


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown_report(table, summary, source: str, spec: str, data_path: str, slice_col, top: int) -> str:
    n = len(table)
    lines = [
        "# Label audit", "",
        f"Data: `{data_path}` ({n} labelled pairs). Auxiliary model: `{spec}`; g from {source}.", "",
        "g = g(x, chosen, rejected) is the auxiliary model's probability that the reviewer's choice is the "
        "preferred one; the pairs are ranked by the surprise -log g (nats).", "",
        f"- g < 0.5 (g sides against the label): {(table.aux_prob < 0.5).mean():.1%} of pairs",
        f"- g < 0.2 (strong disagreement): {(table.aux_prob < 0.2).mean():.1%} of pairs",
        f"- mean g: {table.aux_prob.mean():.3f}. Even with no labelling error, a pair with g = 0.2 gets this "
        "label about one time in five if g is calibrated (see the reliability diagram of `vrpo fit-aux`)", "",
        PLURALISM_NOTE, "",
    ]
    if slice_col:
        lines += [f"## By {slice_col}", "", "| slice | pairs | mean g | g < 0.5 | g < 0.2 | mean surprise |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_short(k, 40)} | {int(r.pairs)} | {r.mean_g:.3f} | {r.against:.1%} | {r.strong:.1%} | "
                  f"{r.mean_surprise:.3f} |" for k, r in summary.iterrows()]
        lines.append("")
    lines += [f"## Top {min(top, n)} most disputed pairs", "",
              "| rank | row | slice | g | prompt | chosen | rejected |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['row']} | {_short(r['slice'], 20)} | {r['aux_prob']:.3f} | {_short(r['prompt'], 50)} | "
              f"{_short(r['chosen'])} | {_short(r['rejected'])} |" for _, r in table.head(top).iterrows()]
    lines += ["", "Files: `audit.csv` (every pair, this order), `disagreement.png` (histogram of g).", ""]
    return "\n".join(lines)


def plot_histogram(g, path: Path) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(g, bins=20, range=(0, 1), edgecolor="white")
    ax.axvline(0.5, ls="--", c="gray", lw=1)
    ax.set_xlabel("g(x, chosen, rejected): P(label is the preferred one)")
    ax.set_ylabel("labelled pairs")
    ax.set_title("left of 0.5: g disagrees with the label")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import os

    from vrpo.aux.base import aux_identity
    from vrpo.data import chat_template_source, load_preferences, tokenizer_identity
    from vrpo.errors import check_readable
    from vrpo.outputs import claim_output
    from vrpo.provenance import atomic_write_text, fingerprint_data

    inputs = {"data": fingerprint_data(check_readable(args.data, "--data", "a preference file")),
              "max_rows": args.max_rows, "aux": aux_identity(args.aux), "slice_column": args.slice_column, "top": args.top,
              "tokenizer": tokenizer_identity(args.tokenizer)}
    claim_output(args.out, "audit", inputs, overwrite=args.overwrite)
    data = load_preferences(args.data, chat_template_source(tokenizer=args.tokenizer), max_rows=args.max_rows)
    slice_col = slice_column(data, args.slice_column)
    g, source = aux_probabilities(args.aux, data)
    table = disagreement_table(data, g, slice_col)
    summary = slice_summary(table)
    out = Path(args.out)
    tmp = out / "audit.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out / "audit.csv")
    atomic_write_text(out / "audit.md", markdown_report(table, summary, source, args.aux, args.data, slice_col, args.top))
    plot_histogram(table.aux_prob.to_numpy(), out / "disagreement.png")
    print(f"g from {source.split(' (')[0]}; {(table.aux_prob < 0.5).mean():.1%} of {len(table)} pairs have g < 0.5")
    if slice_col:
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}/audit.md, audit.csv, disagreement.png")
    return 0
