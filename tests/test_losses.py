import math

import pytest
import torch

from vrpo import losses as L
from tests.reference_impl import BASES, vrpo_one, ell



@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, restored afterwards (xdist workers share a process)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---------------------------------------------------------------- hand-computed values
def test_dpo_matches_torchtune_hand_values():
    """torchtune's DPO example. Policy log-ratio chosen-rejected: [-0.4, 20, 20]; reference:
    [-0.4, 10, 0]; Delta = [0, 10, 20]; margins beta*Delta = [0, 1, 2];
    -log sigmoid([0, 1, 2]) = [log 2, log(1+e^-1), log(1+e^-2)] = [0.6931, 0.3133, 0.1269];
    hinge relu(1 - [0, 1, 2]) = [1, 0, 0]."""
    pc = torch.tensor([-0.5, -10.0, -1.0]); pr = torch.tensor([-0.1, -30.0, -21.0])
    rc = torch.tensor([-0.5, -10.1, -0.1]); rr = torch.tensor([-0.1, -20.1, -0.1])
    chosen = L.implicit_rewards(pc, rc, beta=0.1)
    rejected = L.implicit_rewards(pr, rr, beta=0.1)
    assert torch.allclose(chosen - rejected, torch.tensor([0.0, 1.0, 2.0]), atol=1e-12)
    assert torch.allclose(L.preference_loss(chosen, rejected), torch.tensor([0.6931, 0.3133, 0.1269]), atol=1e-4)
    assert torch.allclose(L.preference_loss(chosen, rejected, base="hinge"), torch.tensor([1.0, 0.0, 0.0]))


def test_base_loss_hand_values():
    """ramp(z) = relu(1-z) - relu(-0.5-z): z=2 -> 0; z=0 -> 1; z=-0.5 -> 1.5; z=-3 -> 4-2.5 = 1.5.
    ipo(z) = (z - 0.5)^2: z=0 -> 0.25, z=2 -> 2.25."""
    z = torch.tensor([2.0, 0.0, -0.5, -3.0])
    assert torch.allclose(L.BASE_LOSSES["ramp"](z), torch.tensor([0.0, 1.0, 1.5, 1.5]))
    assert torch.allclose(L.BASE_LOSSES["ipo"](torch.tensor([0.0, 2.0])), torch.tensor([0.25, 2.25]))


def test_vrpo_hand_value_k2_sigmoid():
    """z = 1, g = 0.8: f(z) - l(z, g) = -(1 - g) z = -0.2.
    Reference pair: z~ = 0.5 - (-0.5) = 1, g~ = 0.3:
    l(1, 0.3) = 0.3 * log(1 + e^-1) + 0.7 * log(1 + e^1) = 0.3 * 0.31326 + 0.7 * 1.31326 = 1.01326.
    Total = -0.2 + 1.01326 = 0.81326."""
    out = L.vrpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.8]),
                      torch.tensor([[0.5, -0.5]]), torch.tensor([[[0.5, 0.3], [0.7, 0.5]]]))
    assert out.item() == pytest.approx(-0.2 + 0.3 * math.log1p(math.exp(-1)) + 0.7 * math.log1p(math.exp(1)), abs=1e-10)
    assert out.item() == pytest.approx(0.81326, abs=1e-5)


def test_sigmoid_observed_part_is_linear():
    """With f = sigmoid, l(z,1) - l(z,g) = -(1-g) z exactly (docs/method.md)."""
    z = torch.linspace(-30, 30, 61); g = torch.rand(61)
    diff = L.soft_label_loss(z, 1.0) - L.soft_label_loss(z, g)
    assert torch.allclose(diff, -(1 - g) * z, atol=1e-9)


def test_soft_label_symmetry():
    z = torch.randn(100); p = torch.rand(100)
    for base in L.BASE_LOSSES:
        assert torch.allclose(L.soft_label_loss(-z, 1 - p, base), L.soft_label_loss(z, p, base))


