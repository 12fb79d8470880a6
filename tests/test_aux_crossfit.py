"""Cross-fitting: no observed pair is predicted by a model that saw its label; injected
precomputed predictions give the same VRPO loss as fitting inside."""
import numpy as np
import pytest
import torch

from vrpo.aux import GPM, FoldAverageAux, cross_fit, crossfit_aux_probs, fold_ids, resolve_aux
from vrpo.aux.crossfit import group_fold_ids
from vrpo.aux.io import load_oof
from vrpo.aux.synthetic import RPS, rock_paper_scissors_pairs
from vrpo.losses import vrpo_loss


class RecordingGPM(GPM):
    """A real GPM that also records which pairs it was fitted on and asked to predict."""

    log: list = []

    def fit(self, prompts, responses_a, responses_b, labels, sample_weight=None):
        self.seen_ = set(zip(prompts, responses_a, responses_b))
        RecordingGPM.log.append(self)
        return super().fit(prompts, responses_a, responses_b, labels, sample_weight)

    def _predict_raw(self, prompts, responses_a, responses_b):
        self.predicted_ = getattr(self, "predicted_", set()) | set(zip(prompts, responses_a, responses_b))
        return super()._predict_raw(prompts, responses_a, responses_b)


def unique_pairs(n, seed=0):
    """n pairs with distinct prompts (so a pair's identity is its prompt) and coin-flip labels."""
    rng = np.random.default_rng(seed)
    return [f"q{i}" for i in range(n)], ["yes"] * n, ["no"] * n, rng.integers(0, 2, n).astype(float)


def test_no_observed_pair_is_predicted_by_a_model_that_saw_its_label():
    x, a, b, y = unique_pairs(60)
    RecordingGPM.log = []
    res = cross_fit(lambda: RecordingGPM(backbone="table", epochs=20, lr=1e-2), x, a, b, y, folds=4, random_state=1)
    assert len(RecordingGPM.log) == 4 and res.fold_models == RecordingGPM.log
    for i in range(60):
        pair = (x[i], a[i], b[i])
        f = res.fold_ids[i]
        assert pair not in res.fold_models[f].seen_  # the model that predicted it never trained on it
        assert pair in res.fold_models[f].predicted_
        assert all(pair in m.seen_ for g, m in enumerate(res.fold_models) if g != f)
    # the table memorises coin flips in-sample; out of fold it cannot beat chance
    in_sample = np.mean([(m.predict_proba([x[i]], [a[i]], [b[i]])[0] > 0.5) == y[i]
                         for i in range(60) for g, m in enumerate(res.fold_models) if g != res.fold_ids[i]])
    oof = np.mean((res.oof_proba > 0.5) == y)
    assert in_sample > 0.9 and oof < 0.7


def test_folds_are_balanced_and_grouped_by_prompt():
    ids = fold_ids(23, 5, random_state=0)
    assert sorted(np.bincount(ids)) == [4, 4, 5, 5, 5]
    groups = [f"p{i // 3}" for i in range(30)]
    g = group_fold_ids(groups, 5, random_state=0)
    for k in range(10):
        assert len(set(g[3 * k:3 * k + 3])) == 1
    with pytest.raises(ValueError, match="folds: 1; expected at least 2"):
        fold_ids(10, 1)
    with pytest.raises(ValueError, match="5 folds but only 1 distinct groups.*--fold-by pair"):
        group_fold_ids(["same prompt"] * 10, 5)
    with pytest.raises(ValueError, match="reference: 'mean'; expected one of"):
        cross_fit(lambda: GPM(backbone="table"), *unique_pairs(10), folds=2, reference="mean")


def test_fold_average_is_the_mean_of_the_fold_models():
    x, a, b, y = rock_paper_scissors_pairs(90, random_state=2)
    res = cross_fit(lambda: GPM(backbone="table", epochs=20, lr=1e-2), x, a, b, y, folds=3)
    assert isinstance(res.reference_model, FoldAverageAux)
    M = res.reference_model.predict_pairwise("Pick one.", list(RPS))
    expected = np.mean([m.predict_pairwise("Pick one.", list(RPS)) for m in res.fold_models], axis=0)
    assert np.allclose(M, expected) and np.abs(M + M.T - 1).max() < 1e-9


def _loss(aux_prob, ref_aux_prob, base):
    """VRPO loss (vrpo.losses) at fixed, arbitrary rewards for the given auxiliary inputs."""
    g = torch.Generator().manual_seed(0)
    n, K = ref_aux_prob.shape[:2]
    chosen, rejected, ref = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, K, generator=g)
    return vrpo_loss(chosen, rejected, torch.as_tensor(aux_prob), ref, torch.as_tensor(ref_aux_prob), base=base)


