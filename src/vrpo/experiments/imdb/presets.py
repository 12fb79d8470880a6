"""Presets of the IMDb experiment: every size and setting in one place, with its reason.

``quick`` is what ``make demo`` runs (budget: 10 minutes on 2 CPU cores from a fresh
clone, caches included); ``paper`` is the full table (all rows, 5 seeds, the beta frontier);
``micro`` is the test suite's end-to-end smoke run (seconds, numbers meaningless).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from vrpo.experiments.imdb.policy import PolicyConfig

TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the paper's sampling temperatures


@dataclass(frozen=True)
class Preset:
    name: str
    split_sizes: dict = field(default_factory=lambda: {"gold": 10_000, "pretrain": 10_000, "prompts": 1_500,
                                                       "eval": 1_000})
    policy: PolicyConfig = PolicyConfig()
    prompt_tokens: int = 8  # prompts: the first tokens of a held-out review
    max_new_tokens: int = 24  # response length (the paper: short continuations)
    num_pool_prompts: int = 320  # prompts with a labelled pair and reference samples
    num_train_pairs: int = 256  # labelled pairs per seed, a random subset of the pool
    max_ref_samples: int = 4  # K drawn per prompt (K = 2 rows use the first two)
    misspecified_temperature: float = 0.7  # the "misspecified pi_ref" sampler
    num_eval_prompts: int = 128
    temperatures: tuple = TEMPERATURES
    seeds: tuple = (0, 1, 2)
    methods: tuple = ("sft", "dpo", "ramp-dpo", "vrpo-ramp-k4-correct-oracle", "vrpo-ramp-k4-correct-fitted",
                      "vrpo-ramp-k4-correct-misspecified", "vrpo-ramp-k4-misspecified-oracle",
                      "vrpo-ramp-k4-misspecified-misspecified", "vrpo-ramp-k2-correct-oracle")
    # quick leaves out cDPO/rDPO and the sigmoid-VRPO ablations (the paper preset has them):
    # a K = 4 VRPO run is the costliest row (~25 CPU s), and the demo has 10 minutes
    frontier_methods: tuple = ()  # trained again at each of frontier_betas
    frontier_betas: tuple = ()
    beta: float = 0.1  # the paper's beta
    learning_rate: float = 5e-4
    num_train_epochs: float = 2.0
    batch_size: int = 16
    aux_folds: int = 5  # cross-fitting folds of the fitted GPM
    aux_epochs: int = 30
    n_boot: int = 2000


PRESETS: dict[str, Preset] = {
    "quick": Preset("quick"),
    "paper": Preset(
        "paper", num_pool_prompts=1_200, num_train_pairs=1_000, num_eval_prompts=500, seeds=(0, 1, 2, 3, 4),
        methods=("sft", "dpo", "cdpo", "rdpo", "ramp-dpo", "vrpo-ramp-k4-correct-oracle",
                 "vrpo-ramp-k4-correct-fitted", "vrpo-ramp-k4-correct-misspecified",
                 "vrpo-ramp-k4-misspecified-oracle", "vrpo-ramp-k4-misspecified-misspecified",
                 "vrpo-ramp-k2-correct-oracle", "vrpo-sigmoid-k2-correct-oracle", "vrpo-sigmoid-k4-correct-oracle"),
        frontier_methods=("dpo", "vrpo-ramp-k4-correct-oracle"), frontier_betas=(0.02, 0.05, 0.2)),
    "micro": Preset(
        "micro", split_sizes={"gold": 1_000, "pretrain": 600, "prompts": 60, "eval": 40},
        policy=PolicyConfig(vocab_size=512, n_embd=32, n_layer=1, n_head=2, seq_len=32, tokenizer_reviews=300,
                            pretrain_tokens=8_000, batch_size=16),
        max_new_tokens=8, num_pool_prompts=24, num_train_pairs=16, num_eval_prompts=8, temperatures=(0.0, 1.0),
        seeds=(0, 1), methods=("sft", "dpo", "vrpo-ramp-k4-correct-oracle", "vrpo-ramp-k4-correct-fitted",
                               "vrpo-ramp-k4-misspecified-misspecified"),
        num_train_epochs=1.0, batch_size=8, aux_folds=2, aux_epochs=2, n_boot=200),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset {name}: unknown; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
