"""LR schedules: each formula at t = 0, inside, at the end and past it; equality with torch's schedulers
driven through a Plan at a constant batch; bad input."""

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as tls

import resfast.schedules as S

# Relative tolerance for torch equality: torch updates most LRs recursively (lr *= factor each step), so
# after n steps it is ~n ulps from the closed form; 1e-12 leaves room for a few thousand steps. Near an
# LR of 0 (end of Cosine/Polynomial) relative error means nothing, hence the absolute floor.
REL, ABS = 1e-12, 1e-15

# (schedule, t, expected): expected written out from the formula, not from the code.
FORMULAS = [
    (S.Constant(0.3), 0, 0.3),
    (S.Constant(0.3), 1e9, 0.3),
    (S.Step(0.1, 100, 0.5), 0, 0.1),
    (S.Step(0.1, 100, 0.5), 99.9, 0.1),
    (S.Step(0.1, 100, 0.5), 100, 0.05),
    (S.Step(0.1, 100, 0.5), 250, 0.025),
    (S.MultiStep(1.0, [300, 100, 100], 0.5), 0, 1.0),
    (S.MultiStep(1.0, [300, 100, 100], 0.5), 99.5, 1.0),
    (S.MultiStep(1.0, [300, 100, 100], 0.5), 100, 0.25),  # a repeated milestone counts twice
    (S.MultiStep(1.0, [300, 100, 100], 0.5), 300, 0.125),
    (S.MultiStep(1.0, [300, 100, 100], 0.5), 1e9, 0.125),
    (S.Exponential(2.0, 0.5, 10), 0, 2.0),
    (S.Exponential(2.0, 0.5, 10), 5, 2.0 * 0.5**0.5),
    (S.Exponential(2.0, 0.5, 10), 30, 0.25),
    (S.Polynomial(1.0, 100, 2.0, 0.1), 0, 1.0),
    (S.Polynomial(1.0, 100, 2.0, 0.1), 50, 0.9 * 0.25 + 0.1),
    (S.Polynomial(1.0, 100, 2.0, 0.1), 100, 0.1),
    (S.Polynomial(1.0, 100, 2.0, 0.1), 250, 0.1),
    (S.InverseTime(1.0, 10, 2.0), 0, 1.0),
    (S.InverseTime(1.0, 10, 2.0), 5, 0.5),
    (S.InverseTime(1.0, 10, 2.0), 10, 1 / 3),
    (S.Cosine(1.0, 100, 0.1), 0, 1.0),
    (S.Cosine(1.0, 100, 0.1), 25, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2),
    (S.Cosine(1.0, 100, 0.1), 50, 0.55),
    (S.Cosine(1.0, 100, 0.1), 100, 0.1),
    (S.Cosine(1.0, 100, 0.1), 150, 0.1),
    (S.Warmup(S.Constant(2.0), 100, 0.25), 0, 0.5),
    (S.Warmup(S.Constant(2.0), 100, 0.25), 50, 1.25),
    (S.Warmup(S.Constant(2.0), 100, 0.25), 100, 2.0),
    (S.Warmup(S.Step(2.0, 40, 0.5), 100), 50, 1.0 * 0.5),  # the inner schedule is not delayed
    (S.Warmup(S.Step(2.0, 40, 0.5), 100), 200, 2.0 * 0.5**5),
    (S.OneCycle(1.0, 1000, 0.25, 10.0, 100.0), 0, 0.1),
    (S.OneCycle(1.0, 1000, 0.25, 10.0, 100.0), 125, 0.55),
    (S.OneCycle(1.0, 1000, 0.25, 10.0, 100.0), 250, 1.0),
    (S.OneCycle(1.0, 1000, 0.25, 10.0, 100.0), 625, (1.0 + 0.001) / 2),
    (S.OneCycle(1.0, 1000, 0.25, 10.0, 100.0), 1000, 0.001),
    (S.OneCycle(1.0, 1000, 0.25, 10.0, 100.0), 5000, 0.001),
    (S.OneCycle(1.0, 1000, 0.0), 0, 1.0),  # pct_start=0: starts at the peak
    (S.Piecewise([S.Constant(1.0), S.Cosine(1.0, 100)], [50]), 49, 1.0),
    (S.Piecewise([S.Constant(1.0), S.Cosine(1.0, 100)], [50]), 50, 1.0),  # the cosine starts at its own 0
    (S.Piecewise([S.Constant(1.0), S.Cosine(1.0, 100)], [50]), 100, 0.5),
    (S.Piecewise([S.Constant(1.0), S.Cosine(1.0, 100), S.Constant(7.0)], [50, 60]), 60, 7.0),
]


