"""The model card (``OUT/README.md``): method, objective, data and their provenance."""
from __future__ import annotations

from vrpo.train.methods import METHODS


def model_card(cfg, prep: dict, final_metrics: dict) -> str:
    prov = prep["provenance"]
    samples = prep["manifests"].get("samples") or {}
    lines = [
        "---", "library_name: transformers", "tags: [vrpo, preference-optimization]", "---", "",
        f"# {cfg.method.upper()} fine-tune of `{cfg.model}`", "",
        f"Trained with vrpo `--method {cfg.method}`: {METHODS[cfg.method].description}.", "",
        "## Objective", "",
        f"- base loss f: `{cfg.base_loss}`; beta = {cfg.beta}",
    ]
    if prov.get("num_ref_samples"):
        lines.append(f"- K = {prov['num_ref_samples']} reference samples per prompt "
                     f"({prov['num_ref_samples'] * (prov['num_ref_samples'] - 1) // 2} pairs); control-variate coefficient c = {cfg.control_variate_coef}")
    lines += ["", "## Data and provenance", "",
              f"- preference data: `{prov['data']}` (sha256 `{prov['data_fingerprint'][:16]}`), {prov['num_examples']} pairs",
              f"- reference model pi_ref: `{prov['reference_model']}` (weights sha256 `{prov['reference_model_fingerprint'][:16]}`)"]
    if samples:
        lines.append(f"- reference samples: model `{str(samples.get('model_fingerprint'))[:16]}`, temperature "
                     f"{samples.get('temperature')}, top_p {samples.get('top_p')}, top_k {samples.get('top_k')}, "
                     f"seed {samples.get('seed')}; drawn from pi_ref itself: {samples.get('from_reference_policy')}")
    scored = prep["manifests"].get("scored_data")
    if scored:
        lines.append(f"- auxiliary preference model: `{scored.get('aux')}`")
    allowed = prov.get("allowed_mismatches") or []
    lines.append("- provenance mismatches allowed by --allow-reference-mismatch: " + ("; ".join(allowed) if allowed else "none"))
    if final_metrics:
        lines += ["", "## Last logged training metrics", ""]
        lines += [f"- {k}: {v:.4g}" for k, v in final_metrics.items() if isinstance(v, (int, float))]
    lines += ["", "The run folder holds `config.yaml` (resolved settings), `versions.json`, `manifests/` and "
              "`metrics.jsonl`.", ""]
    return "\n".join(lines)