# ---------------------------------------------------------------- independent implementation
@pytest.mark.parametrize("base", ["sigmoid", "ramp", "hinge", "ipo"])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_vrpo_matches_loop_reference(base, K):
    g = torch.Generator().manual_seed(K * 7 + len(base))
    B = 9
    rc, rr = torch.randn(B, generator=g) * 2, torch.randn(B, generator=g) * 2
    aux = torch.rand(B, generator=g)
    ref = torch.randn(B, K, generator=g) * 2
    ref_g = torch.rand(B, K, K, generator=g)
    mask = torch.rand(B, K, generator=g) > 0.3
    mask[:, :2] = True
    for use_mask in (False, True):
        m = mask if use_mask else None
        got = L.vrpo_loss(rc, rr, aux, ref, ref_g, m, base=base, control_variate_coef=0.7)
        for b in range(B):
            want = vrpo_one(rc[b].item(), rr[b].item(), aux[b].item(), ref[b].tolist(), ref_g[b].tolist(),
                            (m[b].tolist() if use_mask else [True] * K), BASES[base], coef=0.7)
            assert got[b].item() == pytest.approx(want, abs=1e-9)


def test_cdpo_rdpo_match_formulas():
    z = torch.randn(20) * 3; zero = torch.zeros(20); eps = 0.2
    for b in range(20):
        zb = z[b].item()
        c = L.cdpo_loss(z, zero, label_smoothing=eps)[b].item()
        assert c == pytest.approx(ell(zb, 1 - eps, BASES["sigmoid"]), abs=1e-9)
        r = L.rdpo_loss(z, zero, flip_rate=eps)[b].item()
        # [-(1-eps) log s(z) + eps log s(-z)] / (1 - 2 eps)
        logsig = lambda t: -BASES["sigmoid"](t)
        assert r == pytest.approx((-(1 - eps) * logsig(zb) + eps * logsig(-zb)) / (1 - 2 * eps), abs=1e-9)


def test_rdpo_is_unbiased_under_known_flips():
    """E over flips of rDPO loss = clean loss: (1-e) rdpo(z) + e rdpo(-z) = f(z)."""
    z = torch.randn(50); zero = torch.zeros(50); e = 0.3
    mixed = (1 - e) * L.rdpo_loss(z, zero, flip_rate=e) + e * L.rdpo_loss(-z, zero, flip_rate=e)
    assert torch.allclose(mixed, L.preference_loss(z, zero), atol=1e-10)


def test_k2_equals_paper_single_pair_form():
    """K = 2: f(z) - l(z, g) + l(z~_12, g~_12) (the paper code's a_1/a_2 form)."""
    B = 16
    rc, rr, aux = torch.randn(B), torch.randn(B), torch.rand(B)
    a1, a2, g12 = torch.randn(B), torch.randn(B), torch.rand(B)
    ref_g = torch.stack([torch.stack([0.5 * torch.ones(B), g12], -1), torch.stack([1 - g12, 0.5 * torch.ones(B)], -1)], -2)
    for base in ("sigmoid", "ramp"):
        f = L.BASE_LOSSES[base]
        paper = f(rc - rr) - (aux * f(rc - rr) + (1 - aux) * f(rr - rc)) + (g12 * f(a1 - a2) + (1 - g12) * f(a2 - a1))
        ours = L.vrpo_loss(rc, rr, aux, torch.stack([a1, a2], -1), ref_g, base=base)
        assert torch.allclose(ours, paper, atol=1e-12)


def test_leading_batch_dims_broadcast():
    R, B, K = 3, 4, 4
    args = (torch.randn(R, B), torch.randn(R, B), torch.rand(R, B), torch.randn(R, B, K), torch.rand(R, B, K, K))
    full = L.vrpo_loss(*args, base="ramp")
    for r in range(R):
        assert torch.allclose(full[r], L.vrpo_loss(*(a[r] for a in args), base="ramp"))


def test_pair_weights_give_weighted_mean():
    B, K = 5, 4
    rc, rr, aux, ref, rg = torch.randn(B), torch.randn(B), torch.rand(B), torch.randn(B, K), torch.rand(B, K, K)
    w = torch.rand(B, K, K)
    got = L.vrpo_loss(rc, rr, aux, ref, rg, ref_pair_weights=w)
    f = L.BASE_LOSSES["sigmoid"]
    for b in range(B):
        num = den = 0.0
        for j in range(K):
            for k in range(j + 1, K):
                num += w[b, j, k] * ell((ref[b, j] - ref[b, k]).item(), rg[b, j, k].item(), BASES["sigmoid"]); den += w[b, j, k]
        want = f(rc[b] - rr[b]) - (aux[b] * f(rc[b] - rr[b]) + (1 - aux[b]) * f(rr[b] - rc[b])) + num / den
        assert got[b].item() == pytest.approx(want.item(), abs=1e-9)


