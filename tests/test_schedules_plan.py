"""The Plan: LR written into every param group, batch changes that leave the LR curve alone, LR scaling
and coupling, observe, exact resume, bad input."""

import io
import math
import warnings

import pytest
import torch

import resfast.schedules as S


def make_optimizer(*lrs):
    """SGD with one param group per lr."""
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs])


def lrs(optimizer):
    return [float(g["lr"]) for g in optimizer.param_groups]


def test_every_group_keeps_its_ratio_to_the_first():
    opt = make_optimizer(0.1, 0.02, 0.3)
    plan = S.Plan(opt, S.Cosine(1.0, 1000), 100)
    assert lrs(opt) == pytest.approx([1.0, 0.2, 3.0], rel=1e-15)  # written at construction, t = 0
    for _ in range(3):
        plan.step()
    assert plan.samples == 300 and plan.steps == 3
    lr = (1 + math.cos(math.pi * 0.3)) / 2
    assert lrs(opt) == pytest.approx([lr, 0.2 * lr, 3.0 * lr], rel=1e-15)
    assert plan.lr == lrs(opt)[0]


def test_tensor_lr_is_written_in_place():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([param], lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    plan = S.Plan(opt, S.Step(0.01, 10, 0.5), 10)
    plan.step()
    assert opt.param_groups[0]["lr"] is lr_tensor  # a captured (CUDA-graph) LR must stay the same tensor
    assert lr_tensor.item() == pytest.approx(0.005)


def test_a_param_group_added_later_gets_its_ratio():
    opt = make_optimizer(0.1)
    plan = S.Plan(opt, S.Constant(0.5), 8)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.05})
    plan.step()
    assert lrs(opt) == pytest.approx([0.5, 0.25])


def test_a_batch_change_leaves_the_lr_curve_unchanged():
    # The same LR schedule under a constant batch and under a growing one: wherever both runs stand at
    # the same sample count, the LR is the same, and it is the schedule at that count.
    schedule = S.Warmup(S.Cosine(0.8, 20_000), 2_000, 0.1)
    curves = []
    for batch in (S.ConstantBatch(64), S.StepBatch(64, 4_000, factor=2, max_size=512)):
        opt = make_optimizer(0.8)
        plan = S.Plan(opt, schedule, batch)
        curve = {}
        while plan.samples <= 25_000:
            curve[plan.samples] = lrs(opt)[0]
            plan.step()
        curves.append(curve)
    constant, growing = curves
    common = sorted(constant.keys() & growing.keys())
    assert len(common) > 20 and common[-1] > 20_000  # the runs share points before and after the changes
    assert len(growing) < len(constant) / 2  # the growing batch took far fewer steps
    for t in common:
        assert growing[t] == constant[t] == schedule(t)


@pytest.mark.parametrize(("scaling", "factor"), [("linear", lambda r: r), ("sqrt", math.sqrt)])
def test_lr_scaling_multiplies_by_the_batch_ratio(scaling, factor):
    opt = make_optimizer(0.1)
    batch = S.StepBatch(32, 320, factor=2, max_size=256)
    plan = S.Plan(opt, S.Constant(0.1), batch, lr_scaling=scaling, base_batch=64)
    for _ in range(25):
        assert plan.lr == pytest.approx(0.1 * factor(batch(plan.samples) / 64), rel=1e-15)
        plan.step()
    assert plan.batch_size == 256  # the batch did grow past base_batch
    default = S.Plan(make_optimizer(0.1), 0.1, batch, lr_scaling=scaling)
    assert default.base_batch == 32 and default.lr == pytest.approx(0.1)


