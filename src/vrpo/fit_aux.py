"""``vrpo fit-aux``: fit an auxiliary preference model g by K-fold cross-fitting and report
how good it is on pairs it did not see.

    vrpo fit-aux --data prefs.jsonl --model gpm-minilm --folds 5 --out AUX_DIR

Each labelled pair (prompt, chosen, rejected) is a training example with label 1 (chosen
won), seen as ``vrpo.data.aux_texts`` gives it: conversational rows are rendered with the
chat template of ``--tokenizer`` (the reference model's folder) and each reply is plain text.
Writes to AUX_DIR:

- ``aux_config.json`` + ``model.safetensors``: the model for reference pairs (the fold
  average by default; ``--reference full`` refits on all pairs), loadable with
  ``vrpo.aux.resolve_aux(AUX_DIR)`` / ``--aux AUX_DIR``;
- ``oof.parquet``: the out-of-fold g(x, chosen, rejected) of every labelled pair (columns
  row, pair_id, prompt_id, aux_prob, fold): ``vrpo score`` must use these for observed
  pairs, never the model's in-sample predictions (``vrpo.aux.io.load_oof``);
- ``metrics.json`` and ``reliability.png``: held-out (out-of-fold) accuracy, log-loss,
  Brier score, expected calibration error and the reliability diagram.
"""
from __future__ import annotations

import argparse
from pathlib import Path