# ---------------------------------------------------------------- gradients and extremes
@pytest.mark.parametrize("base", ["sigmoid", "ipo"])
def test_autograd_matches_finite_differences(base):
    """gradcheck compares autograd with central finite differences (smooth bases only)."""
    B, K = 3, 4
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, generator=g, requires_grad=True), torch.randn(B, generator=g, requires_grad=True),
              torch.randn(B, K, generator=g, requires_grad=True)]
    aux, ref_g = torch.rand(B, generator=g), torch.rand(B, K, K, generator=g)
    assert torch.autograd.gradcheck(lambda a, b, r: L.vrpo_loss(a, b, aux, r, ref_g, base=base), inputs)


def test_autograd_ramp_away_from_kinks():
    z = torch.tensor([0.3, -0.2, 2.5, -1.7], requires_grad=True)
    L.BASE_LOSSES["ramp"](z).sum().backward()
    assert torch.equal(z.grad, torch.tensor([-1.0, -1.0, 0.0, 0.0]))


@pytest.mark.parametrize("base", ["sigmoid", "ramp", "hinge", "ipo"])
def test_no_inf_nan_at_extreme_margins_float32(base):
    big = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    aux = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float32)
    ref_g = torch.full((3, 2, 2), 0.25, dtype=torch.float32)
    out = L.vrpo_loss(big, torch.zeros(3, dtype=torch.float32), aux, ref, ref_g, base=base)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all() and torch.isfinite(ref.grad).all()


# ---------------------------------------------------------------- the estimator's contract
def test_correction_has_mean_zero_when_reference_is_right():
    """Monte Carlo: labelled pair and reference samples from the same pi_ref, any fixed g
    (antisymmetric) and any fixed reward: E[l(z~, g~) - l(z+-, g+-)] = 0 (over pairs; the
    label's coin does not enter these two terms). 6 responses, K = 4."""
    gen = torch.Generator().manual_seed(1)
    n_resp, N, K = 6, 200_000, 4
    pi = torch.softmax(torch.randn(n_resp, generator=gen), 0)
    r = torch.randn(n_resp, generator=gen) * 2
    A = torch.rand(n_resp, n_resp, generator=gen)
    G = (A + 1 - A.T) / 2  # antisymmetric aux model
    p_true = torch.sigmoid(torch.randn(n_resp, n_resp, generator=gen)); p_true = (p_true + 1 - p_true.T) / 2
    ya, yb = torch.multinomial(pi, N, True, generator=gen), torch.multinomial(pi, N, True, generator=gen)
    a_wins = torch.rand(N, generator=gen) < p_true[ya, yb]
    yc, yr = torch.where(a_wins, ya, yb), torch.where(a_wins, yb, ya)
    ys = torch.multinomial(pi, N * K, True, generator=gen).view(N, K)
    terms = L.vrpo_loss_terms(r[yc], r[yr], G[yc, yr], r[ys], G[ys.unsqueeze(-1), ys.unsqueeze(-2)], base="ramp")
    cv = terms.control_variate
    se = cv.std() / math.sqrt(N)
    assert abs(cv.mean().item()) < 4 * se.item()
    # and the check has power: from a different policy the correction is clearly non-zero
    pi2 = torch.softmax(torch.randn(n_resp, generator=gen) * 3, 0)
    ys2 = torch.multinomial(pi2, N * K, True, generator=gen).view(N, K)
    cv2 = L.vrpo_loss_terms(r[yc], r[yr], G[yc, yr], r[ys2], G[ys2.unsqueeze(-1), ys2.unsqueeze(-2)], base="ramp").control_variate
    assert abs(cv2.mean().item()) > 10 * se.item()


