"""The IMDb experiment's parts: data splits, gold reward, simulated reviewers, methods table,
report, and (slow) a micro end-to-end ``reproduce imdb`` run."""
import json

import numpy as np
import pytest

from vrpo.experiments.imdb import data, methods, presets, report, reviewers


@pytest.fixture(scope="module")
def reviews():
    return data.load_reviews()


def test_clean_review_removes_html_breaks():
    assert data.clean_review("Great.<br /><br />Really  <BR>good. ") == "Great. Really good."


def test_reviews_are_distinct_and_balanced(reviews):
    texts = [r.text for r in reviews]
    assert len(set(texts)) == len(texts) > 24_000  # 25,000 minus duplicated texts
    assert 0.45 < np.mean([r.label for r in reviews]) < 0.55


def test_splits_are_disjoint_and_sized(reviews):
    sizes = presets.PRESETS["quick"].split_sizes
    splits = data.split_reviews(reviews, sizes, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {k: sizes[k] for k in data.SPLITS}
    seen = set()
    for name in data.SPLITS:
        texts = {r.text for r in splits[name]}
        assert not texts & seen, f"{name} shares reviews with an earlier split"
        seen |= texts
    again = data.split_reviews(reviews, sizes, seed=0)
    assert [r.text for r in again["eval"]] == [r.text for r in splits["eval"]]  # seeded


def test_split_errors_are_one_line(reviews):
    with pytest.raises(ValueError, match="only .* distinct IMDb reviews"):
        data.split_reviews(reviews, {"gold": 30_000})
    with pytest.raises(ValueError, match="unknown split"):
        data.split_reviews(reviews, {"train": 10})


@pytest.fixture(scope="module")
def gold(reviews):
    from vrpo.experiments.imdb.gold import GoldReward

    splits = data.split_reviews(reviews, {"gold": 4_000, "eval": 1_000}, seed=0)
    model = GoldReward().fit([r.text for r in splits["gold"]], [r.label for r in splits["gold"]])
    return model, splits["eval"]


def test_gold_reward_is_accurate_on_held_out_reviews(gold):
    model, held = gold
    acc = model.accuracy([r.text for r in held], [r.label for r in held])
    assert acc > 0.83  # 4k training reviews; the experiment's 10k give ~0.87
    s = model.score(["A wonderful, moving film. Brilliant acting.", "Awful. The worst, most boring movie ever."])
    assert 0 <= s[1] < 0.5 < s[0] <= 1


def test_reviewer_mixture_is_not_bradley_terry():
    # Bradley-Terry: logit P(a>c) = logit P(a>b) + logit P(b>c) for every triple. Known items
    # (gold score s, word count n): a positive and long, b neutral, c negative and short.
    s = {"a": 0.9, "b": 0.45, "c": 0.1}
    n = {"a": 30, "b": 18, "c": 10}

    def p(x, y):
        return float(reviewers.mixture_preference(s[x], s[y], n[x], n[y]))

    def logit(q):
        return np.log(q / (1 - q))

    gap = logit(p("a", "c")) - (logit(p("a", "b")) + logit(p("b", "c")))
    assert abs(gap) > 1.0, gap
    # each group alone IS Bradley-Terry in its own utility (so the gap comes from mixing)
    for name, group in reviewers.GROUPS.items():
        if name == "skimmer":
            continue  # thresholded: P in {0.05, 0.5, 0.95}, BT in 1[s > 1/2] with a fixed scale
        q = lambda x, y: float(group(s[x], s[y], n[x], n[y]))  # noqa: E731
        assert logit(q("a", "c")) == pytest.approx(logit(q("a", "b")) + logit(q("b", "c")), abs=1e-9)


def test_reviewer_groups_hand_values_and_antisymmetry():
    assert reviewers.skimmer(0.8, 0.2, 0, 0) == pytest.approx(0.95)
    assert reviewers.skimmer(0.8, 0.7, 0, 0) == pytest.approx(0.5)
    assert reviewers.wordy(0, 0, 12, 10) == pytest.approx(1 / (1 + np.exp(-1.0)))
    rng = np.random.default_rng(0)
    sa, sb, na, nb = rng.random(50), rng.random(50), rng.integers(5, 30, 50), rng.integers(5, 30, 50)
    total = reviewers.mixture_preference(sa, sb, na, nb) + reviewers.mixture_preference(sb, sa, nb, na)
    assert np.allclose(total, 1.0)


def test_reviewers_labels_follow_p_star_and_aux_models(gold):
    model, _ = gold
    panel = reviewers.SimulatedReviewers(model)
    x = ["This film"] * 2
    a, b = [" was a wonderful, brilliant movie", " is great"], [" was awful and boring, a waste of time", " is bad"]
    p_star = panel.preference(x, a, b)
    assert (p_star > 0.5).all()
    reps = 2000  # one call labelling each pair 2000 times: frequencies match p* within ~3 se
    labels = panel.label(x * reps, a * reps, b * reps, np.random.default_rng(0)).reshape(reps, 2).mean(0)
    assert np.allclose(labels, p_star, atol=0.04)
    oracle = reviewers.OracleAux(panel)
    assert np.allclose(oracle.predict_proba(x, a, b), p_star)
    judge = reviewers.WordCountJudge()
    g = judge.predict_proba(x, a, b)
    assert np.allclose(g + judge.predict_proba(x, b, a), 1.0)
    assert g[0] < 0.5  # the misspecified judge prefers the longer, negative response
    with pytest.raises(ValueError, match="summing to 1"):
        reviewers.SimulatedReviewers(model, {"careful": 0.5})


def test_methods_table_is_consistent_with_the_trainer():
    from vrpo.losses import BASE_LOSSES
    from vrpo.train.methods import METHODS as TRAIN_METHODS

    for spec in methods.METHODS.values():
        assert spec.method is None or spec.method in TRAIN_METHODS
        assert spec.base_loss in BASE_LOSSES
        if spec.method == "vrpo":
            assert spec.aux in methods.AUX_KINDS and spec.reference in methods.REFERENCE_KINDS
            assert spec.num_ref_samples >= 2
    assert set(report.PAPER_IMDB) == {s.paper_row for s in methods.METHODS.values() if s.paper_row}
    for preset in presets.PRESETS.values():
        methods.get_methods(preset.methods + preset.frontier_methods)
        assert preset.num_train_pairs <= preset.num_pool_prompts
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get_methods(["nope"])


def test_shape_checks_on_hand_made_table():
    table = {m: {"avg": {"mean": v}} for m, v in {
        "dpo": 0.6, "vrpo-ramp-k4-correct-oracle": 0.8, "vrpo-ramp-k4-correct-fitted": 0.75,
        "vrpo-ramp-k4-correct-misspecified": 0.7, "vrpo-ramp-k4-misspecified-oracle": 0.65}.items()}
    comp = {f"{methods.HEADLINE} vs dpo": {"0.0": {"diff_ci": [0.01, 0.1]}, "1.0": {"diff_ci": [-0.01, 0.1]}}}
    shape = report.shape_checks(table, comp, ["0.0", "1.0"])
    assert shape == {"vrpo_oracle_above_dpo_every_temperature_ci_excludes_zero": False,
                     "oracle_ge_fitted_ge_misspecified": True, "smaller_gain_with_misspecified_pi_ref": True}


def test_cli_arguments_are_validated():

    from vrpo.experiments import imdb

    from vrpo.cli_args import OneLineParser

    parser = OneLineParser(prog="vrpo reproduce imdb")
    imdb.add_arguments(parser)
    for argv in (["--preset", "huge"], ["--seeds", "0"]):  # refused by the parser, in one line
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="unknown method"):
        imdb._preset_from_args(parser.parse_args(["--methods", "dpo,nope"]))
    assert imdb._preset_from_args(parser.parse_args(["--seeds", "2", "--methods", "sft,dpo"])).seeds == (0, 1)


