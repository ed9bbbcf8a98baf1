"""Loss-driven LR schedules: LossBackoff's rule and clamps, Plateau equal to torch's ReduceLROnPlateau,
bad losses ignored with a warning, state round trips."""

import math
import random
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

import resfast.schedules as S


def test_loss_backoff_follows_the_relative_change_of_the_loss():
    schedule = S.LossBackoff(1.0)
    expected = [1.0, 2.0, 0.5, 0.5 / (1 + (3.0 - 4.0) / 4.0)]  # lr / (1 + (loss - prev) / prev)
    for loss, lr in zip([2.0, 1.0, 4.0, 3.0], expected, strict=True):
        schedule.observe(loss)
        assert schedule(123) == pytest.approx(lr, rel=1e-14)


def test_loss_backoff_clamps_to_min_and_max():
    schedule = S.LossBackoff(1.0, min_lr=0.4, max_lr=1.5)
    schedule.observe(torch.tensor(1.0))  # a 0-dim tensor is accepted
    schedule.observe(10.0)  # would be 0.1
    assert schedule(0) == 0.4
    schedule.observe(0.1)  # would be 0.4 * 100
    assert schedule(0) == 1.5
    assert S.LossBackoff(2.0, max_lr=1.0)(0) == 1.0  # the base is clamped too


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_loss_backoff_ignores_a_bad_loss_with_a_warning(bad):
    schedule = S.LossBackoff(1.0)
    schedule.observe(2.0)
    with pytest.warns(RuntimeWarning, match=r"ignored .*a loss must be finite and > 0"):
        schedule.observe(bad)
    assert schedule(0) == 1.0
    schedule.observe(1.0)  # compared with 2.0, the last good loss
    assert schedule(0) == 2.0


def test_loss_backoff_skips_an_update_that_would_overflow():
    schedule = S.LossBackoff(1.0)
    schedule.observe(1e300)
    with pytest.warns(RuntimeWarning, match=r"the LR would become inf"):
        schedule.observe(1e-300)
    assert schedule(0) == 1.0


PLATEAU_CASES = [
    {},
    {"mode": "max"},
    {"threshold_mode": "abs", "threshold": 0.05},
    {"mode": "max", "threshold_mode": "abs", "threshold": 0.05},
    {"patience": 0, "cooldown": 2, "factor": 0.5},
    {"patience": 2, "min_lr": 0.004, "factor": 0.3},
    {"patience": 1, "eps": 0.02, "factor": 0.5},  # the eps rule: reductions smaller than eps are skipped
]


@pytest.mark.parametrize("options", PLATEAU_CASES, ids=lambda o: repr(o))
def test_plateau_equals_reduce_lr_on_plateau(options):
    rng = random.Random(0)
    # A metric that improves, stalls and wobbles, so that every branch of the rule is taken.
    metrics = [1.0 / (1 + i) if i < 10 else 0.09 + 0.01 * rng.random() for i in range(80)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_sched = ReduceLROnPlateau(opt, **{"patience": 3, **options})
    schedule = S.Plateau(0.1, **{"patience": 3, **options})
    changes = 0
    for metric in metrics:
        torch_sched.step(metric)
        schedule.observe(metric)
        assert schedule(0) == opt.param_groups[0]["lr"]
        changes += schedule(0) != 0.1
    assert changes > 0  # the LR was reduced at least once, so the comparison tested the rule


def test_plateau_ignores_nan_where_torch_would_count_a_bad_epoch():
    schedule = S.Plateau(1.0, patience=0)
    schedule.observe(1.0)
    with pytest.warns(RuntimeWarning, match=r"ignored nan .*finite"):
        schedule.observe(float("nan"))
    assert schedule(0) == 1.0 and schedule.num_bad == 0
    schedule.observe(2.0)  # worse than the best: with patience 0 the LR drops at once
    assert schedule(0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "make",
    [lambda: S.Plateau(0.1, patience=1), lambda: S.LossBackoff(0.1, min_lr=0.01)],
    ids=["Plateau", "LossBackoff"],
)
def test_state_dict_resumes_exactly(make):
    losses = [1.0, 0.8, 0.9, 0.95, 0.7, 0.99, 1.2, 0.5, 0.6, 0.65]
    original = make()
    for loss in losses[:5]:
        original.observe(loss)
    state = original.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for loss in losses[5:]:
        original.observe(loss)
        resumed.observe(loss)
        assert resumed(0) == original(0)
    assert original(0) != make()(0)  # the state mattered


def test_state_dict_of_the_wrong_tree_is_rejected():
    with pytest.raises(ValueError, match=r"needs 1 schedule state\(s\) \(Plateau\), got 0"):
        S.Plateau(0.1).load_state_dict(S.Constant(0.1).state_dict())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: S.Plateau(0.1, factor=1.0), r"factor must be in \[0.0, 1.0\), got 1.0"),
        (lambda: S.Plateau(0.1, patience=-1), r"patience must be an int >= 0, got -1"),
        (lambda: S.Plateau(0.1, mode="avg"), r"mode must be one of 'min', 'max'; got 'avg'"),
        (lambda: S.Plateau(0.1, threshold_mode="x"), r"threshold_mode must be one of 'rel', 'abs'"),
        (lambda: S.LossBackoff(0.1, min_lr=0.5, max_lr=0.2), r"max_lr must be >= min_lr"),
        (lambda: S.LossBackoff(0.1, min_lr=-1), r"min_lr must be >= 0"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_values_stay_finite_whatever_is_observed():
    schedules = [S.LossBackoff(0.1, max_lr=10.0), S.Plateau(0.1, patience=0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for value in [1.0, float("nan"), 1e-300, 1e300, 1e-300, float("-inf"), -5.0, 0.0, 3.0]:
            for schedule in schedules:
                schedule.observe(value)
                assert math.isfinite(schedule(0)) and schedule(0) >= 0, (schedule, value)
