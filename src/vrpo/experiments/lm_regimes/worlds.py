"""The worlds and regimes of ``vrpo reproduce lm-regimes``.

A *world* is a reference policy with its prompts: ``imdb`` (the tiny GPT pre-trained on
IMDb openings, gold sentiment reward; docs/imdb.md) or ``scheduling`` (SmolLM2-135M-Instruct
as a clinic's scheduling assistant; docs/scheduling.md). A *regime* is a world plus a
reviewer with an exact p*, the truth the labels are drawn from and the oracle auxiliary
model g = p*:

- ``mixture``: the IMDb experiment's three reviewer groups (mostly label noise);
- ``sharp``: one sharp reviewer, Bradley-Terry in the gold sentiment;
- ``cycle``: a majority of three sharp judges on sentiment, length and punctuation (a
  Condorcet cycle: no reward fits it);
- ``target``: prefers sentiment near 0.7, not the most positive (a nonlinear utility);
- ``scheduling``: the scheduling scenario's reviewer panel (three groups and fatigue).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class World:
    """What every regime of one world shares: pi_ref, prompts, sizes and training settings."""

    name: str
    policy_dir: Path
    sizes: object  # presets.WorldSizes
    pool_prompts: list  # prompts of the labelled pairs of the training seeds
    diagnostic_prompts: list  # prompts of the one dataset the diagnostic reads (no checkpoint trains on them)
    measure_prompts: list  # prompts of the fresh datasets that measure the gradient variance
    eval_prompts: list  # held-out prompts the trained policies answer
    lora_r: int = 0  # 0: every parameter trains; > 0: a LoRA adapter of this rank
    context: object = None  # the world's own objects (the IMDb Setup: gold reward, reviewers)


@dataclass(frozen=True)
class Regime:
    name: str
    world: str  # "imdb" or "scheduling"
    reviewer: Callable  # World -> reviewer with preference(prompts, a, b) and label(prompts, a, b, rng)
    primary: str  # the truth metric the training comparison reports first
    description: str


def imdb_world(preset, out: Path, progress: bool, scheduling_model=None) -> World:
    """The IMDb experiment's pi_ref, gold reward and prompts (caches shared with `vrpo reproduce imdb`)."""
    from vrpo.experiments.imdb.pipeline import Setup
    from vrpo.experiments.imdb.presets import Preset as ImdbPreset

    s = preset.imdb
    setup = Setup(ImdbPreset("lm-regimes", split_sizes=dict(preset.imdb_splits), policy=preset.policy,
                             prompt_tokens=preset.prompt_tokens, max_new_tokens=s.max_new_tokens,
                             num_pool_prompts=s.num_pool_prompts + s.diagnostic_rows + s.measure_prompts,
                             num_eval_prompts=max(1, s.num_eval_prompts)), out, progress)
    pool, diagnostic, measure = _split(setup.pool_prompts, s)
    return World("imdb", setup.policy_dir, s, pool, diagnostic, measure, setup.eval_prompts[:s.num_eval_prompts],
                 context=setup)


def _split(prompts: list, s) -> tuple[list, list, list]:
    """Disjoint prompt sets: training pool, the diagnostic's dataset, the measurement's."""
    a, b = s.num_pool_prompts, s.num_pool_prompts + s.diagnostic_rows
    return prompts[:a], prompts[a:b], prompts[b:b + s.measure_prompts]


def scheduling_world(preset, out: Path, progress: bool, scheduling_model=None) -> World:
    """SmolLM2-135M-Instruct (or ``scheduling_model``) with the clinic's system prompt; patient
    messages in the chat template."""
    from transformers import AutoTokenizer

    from vrpo.experiments.scheduling.model import chat_prompt, smollm2_path
    from vrpo.experiments.scheduling.prompts import SLICES, patient_messages

    s = preset.scheduling
    policy = Path(scheduling_model) if scheduling_model else smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    total = s.num_pool_prompts + s.diagnostic_rows + s.measure_prompts + s.num_eval_prompts
    rows = patient_messages(-(-total // len(SLICES)), seed=7)[:total]
    prompts = [chat_prompt(tokenizer, r["message"]) for r in rows]
    pool, diagnostic, measure = _split(prompts, s)
    return World("scheduling", policy, s, pool, diagnostic, measure, prompts[len(prompts) - s.num_eval_prompts:],
                 lora_r=8)


WORLDS: dict[str, Callable] = {"imdb": imdb_world, "scheduling": scheduling_world}


class PanelReviewer:
    """The scheduling panel behind the reviewer interface (an rng instead of a seed)."""

    def __init__(self, panel):
        self.panel = panel

    def preference(self, prompts, responses_a, responses_b) -> np.ndarray:
        return self.panel.preference_prob(list(prompts), list(responses_a), list(responses_b))

    def label(self, prompts, responses_a, responses_b, rng: np.random.Generator) -> np.ndarray:
        return self.panel.label(list(prompts), list(responses_a), list(responses_b),
                                random_state=int(rng.integers(2**31)))["label"].astype(np.int64)


def _imdb(kind: str) -> Callable:
    def build(world: World):
        from vrpo.experiments.imdb import reviewers

        gold = world.context.gold
        return {"mixture": lambda: reviewers.SimulatedReviewers(gold), "sharp": lambda: reviewers.SharpSentimentReviewer(gold),
                "cycle": lambda: reviewers.MajorityPanel(gold), "target": lambda: reviewers.TargetSentimentReviewer(gold)}[kind]()
    return build


def _scheduling(world: World):
    from vrpo.experiments.scheduling.panel import DEFAULT_PANEL

    return PanelReviewer(DEFAULT_PANEL)


REGIMES: dict[str, Regime] = {r.name: r for r in [
    Regime("mixture", "imdb", _imdb("mixture"), "gold", "three reviewer groups (the IMDb experiment's): careful, skimmers, wordy"),
    Regime("sharp", "imdb", _imdb("sharp"), "gold", "one sharp reviewer: sigmoid(40 (s_a - s_b)) in the gold sentiment s"),
    Regime("cycle", "imdb", _imdb("cycle"), "win_rate",
           "majority of three sharp judges (sentiment, length, punctuation): a Condorcet cycle"),
    Regime("target", "imdb", _imdb("target"), "utility", "prefers sentiment near 0.7: sigmoid(40 (u_a - u_b)), u = -|s - 0.7|"),
    Regime("scheduling", "scheduling", _scheduling, "win_rate",
           "the scheduling panel on SmolLM2: front desk, triage nurses, patient experience, fatigue 0.15"),
]}


def get_regimes(names) -> list[Regime]:
    unknown = [n for n in names if n not in REGIMES]
    if unknown:
        raise ValueError(f"--regimes: unknown regime {unknown[0]!r}; expected names from {sorted(REGIMES)}")
    return [REGIMES[n] for n in names]


def truth(regime: Regime, reviewer, prompts, responses, baseline) -> dict[str, np.ndarray]:
    """Per-prompt truth of a policy's responses: ``win_rate`` = p*(x, y, y_ref) against a
    pi_ref sample (every regime), ``gold`` (IMDb) and ``utility`` (the reviewer's, when it has one)."""
    out = {"win_rate": np.asarray(reviewer.preference(prompts, responses, baseline), dtype=np.float64)}
    if regime.world == "imdb":
        feats = reviewer.features(prompts, responses)
        out["gold"] = feats[0] if isinstance(feats, tuple) else feats["s"]
        utility = getattr(reviewer, "utility", None)
        u = utility(feats) if utility is not None and isinstance(feats, dict) else None
        if u is not None:
            out["utility"] = np.asarray(u, dtype=np.float64)
    return out