@pytest.mark.parametrize(("schedule", "t", "expected"), FORMULAS, ids=lambda v: repr(v)[:40])
def test_formula(schedule, t, expected):
    assert schedule(t) == pytest.approx(expected, rel=REL, abs=ABS)


def make_optimizer(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=lr)


B = 48  # samples per step; not a power of two, so t = k * B is not a trivially exact float product
LR = 0.1

# (torch scheduler factory, resfast schedule with every length in samples = steps * B, steps to compare)
TORCH_EQUIVALENTS = [
    (lambda o: tls.StepLR(o, step_size=3, gamma=0.5), S.Step(LR, 3 * B, 0.5), 25),
    (lambda o: tls.MultiStepLR(o, [2, 5, 5, 9], 0.3), S.MultiStep(LR, [2 * B, 5 * B, 5 * B, 9 * B], 0.3), 14),
    (lambda o: tls.ExponentialLR(o, 0.93), S.Exponential(LR, 0.93, B), 60),
    (lambda o: tls.PolynomialLR(o, total_iters=10, power=2.0), S.Polynomial(LR, 10 * B, 2.0), 15),
    (lambda o: tls.CosineAnnealingLR(o, T_max=12, eta_min=0.01), S.Cosine(LR, 12 * B, 0.01), 13),
    (lambda o: tls.CosineAnnealingLR(o, T_max=200), S.Cosine(LR, 200 * B), 201),
    (lambda o: tls.LinearLR(o, start_factor=0.25, total_iters=8), S.Warmup(S.Constant(LR), 8 * B, 0.25), 12),
    (
        lambda o: tls.ChainedScheduler([tls.LinearLR(o, 0.1, total_iters=5), tls.ExponentialLR(o, 0.9)]),
        S.Warmup(S.Exponential(LR, 0.9, B), 5 * B, 0.1),
        10,
    ),
    (
        lambda o: tls.OneCycleLR(
            o, 0.5, 40, pct_start=0.25, div_factor=10.0, final_div_factor=100.0, cycle_momentum=False
        ),
        S.OneCycle.from_torch(0.5, 40, B, pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
        40,
    ),
    (
        lambda o: tls.OneCycleLR(o, LR, total_steps=97, cycle_momentum=False),
        S.OneCycle.from_torch(LR, 97, B),
        97,
    ),
]


def _case_id(value: object) -> str:
    # A lambda's repr holds its address, which differs between pytest-xdist's workers (they must
    # collect the same ids): the torch scheduler is named by the schedule beside it.
    return "torch" if isinstance(value, types.FunctionType) else repr(value)[:30]


@pytest.mark.parametrize(("make_torch", "schedule", "steps"), TORCH_EQUIVALENTS, ids=_case_id)
def test_equals_torch_scheduler_at_constant_batch(make_torch, schedule, steps):
    torch_opt, plan_opt = make_optimizer(LR), make_optimizer(LR)
    torch_sched = make_torch(torch_opt)
    plan = S.Plan(plan_opt, schedule, B)
    for step in range(steps):
        want = torch_opt.param_groups[0]["lr"]
        got = plan_opt.param_groups[0]["lr"]
        assert got == pytest.approx(want, rel=REL, abs=ABS), f"step {step}"
        assert plan.samples == step * B
        torch_opt.step()
        torch_sched.step()
        plan.step()


@settings(max_examples=60, deadline=None)
@given(
    base=st.floats(1e-4, 10.0),
    end_frac=st.floats(0.0, 1.0),
    total=st.floats(1.0, 1e7),
    t=st.floats(0.0, 3e7),
    power=st.floats(0.1, 4.0),
)
def test_decays_stay_between_end_and_base_and_hold_past_total(base, end_frac, total, t, power):
    end = base * end_frac
    for schedule in (S.Cosine(base, total, end), S.Polynomial(base, total, power, end)):
        value = schedule(t)
        assert end * (1 - 1e-12) <= value <= base * (1 + 1e-12)
        if t >= total:
            assert value == schedule(total) == pytest.approx(end, rel=1e-12)
    one_cycle = S.OneCycle(base, total, pct_start=end_frac * 0.99)
    assert base / 25.0 / 1e4 * (1 - 1e-12) <= one_cycle(t) <= base * (1 + 1e-12)


def test_repr_rebuilds_the_schedule():
    schedule = S.Piecewise([S.Warmup(S.Constant(0.2), 100, 0.1), S.OneCycle(0.2, 1000)], [100])
    rebuilt = eval(repr(schedule), vars(S))
    assert repr(rebuilt) == repr(schedule)
    assert [rebuilt(t) for t in (0, 50, 100, 400, 2000)] == [schedule(t) for t in (0, 50, 100, 400, 2000)]


BAD_INPUT = [
    (lambda: S.Step(0.1, 0), ValueError, r"every \(samples\) must be > 0, got 0"),
    (lambda: S.Step(0.1, -5), ValueError, r"every .* got -5"),
    (lambda: S.Step(-0.1, 10), ValueError, r"base must be >= 0, got -0.1"),
    (lambda: S.Exponential(0.1, -0.5, 10), ValueError, r"gamma must be > 0, got -0.5"),
    (lambda: S.Cosine(0.1, 0), ValueError, r"total \(samples\) must be > 0"),
    (lambda: S.Polynomial(0.1, 100, power=0), ValueError, r"power must be > 0"),
    (lambda: S.InverseTime(0.1, 10, rate=-1), ValueError, r"rate must be >= 0, got -1"),
    (lambda: S.Constant(float("nan")), ValueError, r"value must be finite, got nan"),
    (lambda: S.Constant("0.1"), TypeError, r"value must be a real number, got '0.1' of type str"),
    (lambda: S.Constant(True), TypeError, r"got True of type bool"),
    (lambda: S.Warmup(0.1, 100), TypeError, r"schedule must be an LR schedule"),
    (lambda: S.Warmup(S.Constant(1.0), 0), ValueError, r"samples \(warmup length\) must be > 0"),
    (
        lambda: S.Warmup(S.Constant(1.0), 10, start_factor=1.5),
        ValueError,
        r"start_factor must be in \[0.0, 1.0\]",
    ),
    (lambda: S.Warmup(S.ConstantBatch(8), 10), TypeError, r"must be an LR schedule"),
    (lambda: S.MultiStep(0.1, 5), TypeError, r"milestones must be an iterable"),
    (lambda: S.MultiStep(0.1, [10, -1]), ValueError, r"milestone \(samples\) must be >= 0, got -1"),
    (lambda: S.OneCycle(1.0, 100, pct_start=1.0), ValueError, r"pct_start must be in \[0.0, 1.0\), got 1.0"),
    (lambda: S.OneCycle.from_torch(1.0, 100, 32, pct_start=0.001), ValueError, r"torch's peak step"),
    (lambda: S.OneCycle.from_torch(1.0, 1, 32), ValueError, r"total_steps must be an int >= 2"),
    (lambda: S.Piecewise([S.Constant(1.0)], [5]), ValueError, r"one boundary fewer than schedules"),
    (lambda: S.Piecewise([S.Constant(1.0)] * 3, [5, 5]), ValueError, r"strictly increasing, got \[5, 5\]"),
    (lambda: S.Constant(1.0)(-1), ValueError, r"t \(samples seen\) must be >= 0, got -1"),
    (lambda: S.Cosine(1.0, 10)(float("nan")), ValueError, r"must be finite, got nan"),
    (lambda: S.Cosine(1.0, 10)("3"), TypeError, r"t \(samples seen\) must be a real number"),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_is_a_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build()
