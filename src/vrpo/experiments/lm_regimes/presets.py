"""Presets of ``vrpo reproduce lm-regimes``: every size in one place, with its reason.

``quick`` (about 9 CPU minutes with one thread, the IMDb regimes only; numbers of the same kind as
``full`` with wider intervals), ``full`` (the measurement: more examples, 5 seeds, the
scheduling panel on SmolLM2; about 90 CPU minutes, measured in docs/lm_regimes.md), ``micro`` (the
tests' end-to-end smoke run: seconds, numbers meaningless).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from vrpo.experiments.imdb.policy import PolicyConfig

KS = (2, 4, 8, 16)  # the K every ratio is reported for
MAX_PROMPT_TOKENS = 320  # the scheduling system prompt + a patient message: ~300 tokens (sampling and training)


@dataclass(frozen=True)
class WorldSizes:
    """How much of one world (a policy + its prompts) each stage uses."""

    num_pool_prompts: int = 320  # prompts that carry labelled pairs (a seed uses num_train_pairs of them)
    num_train_pairs: int = 256  # labelled pairs per seed (the IMDb quick preset's)
    train_ref_samples: int = 8  # K0 of the training data: VRPO trains with K = 8, the diagnostic reads all 8
    diagnostic_rows: int = 256  # the diagnostic's one dataset: labelled pairs on prompts no checkpoint trained on
    measure_prompts: int = 160  # prompts of the fresh datasets that measure the variance (item 2)
    measure_repeats: int = 2  # independent examples per measurement prompt (each with its own 2 + 16 samples)
    measure_ref_samples: int = 16  # reference samples per measured example (K up to 16)
    num_eval_prompts: int = 128  # held-out prompts the trained policies answer
    max_new_tokens: int = 24
    checkpoints: tuple | None = None  # where the gradients are taken (None: the preset's checkpoints)


@dataclass(frozen=True)
class Preset:
    name: str
    regimes: tuple = ("mixture", "sharp", "cycle", "target")  # docs/lm_regimes.md; "scheduling" = SmolLM2
    imdb: WorldSizes = WorldSizes()
    # SmolLM2: a gradient costs 3-4 s per sequence on the 2-core machine, so few rows, K0 = 4 for the
    # diagnostic and 8 for the measurement, one checkpoint (a 16-step LoRA DPO run, one epoch)
    scheduling: WorldSizes = WorldSizes(num_pool_prompts=64, num_train_pairs=64, train_ref_samples=4,
                                        diagnostic_rows=48, measure_prompts=40, measure_repeats=1,
                                        measure_ref_samples=8, num_eval_prompts=0, max_new_tokens=32,
                                        checkpoints=("dpo",))
    policy: PolicyConfig = PolicyConfig()  # the IMDb pi_ref (shared cache with `vrpo reproduce imdb`)
    imdb_splits: dict = field(default_factory=lambda: {"gold": 10_000, "pretrain": 10_000, "prompts": 1_500,
                                                       "eval": 1_000})
    prompt_tokens: int = 8
    # the checkpoint the gradients are taken at: "dpo" = seed 0's DPO run (near its target), "pi_ref" = theta_0
    checkpoints: tuple = ("dpo",)
    sketch_dim: int = 4096
    # training (the IMDb experiment's settings: vrpo.train with beta 0.1, lr 5e-4, 2 epochs, batch 16)
    beta: float = 0.1
    learning_rate: float = 5e-4
    num_train_epochs: float = 2.0
    batch_size: int = 16
    seeds: tuple = (0, 1, 2, 3, 4)
    train_methods: tuple = ("dpo", "vrpo-oracle", "vrpo-fitted")  # sigmoid, K = 8
    train_regimes: str = "extremes"  # the regimes with the largest and the smallest predicted gain ("largest": one)
    eval_temperatures: tuple = (0.0, 1.0)
    aux_folds: int = 5
    aux_epochs: int = 30
    scheduling_steps: int = 16  # LoRA steps of the scheduling DPO checkpoint (batch 4)
    in_sample_check: bool = False  # also diagnose the checkpoint's own training pairs (the pitfall, measured)
    n_boot: int = 1000
    threads: int = 1  # torch threads: on a shared 2-core machine one thread per process is fastest


PRESETS: dict[str, Preset] = {
    # quick: 533 CPU seconds with one thread (measured, docs/lm_regimes.md): every prompt of the pool
    # labelled, a smaller diagnostic and measurement, training only where the predicted gain is largest
    "quick": Preset(
        "quick", imdb=WorldSizes(num_pool_prompts=256, diagnostic_rows=128, measure_prompts=96, measure_repeats=1,
                                 num_eval_prompts=96),
        seeds=(0, 1, 2), train_methods=("dpo", "vrpo-oracle"), train_regimes="largest", eval_temperatures=(1.0,)),
    "full": Preset("full", regimes=("mixture", "sharp", "cycle", "target", "scheduling"), checkpoints=("dpo", "pi_ref"),
                   imdb=WorldSizes(measure_prompts=200, measure_repeats=2), in_sample_check=True),
    "micro": Preset(
        "micro", regimes=("mixture", "sharp"),
        imdb=WorldSizes(num_pool_prompts=12, num_train_pairs=10, train_ref_samples=4, diagnostic_rows=10,
                        measure_prompts=6, measure_repeats=2, measure_ref_samples=4, num_eval_prompts=6,
                        max_new_tokens=6),
        scheduling=WorldSizes(num_pool_prompts=8, num_train_pairs=8, train_ref_samples=4, diagnostic_rows=8,
                              measure_prompts=6, measure_repeats=1, measure_ref_samples=4, num_eval_prompts=0,
                              max_new_tokens=6, checkpoints=("dpo",)),
        scheduling_steps=2,
        policy=PolicyConfig(vocab_size=512, n_embd=32, n_layer=1, n_head=2, seq_len=32, tokenizer_reviews=300,
                            pretrain_tokens=8_000, batch_size=16),
        imdb_splits={"gold": 1_000, "pretrain": 600, "prompts": 60, "eval": 40},
        sketch_dim=256, seeds=(0, 1), train_methods=("dpo", "vrpo-oracle", "vrpo-fitted"), batch_size=4,
        num_train_epochs=1.0, aux_folds=2, aux_epochs=2, n_boot=100, in_sample_check=True),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset {name}: unknown; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