def test_sequence_logps_against_loop():
    gen = torch.Generator().manual_seed(3)
    B, T, V = 2, 6, 11
    logits = torch.randn(B, T, V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = L.sequence_logps(logits, ids, mask)
    lp = torch.log_softmax(logits, -1)
    for b in range(B):
        want = sum(lp[b, t - 1, ids[b, t]].item() for t in range(1, T) if mask[b, t])
        assert got[b].item() == pytest.approx(want, abs=1e-9)


def test_antisymmetrize():
    pab, pba = torch.rand(10), torch.rand(10)
    g_ab, g_ba = L.antisymmetrize(pab, pba), L.antisymmetrize(pba, pab)
    assert torch.allclose(g_ab + g_ba, torch.ones(10), atol=1e-12)


def test_custom_base_loss_registry():
    name = "test_logistic2"
    L.register_base_loss(name, lambda z: torch.nn.functional.softplus(-2 * z))
    try:
        z = torch.randn(4)
        assert torch.allclose(L.preference_loss(z, torch.zeros(4), base=name), torch.nn.functional.softplus(-2 * z))
        with pytest.raises(ValueError, match="already registered"):
            L.register_base_loss(name, lambda z: z)
    finally:
        del L.BASE_LOSSES[name]
    # a callable works directly too
    assert torch.allclose(L.preference_loss(z, torch.zeros(4), base=lambda t: t * 0), torch.zeros(4))


# ---------------------------------------------------------------- bad input
def _good(B=3, K=3):
    return dict(chosen_rewards=torch.zeros(B), rejected_rewards=torch.zeros(B), aux_prob=torch.full((B,), 0.5),
                ref_rewards=torch.zeros(B, K), ref_aux_prob=torch.full((B, K, K), 0.5))


@pytest.mark.parametrize("field,value,match", [
    ("aux_prob", torch.tensor([0.5, float("nan"), 0.5]), r"aux_prob: contains NaN"),
    ("aux_prob", torch.tensor([0.5, 1.2, 0.5]), r"aux_prob: values in .*expected probabilities in \[0, 1\]"),
    ("ref_aux_prob", torch.full((3, 3, 3), -0.1), r"ref_aux_prob: values"),
    ("rejected_rewards", torch.zeros(4), r"rejected_rewards: shape \(4,\)"),
    ("ref_rewards", torch.zeros(3, 1), r"ref_rewards: K=1"),
    ("ref_aux_prob", torch.zeros(3, 3), r"ref_aux_prob: shape"),
])
def test_bad_input_errors(field, value, match):
    kw = _good(); kw[field] = value
    with pytest.raises(ValueError, match=match):
        L.vrpo_loss(**kw)


def test_bad_mask_and_base():
    kw = _good()
    with pytest.raises(ValueError, match=r"ref_mask: row 1 has 1 valid reference samples; expected at least 2"):
        L.vrpo_loss(**kw, ref_mask=torch.tensor([[1, 1, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"base: unknown base loss 'nope'"):
        L.vrpo_loss(**kw, base="nope")
    with pytest.raises(ValueError, match="flip_rate"):
        L.rdpo_loss(torch.zeros(2), torch.zeros(2), flip_rate=0.5)


def test_masked_padding_garbage_does_not_leak():
    kw = _good()
    kw["ref_rewards"] = torch.tensor([[0.0, 1.0, float("nan")]] * 3)
    kw["ref_aux_prob"] = torch.full((3, 3, 3), 0.5); kw["ref_aux_prob"][:, :, 2] = float("nan"); kw["ref_aux_prob"][:, 2, :] = float("nan")
    out = L.vrpo_loss(**kw, ref_mask=torch.tensor([[True, True, False]] * 3))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_token_logps_in_chunks_equal_log_softmax_values_and_gradients(chunk):
    """log softmax(W h + b)[target] per token, chunk by chunk (recomputed in backward when
    there are several chunks), against one full log_softmax; values and gradients."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(5, 11).double()
    targets = torch.randint(0, 11, (7,), generator=gen)
    got = L.token_logps(hidden, head, targets, chunk)
    want = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.linspace(-1, 2, 7, dtype=torch.float64)
    g_got = torch.autograd.grad((w * got).sum(), [hidden, head.weight, head.bias])
    g_want = torch.autograd.grad((w * want).sum(), [hidden, head.weight, head.bias])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sum_by_sequence_by_hand():
    # tokens of sequences 2, 0, 2, 1 -> [0.5, -1, 1 + 3]
    out = L.sum_by_sequence(torch.tensor([1.0, 0.5, 3.0, -1.0]), torch.tensor([2, 0, 2, 1]), 4)
    assert out.tolist() == [0.5, -1.0, 4.0, 0.0]
    assert L.token_logps(torch.zeros(0, 3), torch.nn.Linear(3, 4), torch.zeros(0, dtype=torch.long), 2).shape == (0,)