def _imdb_args(tmp_path, monkeypatch, *argv):
    """`vrpo reproduce imdb --preset micro --out TMP/imdb --no-progress ARGV` with a private cache."""
    import argparse

    from vrpo.experiments import imdb

    monkeypatch.setenv("VRPO_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    imdb.add_arguments(parser)
    return parser.parse_args(["--preset", "micro", "--out", str(tmp_path / "imdb"), "--no-progress", *argv])


def test_damaged_invocation_log_stops_before_any_work(tmp_path, monkeypatch, capsys):
    from vrpo.cli import main

    _imdb_args(tmp_path, monkeypatch)
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "invocations.jsonl").write_text('{"seconds": 3.0}\nnot json\n')
    argv = ["reproduce", "imdb", "--preset", "micro", "--out", str(tmp_path / "imdb"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invocations.jsonl: line 2 is not a JSON record" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "imdb" / "data").exists()  # nothing computed
    (tmp_path / "imdb" / "invocations.jsonl").write_text('{"seconds": "soon"}\n')
    assert main(argv) == 2 and "line 1: expected an object with numeric 'seconds'" in capsys.readouterr().err


@pytest.mark.slow
def test_micro_reproduce_end_to_end_and_resume(tmp_path, monkeypatch):
    from vrpo.experiments import imdb

    args = _imdb_args(tmp_path, monkeypatch)
    out = tmp_path / "imdb"
    assert imdb.run(args) == 0
    res = json.loads((out / "results.json").read_text())
    micro = presets.PRESETS["micro"]
    assert set(res["results"]) == set(micro.methods)
    table = res["summary"]["table"]
    for m in micro.methods:
        for t in micro.temperatures:
            assert 0.0 <= table[m][str(float(t))]["mean"] <= 1.0
        assert len(res["results"][m]) == len(micro.seeds)
    assert table["sft"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    # the misspecified-pi_ref row trained on tempered samples: recorded, not hidden
    mis = res["results"]["vrpo-ramp-k4-misspecified-misspecified"]
    assert any("temperature 0.7" in msg for msg in mis["0"]["allowed_mismatches"])
    md = (out / "results.md").read_text()
    assert "| DPO (sigmoid) |" in md and "vrpo reproduce imdb --preset micro" in md
    assert (out / "score_vs_temperature.png").stat().st_size > 0 and (out / "score_vs_kl.png").exists()
    assert (out / "runs" / "dpo" / "seed0" / "model" / "config.yaml").exists()  # vrpo.train's run record
    # a rerun reuses every finished (method, seed)
    done = out / "runs" / "dpo" / "seed1" / "result.json"
    stamp = done.stat().st_mtime_ns
    assert imdb.run(args) == 0
    assert done.stat().st_mtime_ns == stamp
    # each invocation's time is kept, so a resumed experiment still states its full cost
    log = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[0]["seconds"] > log[1]["seconds"] > 0
    assert "of all 2 invocations into this folder" in (out / "results.md").read_text()
    assert f"recorded by the {len(micro.methods) * len(micro.seeds)} (method, seed) runs" in \
        (out / "results.md").read_text()


def test_pretrained_policy_is_cached_and_tied_to_its_texts(reviews, tmp_path, monkeypatch):
    from vrpo.experiments.imdb import policy

    monkeypatch.setenv("VRPO_CACHE", str(tmp_path))
    cfg = policy.PolicyConfig(vocab_size=300, n_embd=16, n_layer=1, n_head=2, seq_len=16, tokenizer_reviews=100,
                              pretrain_tokens=1_600, batch_size=10)
    texts = [r.text for r in reviews[:200]]
    folder = policy.load_or_pretrain(texts, cfg, progress=False)
    info = json.loads((folder / "pretrain.json").read_text())
    assert info["steps"] == 10 and info["final_loss"] < np.log(300) + 0.5  # at most a uniform guess
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert policy.load_or_pretrain(texts, cfg, progress=False) == folder  # reused, not retrained
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="pre-trained on other reviews"):
        policy.load_or_pretrain([r.text for r in reviews[200:400]], cfg, progress=False)


def test_report_from_hand_made_results(tmp_path):
    """summarize -> markdown -> plots on known per-prompt scores (no training)."""
    rng = np.random.default_rng(0)
    temps = (0.0, 1.0)

    def result(level, kl):
        return {"scores": {str(t): list(np.clip(level + 0.05 * rng.normal(size=40), 0, 1)) for t in temps},
                "mean_score": {str(t): level for t in temps}, "kl": kl}

    results = {"sft": {s: result(0.5, 0.0) for s in range(3)},
               "dpo": {s: result(0.6, 2.0) for s in range(3)},
               "dpo@beta=0.05": {s: result(0.65, 6.0) for s in range(3)},
               methods.HEADLINE: {s: result(0.8, 3.0) for s in range(3)},
               "ramp-dpo": {s: result(0.8, 9.0) for s in range(3)}}
    summary = report.summarize(results, temps, n_boot=200)
    comp = summary["comparisons"][f"{methods.HEADLINE} vs dpo"]["1.0"]
    assert comp["diff_ci"][0] > 0.15 and comp["ci_low"] > 0.9  # 0.8 vs 0.6 with noise 0.05: clearly better
    # like for like (same ramp loss): equal levels, so the CI of the difference straddles zero
    same = summary["comparisons"][f"{methods.HEADLINE} vs ramp-dpo"]["1.0"]
    assert same["diff_ci"][0] < 0 < same["diff_ci"][1]
    # a comparison whose row did not run is left out, not filled in
    assert "vrpo-sigmoid-k4-correct-oracle vs dpo" not in summary["comparisons"]
    assert summary["shape"]["vrpo_oracle_above_dpo_every_temperature_ci_excludes_zero"] is True
    assert report.frontier_points(summary, "1.0")["dpo"] == [(2.0, 0.6), (6.0, 0.65)]
    md = report.results_markdown(summary, temps, "vrpo reproduce imdb --preset quick",
                                 {"preset": "quick", "num_seeds": 3, "num_eval_prompts": 40})
    assert "| DPO (sigmoid) | 0.600 ± 0.000 | 0.600 ± 0.000 | 2.00 | 0.804 / 0.811" in md
    assert "DPO (sigmoid), beta=0.05" in md and "`vrpo reproduce imdb --preset quick`" in md
    paths = report.plot(summary, results, temps, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_two_stage_settings_error_names_the_preset():
    from vrpo.experiments.imdb import EXTRA_SECTIONS, two_stage

    assert EXTRA_SECTIONS["two_stage"] == "vrpo.experiments.imdb.two_stage:two_stage_section"
    assert set(two_stage.SETTINGS) == set(presets.PRESETS)  # every preset has its two-stage rows
    with pytest.raises(ValueError, match="--preset huge"):
        two_stage.get_settings("huge")


@pytest.mark.slow
def test_micro_reproduce_has_the_two_stage_section(tmp_path, monkeypatch):
    """results.json["two_stage"] and the results.md section of a micro run (SFT only, 2 seeds)."""
    from vrpo.experiments import imdb
    from vrpo.experiments.imdb.two_stage import SETTINGS

    out = tmp_path / "imdb"
    assert imdb.run(_imdb_args(tmp_path, monkeypatch, "--methods", "sft")) == 0
    ts = json.loads((out / "results.json").read_text())["two_stage"]
    micro, settings = presets.PRESETS["micro"], SETTINGS["micro"]
    seeds = {str(s) for s in micro.seeds}
    assert set(ts["rows"]) == set(settings.rows) and {"bt", "vrpo"} <= {r["method"] for r in ts["rows"].values()}
    assert 0.5 <= ts["rm_accuracy_ceiling"] <= 1.0 and ts["num_eval_pairs"] == micro.num_eval_prompts
    for name, row in ts["rows"].items():
        assert row["base_loss"] == settings.rows[name].get("base_loss", "sigmoid")
        assert row["K"] == settings.rows[name].get("num_ref_samples")
        assert set(row["rm_accuracy"]) == seeds and set(row["best_of_n_gold"]) == seeds
        # expected agreement with p* can never beat the Bayes rule; best-of-n never beats the judge's own pick
        assert all(0.0 <= a <= ts["rm_accuracy_ceiling"] + 1e-9 for a in row["rm_accuracy"].values())
        assert all(0.0 <= g <= ts["best_of_n_gold_by_gold"] + 1e-9 for g in row["best_of_n_gold"].values())
        spread = row["reward_spread"]
        assert spread["num_seeds"] == len(seeds) and 0.0 <= spread["sign_disagreement"] <= 1.0
        assert spread["normalized_margin_variance"] >= 0.0
        policy = row["policy"]  # micro runs one RLOO step on the first seed
        assert set(policy["mean_score"]) == {str(s) for s in settings.rl_seeds}
        for scores in policy["mean_score"].values():
            assert set(scores) == {str(float(t)) for t in micro.temperatures}
            assert all(0.0 <= v <= 1.0 for v in scores.values())
    md = (out / "results.md").read_text()
    assert "## Two-stage rows: reward model" in md
    assert all(f"| {name} | " in md.split("## Two-stage rows")[1] for name in settings.rows)
    assert (out / "two_stage" / "vrpo-ramp-k4" / "seed1" / "reward_model" / "config.yaml").exists()


def test_gold_reward_round_trips_through_data_files_exactly(tmp_path):
    """The gold reward's cache is JSON + safetensors (nothing that unpickles), and a loaded
    model scores exactly as the fitted one; a cache of other texts is refitted, not reused."""
    from vrpo.experiments.imdb.gold import CONFIG_FILE, GoldReward, load_or_fit_gold

    texts = ["a great movie", "great acting, great plot", "a terrible movie", "boring and terrible plot",
             "great fun", "terrible acting"] * 3
    labels = [1, 1, 0, 0, 1, 0] * 3
    fitted = load_or_fit_gold(tmp_path / "gold", texts, labels)
    assert sorted(p.name for p in (tmp_path / "gold").iterdir()) == ["gold.json", "gold.safetensors"]
    probe = ["great plot", "terrible fun", "an unseen word", "great great terrible"]
    loaded = GoldReward.load(tmp_path / "gold")
    assert np.array_equal(loaded.score(probe), fitted.score(probe))
    assert load_or_fit_gold(tmp_path / "gold", texts, labels).score(probe).tolist() == fitted.score(probe).tolist()
    before = json.loads((tmp_path / "gold" / CONFIG_FILE).read_text())["texts_fingerprint"]
    other = load_or_fit_gold(tmp_path / "gold", texts, [1 - y for y in labels])  # other labels: refitted, not reused
    assert json.loads((tmp_path / "gold" / CONFIG_FILE).read_text())["texts_fingerprint"] != before
    assert np.allclose(other.score(probe), 1 - fitted.score(probe), atol=1e-6)


def test_no_file_of_the_project_is_unpickled():
    """Nothing a user or a cache folder could plant is unpickled: no pickle / torch.load / joblib
    in the source tree."""
    import re
    from pathlib import Path

    src = Path(__file__).parents[1] / "src" / "vrpo"
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|\bjoblib\b|\bcloudpickle\b")
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