def test_inverse_coupling_holds_the_lr_and_grows_the_batch():
    decay = S.Step(0.2, 1000, 0.5)
    opt = make_optimizer(0.2)
    plan = S.Plan(opt, decay, S.CoupledBatch(decay, 64, mode="inverse"))
    seen = []
    while plan.samples < 3000:
        seen.append((plan.samples, plan.batch_size, lrs(opt)[0]))
        plan.step()
    assert {lr for _, _, lr in seen} == {0.2}  # the LR never decays
    assert all(size == 64 * 2 ** (t // 1000) for t, size, _ in seen)  # the batch grows instead
    assert seen[-1][1] == 256


def test_proportional_coupling_follows_the_lr():
    cosine = S.Cosine(0.2, 10_000)
    plan = S.Plan(make_optimizer(0.2), cosine, S.CoupledBatch(cosine, 256, max_size=256))
    while plan.samples < 5_000:
        plan.step()
    assert plan.lr == pytest.approx(cosine(plan.samples))
    assert plan.batch_size == round(256 * cosine(plan.samples) / 0.2)
    assert plan.batch_size < 150


def test_observe_reaches_a_shared_schedule_once():
    backoff = S.LossBackoff(0.1)
    opt = make_optimizer(0.1)
    plan = S.Plan(opt, backoff, S.CoupledBatch(backoff, 32))  # the same object in both trees
    plan.observe(2.0)
    plan.observe(1.0)  # seen twice, the LR would be 0.4 instead of 0.2
    assert plan.lr == pytest.approx(0.2) and lrs(opt)[0] == pytest.approx(0.2)
    assert plan.batch_size == 64


def test_bad_losses_never_reach_the_lr():
    opt = make_optimizer(0.1)
    plan = S.Plan(opt, S.Warmup(S.LossBackoff(0.1), 100), 10)
    plan.observe(1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (float("nan"), 0.0, -2.0, float("inf"), torch.tensor(float("nan"))):
            plan.observe(bad)
            plan.step()
    assert len(caught) == 5 and all(issubclass(w.category, RuntimeWarning) for w in caught)
    assert lrs(opt)[0] == pytest.approx(0.1 * 0.5)  # the warmup moved on; the backoff did not


def test_an_infinite_lr_is_refused():
    plan = S.Plan(make_optimizer(1.0), S.Exponential(1e10, 1e10, 1), 1)
    for _ in range(29):
        plan.step()
    with pytest.raises(ValueError, match=r"the LR at t=30 samples is inf .*refusing to write it"):
        plan.step()


def make_resumable(opt):
    lr = S.Piecewise([S.Warmup(S.Constant(0.4), 300), S.Plateau(0.4, patience=1)], [300])
    return S.Plan(opt, lr, S.LinearBatch(16, 64, 1000), lr_scaling="linear")


def test_resume_from_state_dict_continues_exactly():
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 0.7, 0.8, 0.85, 0.9, 0.6, 0.61, 0.62, 0.63, 0.64]
    opt = make_optimizer(0.4, 0.04)
    plan = make_resumable(opt)
    for loss in losses[:7]:
        plan.step()
        plan.observe(loss)
    buffer = io.BytesIO()
    torch.save({"plan": plan.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain data only

    resumed_opt = make_optimizer(0.4, 0.04)
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed = make_resumable(resumed_opt)
    resumed.load_state_dict(checkpoint["plan"])
    assert lrs(resumed_opt) == lrs(opt)
    for loss in losses[7:]:
        plan.step()
        plan.observe(loss)
        resumed.step()
        resumed.observe(loss)
        assert (resumed.samples, resumed.steps, resumed.batch_size) == (
            plan.samples,
            plan.steps,
            plan.batch_size,
        )
        assert lrs(resumed_opt) == lrs(opt)
    assert plan.lr_schedule.schedules[1].lr < 0.4  # the plateau rule fired, so its state was carried


BAD_INPUT = [
    (lambda: S.Plan(object(), 0.1, 32), TypeError, r"optimizer must be a torch.optim.Optimizer"),
    (lambda: S.Plan(make_optimizer(0.0), 0.1, 32), ValueError, r"first param group's initial lr must be > 0"),
    (lambda: S.Plan(make_optimizer(0.1), "0.1", 32), TypeError, r"value must be a real number"),
    (lambda: S.Plan(make_optimizer(0.1), S.ConstantBatch(8), 32), TypeError, r"value must be a real number"),
    (lambda: S.Plan(make_optimizer(0.1), 0.1, 0), ValueError, r"size must be an int >= 1, got 0"),
    (lambda: S.Plan(make_optimizer(0.1), 0.1, 32, lr_scaling="cubic"), ValueError, r"None, 'linear', 'sqrt'"),
    (
        lambda: S.Plan(make_optimizer(0.1), 0.1, 32, base_batch=0),
        ValueError,
        r"base_batch must be an int >= 1",
    ),
    (
        lambda: S.Plan(make_optimizer(0.1), 0.1, S.CoupledBatch(S.Constant(0.1), 8), lr_scaling="linear"),
        ValueError,
        r"with CoupledBatch ties LR and batch twice",
    ),
    (
        lambda: S.Plan(make_optimizer(0.1), 0.1, 32).step(0),
        ValueError,
        r"samples in a step must be an int >= 1",
    ),
    (lambda: S.Plan(make_optimizer(0.1), 0.1, 32).step(1.5), TypeError, r"samples in a step must be an int"),
    (
        lambda: S.Plan(make_optimizer(0.1), S.Plateau(0.1), 32).load_state_dict(
            S.Plan(make_optimizer(0.1), 0.1, 32).state_dict()
        ),
        ValueError,
        r"needs 1 schedule state\(s\) \(Plateau\), got 0",
    ),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_is_a_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build()