OVERRIDES = ("epochs", "lr", "batch_size", "dim", "hidden")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vrpo.aux import AUX_MODELS
    from vrpo.aux.crossfit import REFERENCE_MODELS
    from vrpo.cli_args import POSITIVE_FLOAT, POSITIVE_INT, SEED, add_overwrite_flag, add_tokenizer_flag, int_at_least

    parser.add_argument("--data", required=True, help="labelled preference pairs (JSONL, Parquet, CSV, saved dataset)")
    parser.add_argument("--model", default="gpm-minilm", choices=sorted(AUX_MODELS),
                        help="gpm-*: general preference model; bt*: Bradley-Terry scalar head; *-minilm/bt: frozen "
                             "MiniLM + trained head; *-transformer: MiniLM fine-tuned end to end; *-table: a vector "
                             "per distinct response (finite response sets)")
    parser.add_argument("--folds", type=int_at_least(2), default=5, help="cross-fitting folds (>= 2)")
    parser.add_argument("--out", required=True, help="output folder (created; rerun the same command to refit into it)")
    parser.add_argument("--reference", default="fold-average", choices=sorted(REFERENCE_MODELS),
                        help="model saved for reference pairs: average of the fold models, or a refit on all pairs")
    parser.add_argument("--fold-by", default="prompt", choices=["prompt", "pair"],
                        help="keep all pairs of a prompt in one fold, or split by pair (the listings of one pair, "
                             "in either order, always share a fold)")
    parser.add_argument("--seed", type=SEED, default=0, help="random_state of folds, initialisation and shuffling")
    parser.add_argument("--max-rows", type=POSITIVE_INT, default=None, help="use only the first N pairs (default: all)")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None, help="training epochs (default: the model's)")
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="head learning rate (default: the model's, 1e-3)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="pairs per step (default: the model's)")
    parser.add_argument("--dim", type=POSITIVE_INT, default=None, help="GPM embedding size 2m (even; default 16)")
    parser.add_argument("--hidden", type=POSITIVE_INT, default=None, help="hidden width of the head (default 256)")
    add_overwrite_flag(parser)
    # conversational data (message lists): which chat template renders it
    add_tokenizer_flag(parser, "as `vrpo sample` did; plain-string data needs none")


def model_factory(name: str, seed: int, args: argparse.Namespace | None = None):
    """A zero-argument factory of fresh models named ``name`` with the CLI's overrides."""
    from vrpo.aux import AUX_MODELS

    overrides = {k: getattr(args, k) for k in OVERRIDES if args is not None and getattr(args, k, None) is not None}
    if "dim" in overrides and not name.startswith("gpm"):
        raise ValueError(f"--dim: only the GPM models have an embedding size; --model {name} is Bradley-Terry")
    return lambda: AUX_MODELS[name](random_state=seed, progress=False, **overrides)


def fit_inputs(args: argparse.Namespace) -> dict:
    """Everything that determines the fitted model and its out-of-fold predictions (the reuse
    record of ``--out``): the data by fingerprint and every setting."""
    from vrpo.data import tokenizer_identity
    from vrpo.errors import check_readable
    from vrpo.provenance import fingerprint_data

    data = fingerprint_data(check_readable(args.data, "--data", "a preference file"))
    return {"data": data, "max_rows": args.max_rows, "model": args.model, "folds": args.folds, "fold_by": args.fold_by,
            "reference": args.reference, "seed": args.seed, **{k: getattr(args, k, None) for k in OVERRIDES},
            "tokenizer": tokenizer_identity(getattr(args, "tokenizer", None))}


def fold_groups(fold_by: str, prompt_ids, prompts, chosen, rejected) -> list[str]:
    """The cross-fitting group of each pair. ``prompt``: its prompt_id (a model never sees a
    sibling pair of the prompt it predicts for). ``pair``: the pair itself, the same prompt
    and two responses in either order. A copy of a row in another fold would hand the model
    the very label it is asked to predict; grouping only the copies with the same order
    would do worse, holding out every label of one direction and training on the other's.
    With all listings of a pair in one fold, its prediction depends on no label of it."""
    if fold_by == "prompt":
        return [str(p) for p in prompt_ids]
    from vrpo.aux.io import pair_id

    return [pair_id(x, *sorted((a, b))) for x, a, b in zip(prompts, chosen, rejected)]


def print_metrics(metrics: dict, label: str) -> None:
    print(f"{label}: {metrics['pairs']} pairs  accuracy {metrics['accuracy']:.3f}  log-loss {metrics['log_loss']:.3f}  "
          f"Brier {metrics['brier']:.3f}  ECE {metrics['ece']:.3f}")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from vrpo.aux import calibration
    from vrpo.aux.crossfit import cross_fit
    from vrpo.aux.io import save_aux, write_oof
    from vrpo.data import aux_texts, chat_template_source, load_preferences
    from vrpo.outputs import claim_output
    from vrpo.provenance import atomic_write_json, fingerprint_data

    if args.dim is not None and args.dim % 2:
        raise ValueError(f"--dim {args.dim}: expected an even number (GPM pairs its coordinates)")
    factory = model_factory(args.model, args.seed, args)
    out = claim_output(args.out, "fit-aux", fit_inputs(args), overwrite=args.overwrite)
    data = load_preferences(args.data, chat_template_source(tokenizer=args.tokenizer), max_rows=args.max_rows)
    prompts, chosen, rejected = aux_texts(data)
    labels = np.ones(len(prompts))  # label 1: the first response (chosen) won
    groups = fold_groups(args.fold_by, data["prompt_id"], prompts, chosen, rejected)
    result = cross_fit(factory, prompts, chosen, rejected, labels, folds=args.folds, random_state=args.seed,
                       reference=args.reference, groups=groups, progress=True)
    metrics = calibration.calibration_report(result.oof_proba, labels)
    per_fold = [calibration.calibration_report(result.oof_proba[result.fold_ids == f], labels[result.fold_ids == f])
                for f in range(args.folds)]
    fit_info = {"data": str(args.data), "data_fingerprint": fingerprint_data(args.data), "model": args.model,
                "folds": args.folds, "fold_by": args.fold_by, "reference": args.reference, "seed": args.seed,
                "pairs": len(prompts), "heldout_metrics": metrics}
    save_aux(result.reference_model, out, extra={"fit": fit_info})
    write_oof(out, prompts, chosen, rejected, data["prompt_id"], result.oof_proba, result.fold_ids)
    atomic_write_json(out / "metrics.json", {"heldout": metrics, "per_fold": per_fold, "fit": fit_info})
    calibration.plot_reliability(result.oof_proba, labels, out / "reliability.png",
                                 title=f"{args.model}, out-of-fold ({args.folds} folds)")
    print_metrics(metrics, f"held-out (out-of-fold, {args.folds} folds)")
    print(f"wrote {out}/aux_config.json, model.safetensors, oof.parquet, metrics.json, reliability.png")
    return 0

