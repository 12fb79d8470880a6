"""`vrpo reproduce lm-regimes`: the regime reviewers (hand values, the Condorcet cycle), the
measurement helpers against direct computations, and a micro end-to-end run (slow)."""
import json

import numpy as np
import pytest

from vrpo.experiments.imdb import reviewers


class FixedGold:
    """A gold reward that reads the score off the text: 'text|0.83' -> 0.83."""

    def score(self, texts):
        return np.array([float(t.rsplit("|", 1)[1]) for t in texts])


def _feats(s, chars, punct):
    return {"s": np.asarray([s], dtype=float), "chars": np.asarray([chars], dtype=float),
            "punct": np.asarray([punct], dtype=float)}


def test_majority_panel_hand_value_and_condorcet_cycle():
    panel = reviewers.MajorityPanel(FixedGold())
    # judges: p = (0.9, 0.2, 0.7) -> majority 0.9*0.2 + 0.9*0.7 + 0.2*0.7 - 2*0.9*0.2*0.7 = 0.698
    p = panel.prob.__func__  # the formula, with judges replaced by known probabilities
    panel.judges = lambda fa, fb: [np.array([0.9]), np.array([0.2]), np.array([0.7])]
    assert float(p(panel, None, None)[0]) == pytest.approx(0.698)
    panel = reviewers.MajorityPanel(FixedGold())
    # a = (high s, mid length, low punct), b = (mid, low, high), c = (low, high, mid): a > b > c > a
    a, b, c = _feats(0.9, 100, 0), _feats(0.5, 60, 4), _feats(0.1, 140, 2)
    assert panel.prob(a, b)[0] > 0.9 and panel.prob(b, c)[0] > 0.9 and panel.prob(c, a)[0] > 0.9
    for x, y in ((a, b), (b, c), (a, c)):
        assert panel.prob(x, y)[0] + panel.prob(y, x)[0] == pytest.approx(1.0)


def test_sharp_and_target_reviewers_hand_values():
    sharp = reviewers.SharpSentimentReviewer(FixedGold())
    assert sharp.preference(["x "], ["a|0.6"], ["b|0.5"])[0] == pytest.approx(1 / (1 + np.exp(-4.0)))
    target = reviewers.TargetSentimentReviewer(FixedGold(), target=0.7)
    # u(0.75) = -0.05 beats u(0.95) = -0.25: the most positive answer loses
    assert target.preference(["x "], ["a|0.75"], ["b|0.95"])[0] == pytest.approx(1 / (1 + np.exp(-40 * 0.2)))
    assert target.utility(target.features(["x "], ["a|0.75"]))[0] == pytest.approx(-0.05)
    rng = np.random.default_rng(0)
    labels = sharp.label(["x "] * 4000, ["a|0.55"] * 4000, ["b|0.5"] * 4000, rng)
    assert labels.mean() == pytest.approx(1 / (1 + np.exp(-2.0)), abs=0.025)


def test_features_count_characters_and_punctuation():
    assert reviewers.char_count([" ab c "]).tolist() == [4.0]
    assert reviewers.punctuation_count(["Yes, it is! Really?"]).tolist() == [3.0]


def test_measured_minibatch_and_bootstrap_ratios_match_direct_computation():
    """Block-averaged measured ratio, the ratio across datasets of 8 examples, and its bootstrap
    interval, against loops written out here."""
    from vrpo.experiments.lm_regimes.stages import block_measured_ratios, bootstrap_ratios, minibatch_ratios, realised_scores

    rng = np.random.default_rng(1)
    n, d = 64, 5
    obs, aux = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 0.5
    blocks = {"2": rng.normal(size=(n, 2, d)), "4": rng.normal(size=(n, 1, d)) * 0.5}  # K0 = 4
    scores = realised_scores((obs, aux, {"u_blocks": blocks}))
    tv = lambda v: ((v - v.mean(0)) ** 2).sum()  # noqa: E731
    measured = block_measured_ratios(scores)
    assert measured["2"] == pytest.approx((tv(obs - aux + blocks["2"][:, 0]) + tv(obs - aux + blocks["2"][:, 1])) / 2 / tv(obs))
    ratios, datasets = minibatch_ratios(scores, batch=8)
    assert datasets == 8
    means = lambda v: v.reshape(8, 8, d).mean(1)  # noqa: E731
    assert ratios["4"] == pytest.approx(tv(means(obs - aux + blocks["4"][:, 0])) / tv(means(obs)))
    ci = bootstrap_ratios(scores, n_boot=400)
    for k in blocks:
        assert ci[k][0] < measured[k] < ci[k][1]


