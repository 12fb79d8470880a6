"""Auxiliary models: GPM vs Bradley-Terry on cyclic preferences, antisymmetry, the bilinear
form against a hand computation, oracle/judge, save/load, bad input. Table backbone (fast);
the MiniLM backbones are in test_aux_minilm.py."""
import json

import numpy as np
import pytest

from vrpo.aux import (GPM, AuxModel, BradleyTerryAux, CallableAux, JudgeAux, OracleAux, load_aux, resolve_aux,
                      save_aux)
from vrpo.aux.synthetic import RPS, rock_paper_scissors_pairs, rps_true_preference

FAST = dict(backbone="table", epochs=30, lr=1e-2)


@pytest.fixture(scope="module")
def rps():
    return rock_paper_scissors_pairs(300, random_state=0), rock_paper_scissors_pairs(300, random_state=1)


@pytest.fixture(scope="module")
def fitted(rps):
    (x, a, b, y), _ = rps
    return GPM(**FAST).fit(x, a, b, y), BradleyTerryAux(**FAST).fit(x, a, b, y)


def test_gpm_fits_rock_paper_scissors_that_bradley_terry_cannot(rps, fitted):
    _, (x, a, b, y) = rps  # held-out pairs
    gpm, bt = fitted
    acc = {name: np.mean((m.predict_proba(x, a, b) > 0.5) == (y > 0.5)) for name, m in (("gpm", gpm), ("bt", bt))}
    # Bayes accuracy is 0.9; a transitive order gets one matchup of three wrong: <= 0.9*2/3 + 0.1/3 = 0.633
    assert acc["gpm"] > 0.85
    assert acc["bt"] < 0.70
    assert acc["gpm"] - acc["bt"] > 0.2
    # matchups: the GPM's matrix reproduces the cycle; its probabilities are near p* = 0.9
    G = gpm.predict_pairwise("Pick one.", list(RPS))
    truth = rps_true_preference([""] * 9, [r for r in RPS for _ in RPS], list(RPS) * 3).reshape(3, 3)
    assert np.all((G > 0.5) == (truth > 0.5))
    assert np.abs(G - truth).max() < 0.12
    B = bt.predict_pairwise("Pick one.", list(RPS))
    assert ((B > 0.5) == (truth > 0.5))[np.triu_indices(3, 1)].sum() <= 2


@pytest.mark.parametrize("which", [0, 1])
def test_antisymmetry_by_construction(fitted, which):
    model = fitted[which]
    rng = np.random.default_rng(3)
    a = [RPS[i] for i in rng.integers(0, 3, 50)]
    b = [RPS[i] for i in rng.integers(0, 3, 50)]
    x = ["Pick one."] * 50
    assert np.abs(model.predict_proba(x, a, b) + model.predict_proba(x, b, a) - 1).max() < 1e-6
    M = model.predict_pairwise("Pick one.", list(RPS) + ["unseen move"])
    assert np.abs(M + M.T - 1).max() < 1e-6
    assert np.allclose(np.diag(M), 0.5)


def test_gpm_form_is_the_hand_computed_skew_bilinear_form(fitted):
    """g = sigmoid(v_a^T R v_b), R = blockdiag(lambda_l [[0, 1], [-1, 0]]), checked in numpy."""
    import torch

    gpm = fitted[0]
    items = [("Pick one.", r) for r in RPS]
    v = gpm.item_vectors(items).numpy()
    lam = gpm.head_.eigen.detach().double().numpy()
    logits = np.zeros((3, 3))
    for j in range(3):
        for k in range(3):
            logits[j, k] = sum(lam[l] * (v[j, 2 * l] * v[k, 2 * l + 1] - v[j, 2 * l + 1] * v[k, 2 * l])
                               for l in range(len(lam)))
    expected = 1 / (1 + np.exp(-logits))
    assert np.allclose(gpm.predict_pairwise("Pick one.", list(RPS)), expected, atol=1e-9)
    R = gpm.head_.skew()
    assert torch.equal(R.T, -R)


def test_generic_pairwise_matches_model_override(fitted):
    gpm = fitted[0]
    prompts, lists = ["Pick one.", "Pick one."], [list(RPS), ["paper", "rock"]]
    fast = gpm.predict_pairwise_batch(prompts, lists)
    generic = AuxModel.predict_pairwise_batch(gpm, prompts, lists)
    for f, g in zip(fast, generic):
        assert np.allclose(f, g, atol=1e-7)


def test_fit_is_reproducible_with_random_state(rps):
    (x, a, b, y), _ = rps
    p1 = GPM(**FAST, random_state=5).fit(x[:60], a[:60], b[:60], y[:60]).predict_pairwise("Pick one.", list(RPS))
    p2 = GPM(**FAST, random_state=5).fit(x[:60], a[:60], b[:60], y[:60]).predict_pairwise("Pick one.", list(RPS))
    assert np.array_equal(p1, p2)


