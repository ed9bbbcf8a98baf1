"""Batch-size schedules: formulas at t = 0, inside, at the end and past it; rounding; LR coupling; caps;
bad input."""

import pytest

import resfast.schedules as S

COSINE = S.Cosine(0.4, 1000)

# (schedule, t, expected size), from the formulas.
FORMULAS = [
    (S.ConstantBatch(96), 0, 96),
    (S.ConstantBatch(96), 1e12, 96),
    (S.StepBatch(32, 1000), 0, 32),
    (S.StepBatch(32, 1000), 999, 32),
    (S.StepBatch(32, 1000), 1000, 64),
    (S.StepBatch(32, 1000), 3500, 256),
    (S.StepBatch(32, 1000, factor=3, max_size=500), 2000, 288),
    (S.StepBatch(32, 1000, factor=3, max_size=500), 3000, 500),
    (S.StepBatch(32, 1000, max_size=4096), 1e15, 4096),  # no float overflow on the way to the cap
    (S.StepBatch(10, 1, factor=1.5), 3, 34),  # 33.75 rounds to the nearest int
    (S.LinearBatch(16, 64, 1000), 0, 16),
    (S.LinearBatch(16, 64, 1000), 500, 40),
    (S.LinearBatch(16, 64, 1000), 1000, 64),
    (S.LinearBatch(16, 64, 1000), 5000, 64),
    (S.LinearBatch(1, 2, 4), 2, 2),  # 1.5 rounds up, not to even
    (S.LinearBatch(64, 16, 1000), 250, 52),  # it may shrink too
    (S.PolynomialBatch(256, 1000), 0, 256),
    (S.PolynomialBatch(256, 1000), 500, 128),
    (S.PolynomialBatch(256, 1000, power=2.0), 500, 64),
    (S.PolynomialBatch(256, 1000, min_size=8), 990, 8),  # 2.56 is below min_size
    (S.PolynomialBatch(256, 1000), 1000, 1),
    (S.PolynomialBatch(256, 1000), 2000, 1),
    (S.CoupledBatch(COSINE, 128), 0, 128),
    (S.CoupledBatch(COSINE, 128), 500, 64),  # lr halves, so does the batch: lr / batch stays constant
    (S.CoupledBatch(COSINE, 128), 1000, 1),  # lr 0: at least 1
    (S.CoupledBatch(S.Step(0.1, 100, 0.5), 128, mode="inverse"), 250, 512),
    (S.CoupledBatch(COSINE, 128, mode="inverse"), 500, 256),
    (S.CoupledBatch(COSINE, 128, mode="inverse", max_size=1000), 999, 1000),
    (S.CoupledBatch(COSINE, 128, mode="inverse", max_size=1000), 1000, 1000),  # lr 0: the cap
    (S.CoupledBatch(S.Exponential(1.0, 10.0, 100), 8, max_size=50), 200, 50),
]


@pytest.mark.parametrize(("schedule", "t", "expected"), FORMULAS, ids=lambda v: repr(v)[:40])
def test_formula(schedule, t, expected):
    size = schedule(t)
    assert type(size) is int
    assert size == expected


def test_coupled_batch_ratio_is_rounded_not_truncated():
    # 100 * (0.1 * 0.7) / 0.1 is 69.99999999999999 in floating point: truncation would give 69.
    assert S.CoupledBatch(S.Step(0.1, 100, 0.7), 100)(100) == 70


def test_coupled_batch_takes_lr0_at_construction():
    backoff = S.LossBackoff(0.1)
    batch = S.CoupledBatch(backoff, 64)
    backoff.observe(2.0)
    backoff.observe(1.0)  # the LR doubles
    assert batch(0) == 128
    assert batch.lr0 == 0.1


BAD_INPUT = [
    (lambda: S.ConstantBatch(0), ValueError, r"size must be an int >= 1, got 0"),
    (lambda: S.ConstantBatch(32.0), TypeError, r"size must be an int, got 32.0 of type float"),
    (lambda: S.StepBatch(32, 0), ValueError, r"every \(samples\) must be > 0"),
    (lambda: S.StepBatch(32, 100, factor=0.5), ValueError, r"factor must be >= 1 .*got 0.5"),
    (lambda: S.StepBatch(32, 100, max_size=16), ValueError, r"max_size must be >= base \(32\), got 16"),
    (lambda: S.StepBatch(32, 1)(1e6), ValueError, r"overflows at t=1000000.0 .*give max_size"),
    (lambda: S.LinearBatch(0, 8, 100), ValueError, r"start must be an int >= 1, got 0"),
    (lambda: S.LinearBatch(4, 8, -1), ValueError, r"total \(samples\) must be > 0, got -1"),
    (lambda: S.PolynomialBatch(16, 100, min_size=32), ValueError, r"min_size must be <= base \(16\), got 32"),
    (lambda: S.CoupledBatch(S.Warmup(COSINE, 100), 64), ValueError, r"lr_schedule\(0\) > 0 .* got 0.0"),
    (
        lambda: S.CoupledBatch(COSINE, 64, mode="sideways"),
        ValueError,
        r"'proportional', 'inverse'; got 'sideways'",
    ),
    (lambda: S.CoupledBatch(S.ConstantBatch(4), 64), TypeError, r"lr_schedule must be an LR schedule"),
    (lambda: S.CoupledBatch(COSINE, 64, mode="inverse")(1000), ValueError, r"infinite batch; give max_size"),
    (lambda: S.ConstantBatch(8)(-3), ValueError, r"t \(samples seen\) must be >= 0, got -3"),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_is_a_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build()