@pytest.mark.parametrize("base", ["sigmoid", "ramp"])
def test_injected_predictions_give_the_same_vrpo_loss_as_fitting_inside(tmp_path, base):
    """Fit inside (cross_fit in Python) vs inject what `vrpo fit-aux` saved (oof.parquet +
    the model folder), as `vrpo score` does: identical aux inputs, identical VRPO loss."""
    import json

    from vrpo.cli import main

    x, a, b, y = rock_paper_scissors_pairs(60, random_state=4)
    chosen = [u if l == 1 else v for u, v, l in zip(a, b, y)]
    rejected = [v if l == 1 else u for u, v, l in zip(a, b, y)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in zip(x, chosen, rejected)))
    ref_samples = [list(RPS)] * 60  # K = 3 reference samples per prompt

    from vrpo.fit_aux import fold_groups

    groups = fold_groups("pair", None, x, chosen, rejected)  # the folds of `--fold-by pair`
    inside = cross_fit(lambda: GPM(backbone="table", epochs=15, lr=1e-2, random_state=7, progress=False),
                       x, chosen, rejected, np.ones(60), folds=3, random_state=7, groups=groups)
    aux_in, ref_in = crossfit_aux_probs(inside, x, ref_samples)

    assert main(["fit-aux", "--data", str(data), "--model", "gpm-table", "--folds", "3", "--seed", "7",
                 "--epochs", "15", "--lr", "0.01", "--fold-by", "pair", "--out", str(tmp_path / "aux")]) == 0
    aux_inj = load_oof(tmp_path / "aux", x, chosen, rejected)
    ref_inj = np.stack(resolve_aux(str(tmp_path / "aux")).predict_pairwise_batch(x, ref_samples))

    assert np.allclose(aux_in, aux_inj, atol=1e-7) and np.allclose(ref_in, ref_inj, atol=1e-7)
    assert torch.allclose(_loss(aux_in, ref_in, base), _loss(aux_inj, ref_inj, base), atol=1e-6)
    # and the control variate is doing something: the loss differs from the base loss
    assert not torch.allclose(_loss(aux_in, ref_in, base), _loss(np.ones(60), np.full((60, 3, 3), 0.5), base))


def test_load_oof_refuses_pairs_it_has_no_out_of_fold_prediction_for(tmp_path):
    from vrpo.aux.io import write_oof

    write_oof(tmp_path, ["p"], ["a"], ["b"], ["id"], [0.7], [0])
    assert load_oof(tmp_path, ["p"], ["a"], ["b"]).tolist() == [0.7]
    with pytest.raises(ValueError, match=r"no out-of-fold prediction for row 0"):
        load_oof(tmp_path, ["p"], ["b"], ["a"])
    assert load_oof(tmp_path / "nothing", ["p"], ["a"], ["b"]) is None


def test_fold_by_pair_keeps_copies_of_a_pair_in_one_fold():
    """Each labelled pair listed twice, labels random (nothing to learn): a memorising table
    model predicts the held-out pair from its copy when copies fall in other folds (mean
    out-of-fold g far above 1/2), and only 1/2 when `--fold-by pair` keeps them together."""
    from vrpo.fit_aux import fold_groups

    rng = np.random.default_rng(0)
    n = 60
    prompts, chosen, rejected = [], [], []
    for i in range(n):
        a, b = f"answer {i}a", f"answer {i}b"
        won = rng.random() < 0.5
        prompts.append(f"question {i}")
        chosen.append(a if won else b)
        rejected.append(b if won else a)
    x, c, r = prompts * 2, chosen * 2, rejected * 2  # every row listed twice
    memorise = lambda: GPM(backbone="table", epochs=60, lr=0.05, random_state=0, progress=False)  # noqa: E731
    leaky = cross_fit(memorise, x, c, r, np.ones(2 * n), folds=4, random_state=0)
    grouped = cross_fit(memorise, x, c, r, np.ones(2 * n), folds=4, random_state=0,
                        groups=fold_groups("pair", None, x, c, r))
    assert leaky.oof_proba.mean() > 0.7  # the copy taught it the label
    assert abs(grouped.oof_proba.mean() - 0.5) < 0.05  # never saw either response of the pair: no information
    ids = grouped.fold_ids
    assert all(ids[i] == ids[i + n] for i in range(n))


def test_out_of_fold_predictions_are_joined_by_the_whole_pair_text(tmp_path):
    """The join compares the prompt text too: the same responses under another prompt have
    no out-of-fold prediction (a model may have seen that pair's label)."""
    from vrpo.aux.io import write_oof

    write_oof(tmp_path, ["Review: good", "Review: bad"], ["a", "a"], ["b", "b"], ["1", "2"], [0.7, 0.4], [0, 1])
    assert load_oof(tmp_path, ["Review: bad"], ["a"], ["b"]).tolist() == [0.4]
    with pytest.raises(ValueError, match=r"no out-of-fold prediction for row 0"):
        load_oof(tmp_path, ["Review: other"], ["a"], ["b"])
