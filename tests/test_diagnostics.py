"""vrpo.diagnostics: the variance decomposition on known inputs and the `vrpo diagnose` command."""
import itertools
import json

import numpy as np
import pytest

from vrpo.diagnostics import pair_moments, u_statistic_variance, variance_decomposition


def _symmetric_pairs(rng, n, K, d):
    m = rng.normal(size=(n, K, K, d))
    return m + m.transpose(0, 2, 1, 3)


def test_pair_moments_match_brute_force_loops():
    """S2 = mean |m_jk|^2, S1 = mean <m_jk, m_jl> (one shared index), S0 = mean over
    disjoint pairs; zeta_2 = S2 - S0, zeta_1 = S1 - S0. Loops over all index tuples."""
    rng = np.random.default_rng(0)
    m = _symmetric_pairs(rng, 2, 5, 3)
    z2, z1 = pair_moments(m)
    K = 5
    for i in range(2):
        s2 = np.mean([m[i, j, k] @ m[i, j, k] for j, k in itertools.permutations(range(K), 2)])
        s1 = np.mean([m[i, j, k] @ m[i, j, l] for j, k, l in itertools.permutations(range(K), 3)])
        s0 = np.mean([m[i, j, k] @ m[i, a, b] for j, k, a, b in itertools.permutations(range(K), 4)])
        assert z2[i] == pytest.approx(s2 - s0)
        assert z1[i] == pytest.approx(s1 - s0)


