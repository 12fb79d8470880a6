"""vrpo.evaluate: statistics checked against hand values and known distributions."""
import numpy as np
import pytest

from vrpo import evaluate as ev


def test_win_rate_hand_values():
    # wins: 1 > 0 (1), 2 < 3 (0), 3 = 3 (1/2), 3 > 1 (1)  ->  2.5 / 4
    assert ev.win_rate([1, 2, 3, 3], [0, 3, 3, 1]) == pytest.approx(0.625)
    assert ev.win_rate([0, 0], [1, 1]) == 0.0


def test_win_rate_rejects_unpaired_and_nan():
    with pytest.raises(ValueError, match="one pair per unit"):
        ev.win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN at index 1"):
        ev.win_rate([1, float("nan")], [1, 2])


def test_bootstrap_ci_constant_data_is_a_point():
    assert ev.bootstrap_ci(np.full(30, 0.7)) == pytest.approx((0.7, 0.7))


def test_bootstrap_ci_matches_normal_theory_and_covers():
    # mean of n=400 standard normals: the 95% CI half-width is about 1.96 / sqrt(400) = 0.098
    x = np.random.default_rng(0).normal(size=400)
    lo, hi = ev.bootstrap_ci(x, n_boot=4000)
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 / 20, rel=0.15)
    # coverage over many datasets with a known mean (1.0): close to 95%
    rng = np.random.default_rng(1)
    covered = [lo <= 1.0 <= hi for lo, hi in
               (ev.bootstrap_ci(rng.normal(1.0, 1.0, size=60), n_boot=400, seed=i) for i in range(200))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_ci_bad_level():
    with pytest.raises(ValueError, match="level"):
        ev.bootstrap_ci([1, 2, 3], level=1.5)


def test_seed_prompt_bootstrap_counts_seed_variation():
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(1, 200))
    seed_effect = np.array([[-0.5], [0.0], [0.5]])  # training randomness shifts every prompt of a seed
    table = prompts + seed_effect
    lo2, hi2 = ev.seed_prompt_bootstrap_ci(table, n_boot=1000)
    lo1, hi1 = ev.bootstrap_ci(table.reshape(-1), n_boot=1000)  # pretends the 600 values are independent
    assert hi2 - lo2 > 2 * (hi1 - lo1)
    with pytest.raises(ValueError, match="seeds, prompts"):
        ev.seed_prompt_bootstrap_ci(np.zeros(5))


def test_paired_win_rate_ci_excludes_half_when_clearly_better():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(3, 300))
    res = ev.paired_win_rate(b + 1.0, b + rng.normal(scale=0.5, size=b.shape), n_boot=500)
    assert res["n"] == 900 and res["ci_low"] > 0.5 and res["win_rate"] > 0.9
    even = ev.paired_win_rate(rng.normal(size=400), rng.normal(size=400), n_boot=500)
    assert even["ci_low"] < 0.5 < even["ci_high"]


def test_mean_sd_and_slices():
    assert ev.mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert ev.mean_sd([4.0]) == (4.0, 0.0)
    assert ev.by_slice([1, 2, 3, 5], ["a", "b", "a", "b"]) == {"a": 2.0, "b": 3.5}
    with pytest.raises(ValueError, match="one label per value"):
        ev.by_slice([1, 2], ["a"])


def test_kl_from_samples_known_categoricals():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    exact = float(np.sum(p * np.log(p / q)))  # = 0.3 ln 2.5 ~ 0.2749
    y = np.random.default_rng(0).choice(3, size=20_000, p=p)
    est, se = ev.kl_from_samples(np.log(p[y]), np.log(q[y]))
    assert abs(est - exact) < 4 * se
    assert se < 0.01


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vrpo.testing import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), vocab_size=300, n_embd=16, seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_completion_logps_equal_a_manual_sum(tiny_lm):
    import torch

    model, tok = tiny_lm
    p_ids, c_ids, texts = ev.generate(model, tok, ["The movie was", "A terrible"], temperature=1.0,
                                      max_new_tokens=5, seed=0)
    got = ev.completion_logps(model, p_ids, c_ids, pad_token_id=tok.pad_token_id)
    for i in range(2):
        ids = torch.tensor([p_ids[i] + c_ids[i]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        manual = sum(float(logp[len(p_ids[i]) + t - 1, c]) for t, c in enumerate(c_ids[i]))
        assert got[i] == pytest.approx(manual, abs=1e-4)
        assert 1 <= len(c_ids[i]) <= 5 and isinstance(texts[i], str)


def test_greedy_is_deterministic_and_self_kl_is_zero(tiny_lm):
    model, tok = tiny_lm
    prompts = ["The movie was", "I loved"]
    a = ev.generate(model, tok, prompts, temperature=0.0, max_new_tokens=4, seed=0)
    b = ev.generate(model, tok, prompts, temperature=0.0, max_new_tokens=4, seed=123)
    assert a == b
    out = ev.scores_at_temperatures(model, tok, prompts, lambda xs, ys: np.array([len(y) for y in ys], float),
                                    [0.0, 1.0], max_new_tokens=4, ref_model=model)
    assert out["kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert set(out) == {0.0, 1.0, "kl"} and out[0.0]["scores"].shape == (2,)
    with pytest.raises(ValueError, match="temperature"):
        ev.generate(model, tok, prompts, temperature=-1.0, max_new_tokens=2)
