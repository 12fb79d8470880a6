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
    (5, ["--k", ""], "--k"),
    (5, ["--features", "1"], "--features"),
    (5, ["--features", "many"], "--features"),
])
def test_diagnose_bad_input_is_one_line_error(tmp_path, capsys, k, argv, needle):
    from vrpo.cli import main

    path = tmp_path / "data.parquet"
    _scored_frame(k).to_parquet(path)
    try:
        code = main(["diagnose", str(path), *argv])
    except SystemExit as e:  # a flag's type is checked by the parser, which exits
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_diagnose_k_is_parsed_typed_and_json_is_written_atomically(tmp_path, capsys, monkeypatch):
    """--k reaches the decomposition as a list of ints; --json goes through the atomic write (no
    stray temporary file, a failed write leaves the old file whole); an unwritable --json is
    refused before any work."""
    from vrpo import provenance
    from vrpo.cli import main

    _scored_frame(5).to_parquet(tmp_path / "data.parquet")
    out = tmp_path / "sub" / "d.json"
    assert main(["diagnose", str(tmp_path), "--k", "3, 2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["predicted_ratio"]) == {"3", "2", "limit"} and set(r["measured_ratio"]) == {"2", "3"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.json"]
    out.write_text("old")

    def crash(src, dst):  # the process dies between writing the temporary file and renaming it
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(provenance.os, "replace", crash)
    assert main(["diagnose", str(tmp_path), "--k", "2", "--json", str(out)]) == 2
    assert out.read_text() == "old" and sorted(p.name for p in out.parent.iterdir()) == ["d.json"]
    monkeypatch.undo()
    capsys.readouterr()
    (tmp_path / "folder.json").mkdir()
    assert main(["diagnose", str(tmp_path), "--json", str(tmp_path / "folder.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--json" in err


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


# ----------------------------------------------------------------------------- --model: the checkpoint's own gradients
def _perturbed_copy(src, dst, scale=0.05, seed=1):
    """A copy of the tiny model with perturbed weights: a 'trained' policy whose margins against
    the original (pi_ref) are not zero."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def _direct_gradients(policy, ref, tokenizer, row, k, beta):
    """Per-example gradients of the ACTUAL losses by autograd, independently of
    vrpo.loss_gradients: padded batches (sequence_batch + attention mask), log-probs by
    vrpo.losses.sequence_logps, the DPO loss (preference_loss) and the VRPO loss (vrpo_loss)."""
    import torch

    from vrpo import losses
    from vrpo.data import sequence_batch, tokenize_completions

    def logps(model, prompt, completions):
        p, ids = tokenize_completions(tokenizer, prompt, completions)
        b = sequence_batch([p] * len(ids), ids, tokenizer.pad_token_id)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return losses.sequence_logps(out, b["input_ids"], b["completion_mask"])

    pair, refs = [row["chosen"], row["rejected"]], list(row["ref_samples"][:k])
    with torch.no_grad():
        ref_pair, ref_samples = logps(ref, row["prompt"], pair), logps(ref, row["prompt"], refs)
    pol_pair, pol_samples = logps(policy, row["prompt"], pair), logps(policy, row["prompt"], refs)
    r_pair = losses.implicit_rewards(pol_pair, ref_pair, beta)
    r_samples = losses.implicit_rewards(pol_samples, ref_samples, beta)
    params = [p for p in policy.parameters() if p.requires_grad]
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs]).numpy()  # noqa: E731
    dpo = losses.preference_loss(r_pair[:1], r_pair[1:])[0]
    g_dpo = flat(torch.autograd.grad(dpo, params, retain_graph=True))
    g_ref = torch.tensor(row["ref_aux_prob"], dtype=torch.float32)[:k, :k]
    vrpo = losses.vrpo_loss(r_pair[:1], r_pair[1:], torch.tensor([row["aux_prob"]]), r_samples[None], g_ref[None])[0]
    return g_dpo, flat(torch.autograd.grad(vrpo, params))


def test_exact_gradients_equal_autograd_of_the_dpo_and_vrpo_losses(tmp_path):
    """With no projection, psi equals autograd's per-example DPO gradient, psi - m_g + U_K the
    VRPO gradient with K samples, to float32 precision; and the decomposition's measured ratio
    is the ratio of the direct per-example gradients' variances."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import tiny_model_dir, write_scored

    from vrpo.data import load_preferences
    from vrpo.diagnostics import decompose
    from vrpo.loss_gradients import CountSketch, load_checkpoint, scores_from_table, sequence_table, trainable_parameters

    ref_dir = tiny_model_dir()
    policy_dir = _perturbed_copy(ref_dir, tmp_path / "policy")
    rows = load_preferences(write_scored(tmp_path / "scored.jsonl", n=6, k=4)).to_list()
    beta, k = 0.5, 4
    ckpt = load_checkpoint(str(policy_dir), ref_model=str(ref_dir), beta=beta)
    sketch = CountSketch([p.numel() for p in trainable_parameters(ckpt.model)], None)
    table = sequence_table(ckpt, [r["prompt"] for r in rows], [[r["chosen"], r["rejected"], *r["ref_samples"]] for r in rows],
                           sketch, progress=False)
    assert np.abs(table["logps"] - table["ref_logps"]).max() > 1e-3  # margins are not all zero
    obs, aux, summary = scores_from_table(table, beta, "sigmoid", [r["aux_prob"] for r in rows],
                                          [r["ref_aux_prob"] for r in rows], (2, 4))
    direct = [_direct_gradients(ckpt.model, __import__("vrpo.sampling", fromlist=["x"]).load_model_and_tokenizer(str(ref_dir))[0],
                                ckpt.tokenizer, r, k, beta) for r in rows]
    g_dpo, g_vrpo = np.stack([d[0] for d in direct]), np.stack([d[1] for d in direct])
    scale = np.abs(g_dpo).max()
    assert np.abs(obs - g_dpo).max() <= 1e-5 * scale
    assert np.abs(obs - aux + summary["u"]["4"] - g_vrpo).max() <= 1e-5 * scale
    report = decompose(obs, aux, summary, (2, 4))
    tv = lambda v: ((v - v.mean(0)) ** 2).sum()  # noqa: E731
    assert report["measured_ratio"]["4"] == pytest.approx(tv(g_vrpo) / tv(g_dpo), rel=1e-4)


def test_count_sketch_keeps_inner_products_in_expectation():
    """E_S <S u, S v> = <u, v> over random sketches (Monte Carlo, 4 standard errors), and the
    exact map (dim None) is the concatenation."""
    import torch

    from vrpo.loss_gradients import CountSketch

    rng = np.random.default_rng(0)
    sizes = [50, 30, 20]
    u = [torch.tensor(rng.normal(size=s), dtype=torch.float32) for s in sizes]
    v = [torch.tensor(rng.normal(size=s) + 0.5 * x.numpy(), dtype=torch.float32) for s, x in zip(sizes, u)]
    exact = float(torch.cat(u) @ torch.cat(v))
    draws = np.array([float(CountSketch(sizes, 8, seed=s).project(u) @ CountSketch(sizes, 8, seed=s).project(v))
                      for s in range(2000)])
    assert abs(draws.mean() - exact) < 4 * draws.std() / np.sqrt(len(draws))
    ident = CountSketch(sizes, None)
    assert torch.equal(ident.project(u), torch.cat(u)) and ident.dim == 100
    a, b = CountSketch(sizes, 8, seed=3).project(u), CountSketch(sizes, 8, seed=3).project(u)
    assert torch.equal(a, b)  # the seed fixes the map


def test_table_order_follows_the_label():
    """scores_from_table with a_is_chosen False equals the same table with the pair swapped."""
    from vrpo.loss_gradients import scores_from_table

    rng = np.random.default_rng(4)
    n, m, d = 5, 6, 7
    table = {"logps": rng.normal(size=(n, m)), "ref_logps": rng.normal(size=(n, m)), "grads": rng.normal(size=(n, m, d))}
    swapped = {key: v[:, [1, 0, 2, 3, 4, 5]] for key, v in table.items()}
    g, G = rng.uniform(size=n), rng.uniform(size=(n, 4, 4))
    first = np.array([True, False, True, False, False])
    a = scores_from_table(table, 0.3, "sigmoid", g, G, (2, 4), a_is_chosen=first)
    b = scores_from_table({k: np.where(first.reshape(-1, *[1] * (v.ndim - 1)), table[k], swapped[k]) for k, v in table.items()},
                          0.3, "sigmoid", g, G, (2, 4))
    for x, y in zip(a[:2], b[:2]):
        assert np.allclose(x, y)
    assert np.allclose(a[2]["u"]["4"], b[2]["u"]["4"])


def _tiny_run(tmp_path, data, lora_r):
    """A 2-step `vrpo train --method dpo` run of the tiny model (a LoRA one when lora_r > 0)."""
    from vrpo.train import VRPOConfig, train

    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import tiny_model_dir

    out = tmp_path / f"run-lora{lora_r}"
    train(VRPOConfig(model=str(tiny_model_dir()), data=str(data), out=str(out), method="dpo", max_steps=2,
                     per_device_train_batch_size=2, learning_rate=1e-2, beta=0.2, lora_r=lora_r, save_steps=1000,
                     logging_steps=1, training_args={"use_cpu": True, "dataloader_num_workers": 0}))
    return out


def test_diagnose_model_reads_a_lora_run_folder(tmp_path, capsys):
    """`vrpo diagnose DATA --model RUN`: the LoRA adapter's parameters, the run's beta and pi_ref;
    the printed table explains predicted vs measured; no NaN anywhere."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import tiny_model_dir, write_scored

    from vrpo.cli import main

    data = write_scored(tmp_path / "scored.jsonl", n=8, k=4)
    run = _tiny_run(tmp_path, data, lora_r=4)
    out = tmp_path / "d.json"
    assert main(["diagnose", str(data), "--model", str(run), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LoRA adapter of the run" in text and "beta 0.2" in text and "measured here" in text
    assert "nan" not in text.lower()
    r = json.loads(out.read_text())
    assert r["gradients"]["reference_model"] == str(tiny_model_dir())
    assert 0 < r["gradients"]["trainable_parameters"] < 20_000  # the adapter, not the 43k-parameter model
    assert r["removable_share"]["2"] == pytest.approx(0.0, abs=1e-9)


def test_diagnose_model_notes_rows_the_checkpoint_trained_on_wherever_they_are(tmp_path, capsys):
    """The note on in-sample rows compares the pairs themselves with the run's training data:
    the same file, the same pairs in another file (as `vrpo score` rewrites them), part of
    them, or none."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import write_scored

    from vrpo.cli import main

    data = write_scored(tmp_path / "scored.jsonl", n=8, k=4)
    run = _tiny_run(tmp_path, data, lora_r=0)
    rows = data.read_text().splitlines()
    (tmp_path / "copy.jsonl").write_text("\n".join(rows) + "\n")
    held = [json.loads(r) for r in rows]
    for i, r in enumerate(held):
        r["prompt"] = f"{r['prompt']} (held out {i})"
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    (tmp_path / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held[:4]) + "\n".join(rows[4:]) + "\n")
    for name, expected in [("scored", "8 of the 8"), ("copy", "8 of the 8"), ("half", "4 of the 8"), ("held", None)]:
        assert main(["diagnose", str(tmp_path / f"{name}.jsonl"), "--model", str(run)]) == 0
        text = capsys.readouterr().out
        if expected:
            assert f"note: {expected} diagnosed rows are pairs the checkpoint was trained on" in text, name
        else:
            assert "note:" not in text


def test_diagnose_model_renders_conversational_rows_with_the_chat_template(tmp_path, capsys):
    """Message-list rows are rendered with the checkpoint tokenizer's chat template, and give the
    numbers of the same rows pre-rendered as text."""
    import shutil
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import tiny_model_dir, write_scored
    from transformers import AutoTokenizer

    from vrpo.cli import main

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir(), model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok.save_pretrained(model)
    rows = [json.loads(line) for line in write_scored(tmp_path / "plain.jsonl", n=6, k=4).read_text().splitlines()]
    chat, text = [], []
    for r in rows:
        msgs = [{"role": "user", "content": r["prompt"]}]
        chat.append(dict(r, prompt=msgs, chosen=[{"role": "assistant", "content": r["chosen"]}],
                         rejected=[{"role": "assistant", "content": r["rejected"]}]))
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = lambda c: tok.apply_chat_template(msgs + [{"role": "assistant", "content": c}], tokenize=False)  # noqa: E731
        text.append(dict(r, prompt=rendered, chosen=full(r["chosen"])[len(rendered):], rejected=full(r["rejected"])[len(rendered):]))
    for name, rs in (("chat", chat), ("text", text)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        assert main(["diagnose", str(tmp_path / f"{name}.jsonl"), "--model", str(model), "--proj-dim", "0",
                     "--json", str(tmp_path / f"{name}.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("chat", "text"))
    assert a["predicted_ratio"] == pytest.approx(b["predicted_ratio"])
    assert a["total"] == pytest.approx(b["total"])


def test_diagnose_model_degenerate_data_is_a_one_line_error(tmp_path, capsys):
    """Every response the same: the base gradient does not vary; one line, no NaN printed."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import tiny_model_dir

    from vrpo.cli import main

    rows = [{"prompt": f"p{i}", "chosen": " same", "rejected": " same", "aux_prob": 0.5, "ref_samples": [" same"] * 4,
             "ref_aux_prob": [[0.5] * 4] * 4} for i in range(5)]
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["diagnose", str(tmp_path / "flat.jsonl"), "--model", str(tiny_model_dir())]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: the one error line
    assert err.startswith("vrpo diagnose: error:") and "does not vary" in err and "nan" not in err.lower()
    assert main(["diagnose", str(tmp_path / "flat.jsonl"), "--proxy", "model"]) == 2
    assert "--model" in capsys.readouterr().err


def test_batched_per_sequence_gradients_equal_one_pass_per_sequence():
    """One backward pass over a right-padded batch (the layer rules of PerSequenceGradients, with
    GPT-2's tied embedding and output layer) gives each sequence's own gradient: the same as one
    forward and backward pass per sequence, for sequences of different lengths."""
    import sys

    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pipeline_helpers import tiny_model_dir

    from vrpo.loss_gradients import PerSequenceGradients, _OneAtATime, trainable_parameters
    from vrpo.sampling import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir()))
    model.eval()
    params = trainable_parameters(model)
    engine = PerSequenceGradients.for_model(model, params)
    assert engine is not None  # every GPT-2 parameter has a rule
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 400, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    completions = [torch.randint(1, 400, (n,), generator=gen).tolist() for n in (9, 2, 6)]
    lp_a, g_a = engine(prompts, completions)
    lp_b, g_b = _OneAtATime(model, params)(prompts, completions)
    assert np.allclose(lp_a, lp_b, atol=1e-5)
    for a, b in zip(g_a, g_b):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # a trainable parameter in a module without a rule: the engine declines (one pass per sequence)
    model.transformer.h[0].attn.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    assert PerSequenceGradients.for_model(model, trainable_parameters(model)) is None


def test_reference_pair_summary_blocks_are_the_disjoint_u_statistics():
    """u_blocks[K][:, b] = mean of m_jk over pairs j < k inside samples bK..bK+K-1 (loops)."""
    from vrpo.diagnostics import reference_pair_summary

    rng = np.random.default_rng(5)
    m = _symmetric_pairs(rng, 3, 6, 2)
    s = reference_pair_summary(m, (2, 3, 4))
    assert s["u_blocks"]["2"].shape == (3, 3, 2) and s["u_blocks"]["4"].shape == (3, 1, 2)
    for k in (2, 3):
        for b in range(6 // k):
            idx = range(b * k, (b + 1) * k)
            want = np.mean([m[:, j, l] for j in idx for l in idx if j < l], 0)
            assert np.allclose(s["u_blocks"][str(k)][:, b], want, atol=1e-6)
    assert np.allclose(s["u_blocks"]["4"][:, 0], s["u"]["4"], atol=1e-6)


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