def test_save_load_roundtrip_and_kind_errors(fitted, tmp_path):
    gpm, bt = fitted
    save_aux(gpm, tmp_path / "g")
    save_aux(bt, tmp_path / "b")
    cfg = json.loads((tmp_path / "g" / "aux_config.json").read_text())
    assert cfg["kind"] == "gpm" and "torch" in cfg["versions"] and cfg["config"]["params"]["random_state"] == 0
    for model, folder in ((gpm, "g"), (bt, "b")):
        loaded = resolve_aux(str(tmp_path / folder))
        assert type(loaded) is type(model)
        assert np.array_equal(loaded.predict_pairwise("Pick one.", list(RPS)), model.predict_pairwise("Pick one.", list(RPS)))
    with pytest.raises(ValueError, match="is a 'bt' model; expected kind 'gpm'"):
        load_aux(tmp_path / "b", kind="gpm")
    cfg["kind"] = "reward-model"
    (tmp_path / "b" / "aux_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'reward-model': not a known kind"):
        resolve_aux(str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no aux_config.json"):
        resolve_aux(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot save a OracleAux"):
        save_aux(OracleAux(rps_true_preference), tmp_path / "o")


@pytest.mark.parametrize("labels, match", [
    ([1.0, None, 0.0], r"row 1: label None; expected a preference label in \[0, 1\].*unlabelled"),
    ([1.0, float("nan"), 0.0], r"row 1: label nan"),
    ([1.0, 2.0, 0.0], r"row 1: label 2.0"),
    ([1.0, 0.0], r"labels has 2 rows but prompts has 3"),
])
def test_bad_labels_are_one_line_errors(labels, match):
    with pytest.raises(ValueError, match=match) as e:
        GPM(**FAST).fit(["p"] * 3, ["rock", "paper", "rock"], ["paper", "rock", "scissors"], labels)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("a, match", [
    (["rock", None, "rock"], r"row 1: response_a is None; expected a non-empty string"),
    (["rock", "  ", "rock"], r"row 1: response_a is '  '"),
])
def test_missing_text_is_a_one_line_error(a, match):
    with pytest.raises(ValueError, match=match):
        BradleyTerryAux(**FAST).fit(["p"] * 3, a, ["paper", "rock", "scissors"], [1, 0, 1])


def test_unfitted_and_unknown_backbone_errors():
    with pytest.raises(ValueError, match="not fitted"):
        GPM(**FAST).predict_proba(["p"], ["rock"], ["paper"])
    with pytest.raises(ValueError, match="backbone: 'bert'; expected one of"):
        GPM(backbone="bert").fit(["p"], ["rock"], ["paper"], [1.0])
    with pytest.raises(ValueError, match="dim: 3; expected an even"):
        GPM(backbone="table", dim=3).fit(["p"], ["rock"], ["paper"], [1.0])


def test_oracle_is_p_star_and_rejects_a_non_antisymmetric_truth():
    x, a, b = ["p"] * 3, ["rock", "paper", "rock"], ["paper", "rock", "rock"]
    oracle = OracleAux(rps_true_preference)
    assert oracle.fit(x, a, b, [1, 1, 1]) is oracle
    assert np.allclose(oracle.predict_proba(x, a, b), [0.1, 0.9, 0.5])
    bad = OracleAux(lambda x, a, b: np.full(len(x), 0.7))
    with pytest.raises(ValueError, match=r"p\*\(a, b\) \+ p\*\(b, a\) = 1.4 at pair 0; expected 1"):
        bad.predict_proba(x, a, b)


def test_judge_is_batched_and_position_bias_cancels():
    calls = []

    def biased_judge(prompts, a, b):  # prefers the longer answer, plus +0.1 for whichever is shown first
        calls.append(len(prompts))
        return np.clip([0.5 + 0.3 * np.sign(len(u) - len(v)) + 0.1 for u, v in zip(a, b)], 0, 1)

    judge = JudgeAux(biased_judge, batch_size=4)
    x, a, b = ["p"] * 10, ["a long answer"] * 5 + ["no"] * 5, ["no"] * 5 + ["a long answer"] * 5
    g = judge.predict_proba(x, a, b)
    assert np.allclose(g, [0.8] * 5 + [0.2] * 5)  # (0.9 + 1 - 0.3) / 2: the +0.1 cancels
    assert calls == [4, 4, 2, 4, 4, 2]  # both orders, 4 pairs at a time
    with pytest.raises(ValueError, match=r"judge .*returned 1.5 at pair 0"):
        JudgeAux(lambda x, a, b: [1.5] * len(x)).predict_proba(["p"], ["a"], ["b"])
    assert isinstance(judge, CallableAux)


def test_a_judges_own_errors_are_one_line_naming_it():
    """JudgeAux calls the user's judge batch by batch inside the same boundary as CallableAux."""
    from vrpo.aux import JudgeAux
    from vrpo.errors import UserError

    def broken(prompts, a, b):
        raise KeyError("model")

    with pytest.raises(UserError, match=r"^--aux my-judge: your code raised KeyError: 'model'$"):
        JudgeAux(broken, name="my-judge").predict_proba(["x"], ["a"], ["b"])
    with pytest.raises(UserError, match=r"returned NoneType None; expected a list of 2 probabilities"):
        JudgeAux(lambda p, a, b: None, name="lazy").predict_proba(["x", "y"], ["a", "c"], ["b", "d"])