def test_pair_moments_are_unbiased_for_an_additive_pair_score():
    """m(Y1, Y2) = h(Y1) + h(Y2) with h ~ N(0, 1) in d = 2: Var m = 2 * 2 = 4 (trace),
    Cov(m(Y1, Y2), m(Y1, Y3)) = Var h = 2."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(4000, 6, 2))
    m = h[:, :, None, :] + h[:, None, :, :]
    z2, z1 = pair_moments(m)
    assert z2.mean() == pytest.approx(4.0, rel=0.05)
    assert z1.mean() == pytest.approx(2.0, rel=0.05)


def test_u_statistic_variance_hand_values():
    """K = 2: one pair, v = zeta_2. K = 4: 4*2/12 zeta_1 + 2/12 zeta_2 = 2/3 z1 + 1/6 z2."""
    assert u_statistic_variance(2, 3.0, 1.0) == pytest.approx(3.0)
    assert u_statistic_variance(4, 3.0, 1.0) == pytest.approx(2 / 3 + 0.5)


def _simulated_scores(rng, n, K, d):
    """Per example: responses h ~ N(mu_x, I) (mu_x varies: between-prompt variance), a pair
    score m(a, b) = h_a + h_b + h_a * h_b / 2 (symmetric, not additive: zeta_1 < zeta_2), the
    labelled pair a FRESH pair of the same prompt, its label noise N(0, I). Returns
    (observed, its conditional mean = the oracle aux, all K x K reference pair scores)."""
    mu = 0.5 * rng.normal(size=(n, 1, d))
    h = mu + rng.normal(size=(n, K + 2, d))
    pair = lambda a, b: a + b + 0.5 * a * b  # noqa: E731
    ref = pair(h[:, :K, None, :], h[:, None, :K, :])
    aux = pair(h[:, K], h[:, K + 1])
    return aux + rng.normal(size=(n, d)), aux, ref


def test_decomposition_predicts_the_variance_measured_by_simulation():
    """The predicted VRPO/base variance ratio (Hoeffding's formula on estimated zeta_1, zeta_2)
    against the ratio measured on simulated scores, where the truth is what the simulation
    draws: K = 2 removes nothing (a fresh pair varies as much as the observed one), larger K
    removes more, and prediction and measurement agree."""
    rng = np.random.default_rng(2)
    obs, aux, ref = _simulated_scores(rng, 8000, 6, 2)  # Monte Carlo error of the ratios: about 0.02
    r = variance_decomposition(obs, aux, ref, ks=(2, 4, 6))
    assert r["measured_ratio"]["2"] == pytest.approx(1.0, abs=0.05)
    for k in ("4", "6"):
        assert r["measured_ratio"][k] == pytest.approx(r["predicted_ratio"][k], abs=0.05), k
    assert r["measured_ratio"]["6"] < r["measured_ratio"]["4"] < 0.8
    assert 0 < r["removable_share"]["4"] < r["removable_share"]["6"] < r["removable_share"]["limit"] < r["pair_share"] + 1e-12
    # the parts of the simulated total: label noise Var N(0, I_2) = 2
    assert r["label_noise"] == pytest.approx(2.0, rel=0.05)


def test_pure_label_noise_leaves_nothing_to_remove():
    rng = np.random.default_rng(3)
    n, K, d = 300, 6, 2
    noise = rng.normal(size=(n, d))
    r0 = variance_decomposition(noise, np.zeros((n, d)), np.zeros((n, K, K, d)), ks=(2, 8))
    assert r0["removable_share"]["8"] == pytest.approx(0.0, abs=1e-12)
    assert r0["label_noise_share"] == pytest.approx(1.0, rel=0.05)


def test_decomposition_rejects_bad_shapes_with_one_line_errors():
    obs = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"ref_pair_scores: shape") as e:
        variance_decomposition(obs, obs, np.zeros((5, 4, 4, 3)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="at least 4"):
        variance_decomposition(obs, obs, np.zeros((5, 3, 3, 2)))
    with pytest.raises(ValueError, match="observed"):
        variance_decomposition(obs, np.zeros((4, 2)), np.zeros((5, 4, 4, 2)))


def _scored_frame(k, n=12):
    import pandas as pd

    rng = np.random.default_rng(3)
    words = ["book", "tuesday", "urgent", "care", "call", "doctor", "today", "appointment", "emergency"]
    text = lambda: " ".join(rng.choice(words, size=5))  # noqa: E731
    rows = []
    for i in range(n):
        g = rng.uniform(size=(k, k))
        g = (g + 1 - g.T) / 2
        rows.append({"prompt": f"p{i}", "chosen": text(), "rejected": text(), "aux_prob": float(rng.uniform()),
                     "ref_samples": [text() for _ in range(k)], "ref_aux_prob": g.tolist()})
    return pd.DataFrame(rows)


def test_diagnose_command_on_scored_parquet(tmp_path, capsys):
    from vrpo.cli import main

    path = tmp_path / "data.parquet"
    _scored_frame(5).to_parquet(path)
    out = tmp_path / "d.json"
    assert main(["diagnose", str(tmp_path), "--k", "2,4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "label noise" in text and "removable share" in text
    r = json.loads(out.read_text())
    assert r["removable_share"]["2"] == pytest.approx(0.0, abs=1e-9)
    assert set(r["removable_share"]) == {"2", "4", "limit"}


@pytest.mark.parametrize("k, argv, needle", [
    (2, [], "at least 4"),
    (5, ["--k", "1,4"], "--k"),
    (5, ["--k", "two"], "--k"),
])
def test_diagnose_bad_input_is_one_line_error(tmp_path, capsys, k, argv, needle):
    from vrpo.cli import main

    path = tmp_path / "data.parquet"
    _scored_frame(k).to_parquet(path)
    assert main(["diagnose", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_diagnose_missing_file_and_column(tmp_path, capsys):
    from vrpo.cli import main

    assert main(["diagnose", str(tmp_path / "nope.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _scored_frame(5).drop(columns=["ref_aux_prob"]).to_parquet(tmp_path / "data.parquet")
    assert main(["diagnose", str(tmp_path / "data.parquet")]) == 2
    assert "ref_aux_prob" in capsys.readouterr().err


def test_diagnose_reads_jsonl_like_parquet(tmp_path, capsys):
    """The same rows as JSON lines give the same numbers; a broken file is a one-line error."""
    from vrpo.cli import main

    frame = _scored_frame(5)
    frame.to_parquet(tmp_path / "data.parquet")
    frame.to_json(tmp_path / "data.jsonl", orient="records", lines=True)
    assert main(["diagnose", str(tmp_path / "data.parquet"), "--json", str(tmp_path / "a.json")]) == 0
    assert main(["diagnose", str(tmp_path / "data.jsonl"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["removable_share"] == pytest.approx(b["removable_share"])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    capsys.readouterr()
    assert main(["diagnose", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl" in err


def test_diagnose_on_degenerate_data_says_why_instead_of_printing_nan(tmp_path, capsys):
    """Every chosen == rejected: the base score is 0 for every example, its variance 0; the
    shares would be 0/0. One line saying why, exit 2."""
    from vrpo.cli import main

    frame = _scored_frame(5)
    frame["rejected"] = frame["chosen"]
    frame.to_parquet(tmp_path / "data.parquet")
    assert main(["diagnose", str(tmp_path / "data.parquet")]) == 2
    out, err = capsys.readouterr()
    assert "nan" not in out + err and len(err.strip().splitlines()) == 1 and "does not vary" in err
