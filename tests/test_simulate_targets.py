"""The testbed's targets and fits are what they claim: one weight per cell equals the
objectives, ramp targets are converged minimisers (not a fixed budget of steps), regret is
measured against the target's own, and the variance diagnostic evaluated at the target
(not at theta = 0) predicts what VRPO does."""
import pytest
import torch

from vrpo.simulate import aux_models
from vrpo.simulate.data import cell_weights, population_cell_weights, ref_pair_weights, simulate
from vrpo.simulate.estimators import (CELL_WEIGHTS, OBJECTIVES, LinearReward, Problem, TabularPolicy,
                                      cell_grad_hessian, cell_objective, fit, fit_smoothed)
from vrpo.simulate.experiment import greedy_disagreement, greedy_regret, population_target, run_setting
from vrpo.simulate.gradvar import diagnose_at, one_replicate
from vrpo.simulate.world import make_world

from tests.test_simulate import one_thread  # noqa: F401  (autouse: one torch thread, like the command)


def _problems(world, data):
    """Every objective, with a g that differs per cell and a per-replicate coefficient."""
    cw = cell_weights(data)
    g_obs, g_ref = aux_models.crossfit_aux(world, data, folds=3, seed=0)
    ref_w, ties = ref_pair_weights(data, 3)
    coef = torch.tensor([[0.7], [1.0]], dtype=torch.float64)
    return [Problem(o, b, cw) for o in ("base", "cdpo", "rdpo") for b in ("sigmoid", "ramp")] + \
           [Problem("vrpo", b, cw, g_obs, ref_w, ties, g_ref, coef) for b in ("sigmoid", "ramp")]


def test_one_weight_per_cell_equals_each_objective():
    """sum_cells W f(z) differs from OBJECTIVES by a constant (the ties' f(0)): equal
    differences between two parameters, for every objective and base loss."""
    w = make_world("cyclic", num_contexts=3, num_responses=4)
    data = simulate(w, replicates=2, n=30, max_k=4, seed=1)
    model = LinearReward(w.features)
    gen = torch.Generator().manual_seed(0)
    t1, t2 = (torch.randn(2, 4, dtype=torch.float64, generator=gen) * 2 for _ in range(2))
    for p in _problems(w, data):
        weights = CELL_WEIGHTS[p.objective](p)
        ours = cell_objective(model.rewards(t1), weights, p.base) - cell_objective(model.rewards(t2), weights, p.base)
        direct = OBJECTIVES[p.objective](model.rewards(t1), p) - OBJECTIVES[p.objective](model.rewards(t2), p)
        assert torch.allclose(ours, direct, atol=1e-12), (p.objective, p.base)


def test_cell_gradient_and_hessian_equal_autograd_of_the_objective():
    w = make_world("nonlinear", num_contexts=3, num_responses=4)
    data = simulate(w, replicates=2, n=30, max_k=4, seed=2)
    u = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = [q for q in _problems(w, data) if q.objective == "vrpo" and q.base == "sigmoid"][0]
    g_u, h_u = cell_grad_hessian(u, CELL_WEIGHTS["vrpo"](p), "sigmoid")
    for r in (1,):  # the replicate with coefficient 1
        fn = lambda v: OBJECTIVES["vrpo"](v[None].expand(2, -1, -1), p)[r]  # noqa: E731
        assert torch.allclose(g_u[r], torch.func.grad(fn)(u[r]), atol=1e-12)
        full = torch.autograd.functional.hessian(fn, u[r])  # [X, A, X, A]: block diagonal per prompt
        for x in range(3):
            assert torch.allclose(h_u[r, x], full[x, :, x, :], atol=1e-10)


def _ramp_population(kind):
    w = make_world(kind)
    model = LinearReward(w.features)
    return w, model, Problem("base", "ramp", population_cell_weights(w)[None])


def _exact(model, problem, theta, ridge=1e-3):
    return OBJECTIVES["base"](model.rewards(theta), problem) + 0.5 * ridge * (theta ** 2).sum(-1)


