"""The model card (``OUT/README.md``) of `vrpo train` and `vrpo train-rm`: Hugging Face's
metadata header, then method, objective, data and their provenance.

The header (``library_name``, ``base_model``, ``tags``, ``datasets``) lets a pushed folder
render as a proper model page. ``base_model`` and ``datasets`` are given only when they name
a hub-style id (``owner/name``): vrpo reads local folders only, and a local path in those
fields would point the hub at nothing; the card's body names the local folder instead.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from vrpo.train.config import SETTINGS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_id(path_or_id: str | None) -> str | None:
    """``path_or_id`` as a hub id when it has that form (``owner/name``), else the
    ``_name_or_path`` a model folder's config.json records when that is one, else None."""
    if not path_or_id:
        return None
    text = str(path_or_id).rstrip("/")
    if _HUB_ID.match(text):
        return text
    config = Path(text) / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).is_absolute():
            return name
    return None


def card_header(tags: list[str], base_model: str | None = None, datasets: list[str] | None = None) -> list[str]:
    """The YAML metadata block of a Hugging Face model card."""
    lines = ["---", "library_name: transformers"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:"] + [f"- {t}" for t in dict.fromkeys(tags)]
    known = [d for d in (datasets or []) if d]
    if known:
        lines += ["datasets:"] + [f"- {d}" for d in known]
    return lines + ["---", ""]


def method_settings_lines(cfg, method) -> list[str]:
    """One line per setting the method declares (``Method.settings``): a cDPO card states its
    epsilon, a DPO card states no flip rate."""
    lines = []
    for name in method.settings:
        if name in ("samples",) or not hasattr(cfg, name):
            continue  # the samples are described under provenance
        value = getattr(cfg, name)
        if value is not None:  # None: the data's own K, stated with the provenance
            lines.append(f"- {name} = {value}: {SETTINGS[name].help.split('; ')[0].split(' (')[0]}")
    return lines


def model_card(cfg, prep: dict, final_metrics: dict) -> str:
    method = cfg._method()
    prov = prep["provenance"]
    samples = prep["manifests"].get("samples") or {}
    base = hub_id(cfg.model)
    lines = card_header(["vrpo", "preference-optimization", cfg.method], base_model=base, datasets=[hub_id(cfg.data)])
    lines += [
        f"# {cfg.method.upper()} fine-tune of `{base or cfg.model}`", "",
        f"Trained with vrpo `--method {cfg.method}`: {method.description}.", "",
        "## Objective", "",
        f"- base loss f: `{cfg.base_loss}`; beta = {cfg.beta}",
        *method_settings_lines(cfg, method),
    ]
    if prov.get("num_ref_samples"):
        lines.append(f"- K = {prov['num_ref_samples']} reference samples per prompt "
                     f"({prov['num_ref_samples'] * (prov['num_ref_samples'] - 1) // 2} pairs)")
    checks = prov.get("data_checks") or {}
    lines += ["", "## Data and provenance", "",
              f"- initialised from: `{cfg.model}`" + ("" if base else " (a local folder)"),
              f"- preference data: `{prov['data']}` (sha256 `{prov['data_fingerprint'][:16]}`), {prov['num_examples']} pairs"
              + (f" ({checks['dropped_identical_pairs']} with chosen == rejected dropped)"
                 if checks.get("dropped_identical_pairs") else ""),
              f"- reference model pi_ref: `{prov['reference_model']}` (weights sha256 `{prov['reference_model_fingerprint'][:16]}`)"]
    if samples:
        lines.append(f"- reference samples: model `{str(samples.get('model_fingerprint'))[:16]}`, temperature "
                     f"{samples.get('temperature')}, top_p {samples.get('top_p')}, top_k {samples.get('top_k')}, "
                     f"seed {samples.get('seed')}; drawn from pi_ref itself: {samples.get('from_reference_policy')}")
    if checks.get("truncated_reference_samples"):
        lines.append(f"- {checks['truncated_reference_samples']} reference samples hit the sampler's length limit "
                     "without EOS and were used as drawn, without EOS")
    scored = prep["manifests"].get("scored_data")
    if scored:
        lines.append(f"- auxiliary preference model: `{scored.get('aux')}`")
    allowed = prov.get("allowed_mismatches") or []
    lines.append("- provenance mismatches allowed by --allow-reference-mismatch: " + ("; ".join(allowed) if allowed else "none"))
    if final_metrics:
        lines += ["", "## Last logged training metrics", ""]
        lines += [f"- {k}: {v:.4g}" for k, v in final_metrics.items() if isinstance(v, (int, float))]
    lines += ["", "The run folder holds `config.yaml` (the settings that applied), `versions.json`, `manifests/` and "
              "`metrics.jsonl`.", ""]
    return "\n".join(lines)