def test_label_expected_ratios_equal_the_average_over_fresh_label_draws():
    """The measured ratios in expectation over the labels (exact, from p*) against Monte Carlo:
    the same pairs and reference samples relabelled 1500 times, Bernoulli(p*) each time, the
    numerators and denominators averaged over draws."""
    from vrpo.experiments.lm_regimes import stages
    from vrpo.loss_gradients import scores_from_table

    rng = np.random.default_rng(3)
    n, k0, d = 16, 4, 6
    table = {"logps": rng.normal(size=(n, 2 + k0)) * 3, "ref_logps": rng.normal(size=(n, 2 + k0)) * 3,
             "grads": rng.normal(size=(n, 2 + k0, d))}
    p = rng.uniform(0.05, 0.95, n)
    ref = rng.uniform(size=(n, k0, k0))
    ref = np.triu(ref, 1) + np.tril(1 - ref.transpose(0, 2, 1), -1) + 0.5 * np.eye(k0)
    exact = stages.label_expected_scores(table, {}, p, ref, beta=0.5)
    tv = lambda v: ((v - v.mean(0)) ** 2).sum() / (len(v) - 1)  # noqa: E731
    den, num = [], {"2": [], "4": []}
    for _ in range(1500):
        w = rng.random(n) < p
        obs, aux, summary = scores_from_table(table, 0.5, "sigmoid", np.where(w, p, 1 - p), ref, (2, 4), a_is_chosen=w)
        den.append(tv(obs.astype(float)))
        for kk, u in summary["u_blocks"].items():
            num[kk].append(np.mean([tv(obs - aux + u[:, b]) for b in range(u.shape[1])]))
    ratios = stages.block_measured_ratios(exact)
    for kk in ("2", "4"):
        assert ratios[kk] == pytest.approx(np.mean(num[kk]) / np.mean(den), rel=0.03)
    assert stages.expected_trace_var(*exact["dpo"]) == pytest.approx(np.mean(den), rel=0.03)
    spread = stages.label_draw_spread(exact, draws=400, seed=1)
    per_draw = np.asarray(num["4"]) / np.asarray(den)
    assert spread["4"]["sd"] == pytest.approx(per_draw.std(), rel=0.25)
    assert spread["4"]["range"][0] < ratios["4"] < spread["4"]["range"][1]
    # a dataset of one pair per example: the label expectation is larger than no label noise at all
    assert stages.expected_trace_var(*exact["dpo"]) > tv(exact["dpo"][0])