@pytest.mark.parametrize("kind", ["nonlinear", "cyclic"])
def test_ramp_population_target_is_a_converged_minimiser(kind):
    """The target is reached to tolerance; no random start (30 of them, the same smoothing
    path) finds a lower exact objective; the old budget (3,000 Adam steps from 0) stops
    higher; and no nearby point (radius 0.01) is lower."""
    w, model, problem = _ramp_population(kind)
    target = population_target(w, model, "ramp", ridge=1e-3)
    best = float(_exact(model, problem, target[None])[0])
    starts = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    many = fit_smoothed(model, Problem("base", "ramp", problem.cell_w.expand(30, -1, -1, -1)), 30, 1e-3, init=starts)
    assert float(_exact(model, Problem("base", "ramp", problem.cell_w.expand(30, -1, -1, -1)), many.theta).min()) >= best - 1e-9
    theta = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.03)
    for _ in range(3000):
        opt.zero_grad()
        _exact(model, problem, theta).sum().backward()
        opt.step()
    assert float(_exact(model, problem, theta.detach())[0]) > best
    nearby = target + 0.01 * torch.nn.functional.normalize(
        torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert float(_exact(model, problem.__class__("base", "ramp", problem.cell_w.expand(200, -1, -1, -1)),
                        nearby).min()) >= best - 1e-6


def test_ramp_fits_converge_on_samples_and_tabular_model():
    w = make_world("mixture", num_contexts=4, num_responses=4)
    data = simulate(w, replicates=5, n=60, max_k=4, seed=3)
    for model in (LinearReward(w.features), TabularPolicy(w.features)):
        res = fit(model, Problem("base", "ramp", cell_weights(data)), 5, ridge=1e-2)
        assert res.converged.all()


def test_greedy_disagreement_and_excess_regret_by_hand():
    """One prompt, three responses with rewards theta' phi: the target picks response 0."""
    w = make_world("nonlinear", num_contexts=1, num_responses=3)
    model = TabularPolicy(w.features)
    target = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    same, other = torch.tensor([[5.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    assert greedy_disagreement(w, model, same.double(), target).tolist() == [0.0]
    assert greedy_disagreement(w, model, other.double(), target).tolist() == [1.0]
    s = w.win_rate_vs_ref()[0]
    assert float(greedy_regret(w, model, other.double())[0] - greedy_regret(w, model, target[None])[0]) == \
        pytest.approx(float(s[0] - s[1]))
    res = run_setting(make_world("nonlinear"), 20, 100, ["base"], seed=1)
    b = res["base"]
    assert b["excess_regret"] == pytest.approx(b["regret"] - res["_target"]["sigmoid"]["regret"])


def test_diagnostic_at_the_target_sees_no_pair_variance_where_bt_is_correct():
    """In `bt` the score's mean given the pair is (sigmoid(z_ab) - p*_ab)(phi_a - phi_b): zero
    for every pair at the target, not at theta = 0 where sigmoid(0) = 1/2. Evaluated at 0 the
    diagnostic finds pair variance (and promises a gain); at the DPO fit and the target, none."""
    w = make_world("bt")
    model = LinearReward(w.features)
    data = one_replicate(simulate(w, replicates=1, n=400, max_k=16, seed=5), 0)
    g = w.pref[None]
    target = population_target(w, model, "sigmoid", 1e-3)
    fitted = fit(model, Problem("base", "sigmoid", cell_weights(data)), 1, 1e-3).theta[0]
    at = {name: diagnose_at(model, data, th, g, g, 1e-3) for name, th in
          (("reference", torch.zeros(4, dtype=torch.float64)), ("fitted", fitted), ("target", target))}
    assert at["reference"]["pair_share"] > 0.2 and at["reference"]["predicted_ratio"]["8"] < 0.8
    assert at["target"]["pair_share"] < 0.01 and at["target"]["predicted_ratio"]["8"] > 0.98
    assert at["fitted"]["pair_share"] < 0.05 and at["fitted"]["predicted_ratio"]["8"] > 0.95


def test_parameter_space_prediction_matches_the_measured_mse_ratio():
    """nonlinear: the sandwich prediction at the DPO fit of one dataset, averaged over 4
    datasets, is within 0.15 of the MSE ratio measured over 60 datasets."""
    w = make_world("nonlinear")
    model = LinearReward(w.features)
    measured = run_setting(w, 60, 200, ["base", "vrpo_oracle"], seed=4)
    ratio = measured["vrpo_oracle"]["mse"] / measured["base"]["mse"]
    data = simulate(w, replicates=4, n=200, max_k=16, seed=9)
    fitted = fit(model, Problem("base", "sigmoid", cell_weights(data)), 4, 1e-3).theta
    g = w.pref[None]
    pred = [diagnose_at(model, one_replicate(data, r), fitted[r], g, g, 1e-3)["predicted_mse_ratio"]["8"]
            for r in range(4)]
    assert abs(sum(pred) / 4 - ratio) < 0.15, (pred, ratio)
    assert ratio < 0.7


def test_auxiliary_model_learns_with_its_own_labels():
    """nonlinear: g trained on 16x more labels of its own is closer to p* and keeps more of
    the oracle's MSE cut than g trained on as many labels as VRPO sees."""
    from vrpo.simulate.experiment import aux_learning_curve

    curve = aux_learning_curve(make_world("nonlinear"), 30, 200, seed=2, factors=(1, 16))
    small, large = curve["own_labels"]["200"], curve["own_labels"]["3200"]
    assert large["g_rms_error"] < 0.8 * small["g_rms_error"]
    assert large["fraction_of_oracle"] > small["fraction_of_oracle"]
    assert curve["oracle_mse_ratio"] < 0.7


def test_double_robustness_when_bradley_terry_is_correct():
    """BT correct (`bt`, `bt_wrong_ref`): the VRPO target is theta* when pi_ref OR g is right;
    with both wrong it moves. bias^2 relative to the base's MSE, 60 datasets of 400 pairs."""
    right_ref = run_setting(make_world("bt"), 60, 400, ["base", "vrpo_wrong_aux"], seed=3)
    wrong_ref = run_setting(make_world("bt_wrong_ref"), 60, 400, ["base", "vrpo_oracle", "vrpo_wrong_aux"], seed=3)
    scale = wrong_ref["base"]["mse"]
    assert wrong_ref["base"]["bias2"] < 0.1 * scale  # DPO does not use pi_ref
    assert wrong_ref["vrpo_oracle"]["bias2"] < 0.1 * scale  # pi_ref wrong, g right
    assert right_ref["vrpo_wrong_aux"]["bias2"] < 0.1 * right_ref["vrpo_wrong_aux"]["mse"]  # pi_ref right, g wrong
    assert wrong_ref["vrpo_wrong_aux"]["bias2"] > 0.5 * wrong_ref["vrpo_wrong_aux"]["mse"]  # both wrong: bias
