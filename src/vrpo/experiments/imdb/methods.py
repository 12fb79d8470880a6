"""The methods of the IMDb table, as data: one ``MethodSpec`` per row, no code per method.

A spec names a training method of ``vrpo.train.METHODS`` (dpo, cdpo, rdpo, vrpo) and the
settings that make the row: the base loss f, the number K of reference samples, which
auxiliary model g scores the pairs (``AUX_KINDS``), and whether the reference samples come
from pi_ref itself ("correct") or from another policy ("misspecified": pi_ref tempered to
T = 0.7, the paper's "reference policy misspecified" case).

Rows (paper names where the paper has the row):
- SFT: pi_ref itself, no preference training.
- DPO (sigmoid), and the robust baselines cDPO / rDPO (label smoothing / flip rate 0.1).
- VRPO (pi_ref, aux) for pi_ref in {correct, misspecified} x aux in {oracle, fitted GPM,
  misspecified}, with the paper code's ramp loss and K = 4.
- Ablations: ramp-DPO (the ramp loss without the control variate), VRPO with the
  sigmoid loss, and VRPO at K = 2 (the paper code's single reference pair) vs K = 4; so the
  table separates the loss, the control variate and the extra reference pairs.
- Two-stage rows (reward model + RL engine) are not rows of this table; they add
  their results under ``results.json["two_stage"]`` (see ``runner.extra_sections``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

AUX_KINDS = ("oracle", "fitted", "misspecified")
REFERENCE_KINDS = ("correct", "misspecified")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # key in results.json and run folder name
    label: str  # the table's row label
    method: Optional[str]  # key of vrpo.train.METHODS; None = no training (SFT)
    base_loss: str = "sigmoid"
    num_ref_samples: Optional[int] = None  # K (VRPO only)
    aux: Optional[str] = None  # one of AUX_KINDS (VRPO only)
    reference: str = "correct"  # one of REFERENCE_KINDS (VRPO only)
    group: str = "main"  # "main", "baseline" or "ablation": the table section
    paper_row: Optional[str] = None  # the paper's row it reproduces (docs/method.md)
    beta: Optional[float] = None  # None = the preset's beta

    def at_beta(self, beta: float) -> "MethodSpec":
        """The same method at another beta (the reward-vs-KL frontier)."""
        return replace(self, name=f"{self.name}@beta={beta:g}", label=f"{self.label}, beta={beta:g}", beta=beta)


def _vrpo(ref: str, aux: str, base: str = "ramp", k: int = 4, group: str = "main", paper: Optional[str] = None):
    name = f"vrpo-{base}-k{k}-{ref}-{aux}"
    label = f"VRPO ({ref}, {aux}) {base} K={k}"
    return MethodSpec(name, label, "vrpo", base, k, aux, ref, group, paper)


METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("sft", "SFT (pi_ref)", None, group="baseline"),
    MethodSpec("dpo", "DPO (sigmoid)", "dpo", "sigmoid", paper_row="DPO"),
    MethodSpec("cdpo", "cDPO (eps 0.1)", "cdpo", "sigmoid", group="baseline"),
    MethodSpec("rdpo", "rDPO (eps 0.1)", "rdpo", "sigmoid", group="baseline"),
    _vrpo("correct", "oracle", paper="VRPO (correct, oracle)"),
    _vrpo("correct", "fitted", paper="VRPO (correct, estimated)"),
    _vrpo("correct", "misspecified", paper="VRPO (correct, misspecified)"),
    _vrpo("misspecified", "oracle", paper="VRPO (misspecified, oracle)"),
    _vrpo("misspecified", "misspecified", paper="VRPO (misspecified, misspecified)"),
    MethodSpec("ramp-dpo", "ramp-DPO (no control variate)", "dpo", "ramp", group="ablation"),
    _vrpo("correct", "oracle", base="ramp", k=2, group="ablation"),
    _vrpo("correct", "oracle", base="sigmoid", k=2, group="ablation"),
    _vrpo("correct", "oracle", base="sigmoid", k=4, group="ablation"),
]}

HEADLINE = "vrpo-ramp-k4-correct-oracle"  # the row compared against DPO and SFT in win rates


def get_methods(names) -> list[MethodSpec]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r}; expected names from {sorted(METHODS)}")
    return [METHODS[n] for n in names]