def test_unknown_regime_is_a_one_line_error(capsys):
    from vrpo.cli import main

    assert main(["reproduce", "lm-regimes", "--regimes", "sharp,bogus", "--out", "/tmp/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err


@pytest.mark.slow
def test_micro_lm_regimes_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    """The micro preset through the real command: per regime predicted and measured ratios
    keyed by K, the training comparison in the chosen regimes, the report and the plot; a rerun
    reuses every stage."""
    from vrpo.cli import main
    from vrpo.experiments.lm_regimes.presets import PRESETS

    monkeypatch.setenv("VRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["reproduce", "lm-regimes", "--preset", "micro", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    micro = PRESETS["micro"]
    assert set(res["regimes"]) == set(micro.regimes)
    for name, r in res["regimes"].items():
        assert set(r["predicted_ratio"]) == {"2", "4", "8", "16"}
        assert set(r["measured_ratio"]) == {"2", "4"}  # micro draws 4 reference samples per measured example
        assert r["predicted_ratio"]["2"] == pytest.approx(1.0)
        assert all(np.isfinite(v) for v in r["measured_ratio"].values())
        m = r["by_checkpoint"][r["checkpoint"]]["measurement"]
        assert set(m["realised_labels_ratio"]) == {"2", "4"} and all(v["sd"] >= 0 for v in m["realised_labels_spread"].values())
        assert r["in_sample"]["n"] == micro.imdb.diagnostic_rows  # the pitfall: the checkpoint's own pairs
    assert res["training_regimes"] and set(res["training_regimes"]) <= set(micro.regimes)
    t = res["regimes"][res["training_regimes"][0]]["training"]
    assert set(t["table"]) == set(micro.train_methods) and "vrpo-oracle - dpo" in t["paired"]
    md = (out / "results.md").read_text()
    assert "vrpo reproduce lm-regimes --preset micro" in md and "nan" not in md.lower()
    assert (out / "predicted_vs_measured.png").stat().st_size > 0
    logs = list(out.rglob("train.log"))  # each training run's Trainer output went to its log, not the terminal
    assert logs and all("'loss'" in p.read_text() or "train_loss" in p.read_text() for p in logs)
    printed = capsys.readouterr()
    assert "train_loss" not in printed.out and "sampling K=" not in printed.err  # --no-progress: no bars
    stamp = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    assert main(argv) == 0  # resumed: no run is trained again
    assert all(p.stat().st_mtime == m for p, m in stamp.items())
    # fewer regimes and seeds: the same folder, every stage reused; other sizes: refused in one line
    assert main(argv + ["--regimes", micro.regimes[0], "--seeds", "1"]) == 0
    assert all(p.stat().st_mtime == m for p, m in stamp.items())
    assert set(json.loads((out / "results.json").read_text())["regimes"]) == {micro.regimes[0]}
    capsys.readouterr()
    assert main(["reproduce", "lm-regimes", "--preset", "quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err


@pytest.mark.slow
def test_scheduling_long_preset_diagnoses_rows_its_checkpoint_never_saw(tmp_path):
    """`vrpo reproduce scheduling --preset long` (sizes shrunk, a tiny GPT-2 in place of SmolLM2):
    the share of changed greedy answers per method, and `vrpo diagnose --model` at a DPO run on
    half the labelled prompts, on the other half's scored rows."""
    from vrpo.cli import main
    from vrpo.experiments.scheduling.prompts import patient_messages
    from vrpo.testing import build_tiny_causal_lm

    texts = [r["message"] for r in patient_messages(10, seed=9)] + ["Please call 911. I can book you Tuesday at 10am."] * 5
    model = build_tiny_causal_lm(tmp_path / "tiny", texts, vocab_size=400)
    run = tmp_path / "run"
    assert main(["reproduce", "scheduling", "--preset", "long", "--model", str(model), "--out", str(run),
                 "--train-per-slice", "2", "--eval-per-slice", "1", "--max-new-tokens", "6", "--max-steps", "2"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert set(res["greedy_changed"]) == {"dpo", "vrpo", "vrpo_oracle"}
    assert all(0.0 <= v <= 1.0 for v in res["greedy_changed"].values())
    trained = {json.loads(line)["prompt_id"] for line in (run / "diagnose" / "train-half.jsonl").read_text().splitlines()}
    held = {json.loads(line)["prompt_id"] for line in (run / "diagnose" / "held-out.jsonl").read_text().splitlines()}
    assert trained and held and not trained & held
    d = res["diagnosis"]
    assert d["n"] == len(held) and d["predicted_ratio"]["2"] == pytest.approx(1.0)
    assert "LoRA adapter of the run" in d["gradients"]["differentiated"]
    assert "Greedy answers changed" in (run / "results.md").read_text()


@pytest.mark.slow
def test_micro_scheduling_regime_with_a_lora_checkpoint(tmp_path, monkeypatch):
    """The scheduling regime's path (chat prompts, the panel's p*, a LoRA DPO checkpoint whose
    adapter is differentiated) on a tiny GPT-2 in place of SmolLM2."""
    from vrpo.cli import main
    from vrpo.experiments.scheduling.prompts import patient_messages
    from vrpo.testing import build_tiny_causal_lm

    monkeypatch.setenv("VRPO_CACHE", str(tmp_path / "cache"))
    texts = [r["message"] for r in patient_messages(10, seed=9)] + ["Please call 911. I can book you Tuesday at 10am."] * 5
    model = build_tiny_causal_lm(tmp_path / "tiny", texts, vocab_size=400, n_positions=512)  # system prompt: ~300 tokens
    out = tmp_path / "out"
    assert main(["reproduce", "lm-regimes", "--preset", "micro", "--regimes", "scheduling", "--scheduling-model",
                 str(model), "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())["regimes"]["scheduling"]
    assert r["world"] == "scheduling" and set(r["by_checkpoint"]) == {"dpo"}
    assert set(r["measured_ratio"]) == {"2", "4"} and r["predicted_ratio"]["2"] == pytest.approx(1.0)
    assert (out / "scheduling" / "scheduling" / "runs" / "dpo" / "seed0" / "model" / "adapter").is_dir()
