"""Gradient noise scale: recovers a planted B_noise from synthetic gradients; measure() reads grads as
update() expects; NoiseScaleBatch follows the estimate within its bounds and resumes."""

import math

import pytest
import torch

import resfast.schedules as S

DIM = 256
TRUE_GRAD_SQ = 1.0  # |G|^2
TRUE_TRACE = 32.0  # tr(Sigma): per-sample noise variance summed over the DIM coordinates
TRUE_B_NOISE = TRUE_TRACE / TRUE_GRAD_SQ


def per_sample_grads(generator, n):
    """n per-sample gradients with mean G (|G|^2 = TRUE_GRAD_SQ) and covariance TRUE_TRACE / DIM * I."""
    mean = torch.full((DIM,), math.sqrt(TRUE_GRAD_SQ / DIM), dtype=torch.float64)
    noise = torch.randn(n, DIM, generator=generator, dtype=torch.float64) * math.sqrt(TRUE_TRACE / DIM)
    return mean + noise


def test_recovers_a_planted_noise_scale_from_accumulated_gradients():
    # The usual setting: k micro-batches of b samples, loss / k per backward. After the first backward
    # the grad is (mean over b) / k, after the last it is the mean over k * b.
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
    micro, accumulation = 4, 8
    estimator = S.GradientNoiseScale(beta=0.995)
    for _ in range(1500):
        grads = per_sample_grads(generator, micro * accumulation)
        param.grad = grads[:micro].mean(0) / accumulation
        estimator.measure([param], micro, grad_scale=accumulation)
        param.grad = grads.mean(0)
        estimator.measure([param], micro * accumulation)
    # Each pair's estimate is noisy (|G|^2 is 1 against a noise of 32 / 4 per small batch); 1500 pairs
    # averaged bring the error to ~1% (seeds 0-3: at most 1.4%). A wrong formula (batch sizes swapped,
    # grad_scale ignored, per-pair ratios averaged) is off by a large factor.
    assert estimator.count == 1500
    assert estimator.grad_sq == pytest.approx(TRUE_GRAD_SQ, rel=0.05)
    assert estimator.trace == pytest.approx(TRUE_TRACE, rel=0.05)
    assert estimator.noise_scale == pytest.approx(TRUE_B_NOISE, rel=0.05)


def test_update_takes_squared_norms_of_batch_means():
    # Noise-free expectations: E|G_b|^2 = |G|^2 + tr(Sigma) / b, solved exactly by one pair.
    estimator = S.GradientNoiseScale(beta=0.9)
    small, big = TRUE_GRAD_SQ + TRUE_TRACE / 8, TRUE_GRAD_SQ + TRUE_TRACE / 128
    assert estimator.update(small, 8, big, 128) == pytest.approx(TRUE_B_NOISE, rel=1e-12)
    assert estimator.grad_sq == pytest.approx(TRUE_GRAD_SQ, rel=1e-12)  # debiased after one update
    assert estimator.trace == pytest.approx(TRUE_TRACE, rel=1e-12)


def test_measure_reads_the_same_numbers_as_update_in_either_order():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0]])]  # |g|^2 = 25 + 5 = 30
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    module = torch.nn.ParameterList(params)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    via_measure = S.GradientNoiseScale(beta=0.0)
    via_measure.measure(module, 64)  # the big batch first this time
    for p in params:
        p.grad.mul_(0.5)  # the small batch's grads, stored at half scale
    via_measure.measure(params, 16, grad_scale=2.0)
    via_update = S.GradientNoiseScale(beta=0.0)
    via_update.update(30.0, 16, 30.0, 64)
    assert via_measure.state_dict() == pytest.approx(via_update.state_dict())


def test_noise_scale_is_none_until_measurable():
    estimator = S.GradientNoiseScale()
    assert estimator.noise_scale is None and math.isnan(estimator.grad_sq)
    estimator.update(1.0, 8, 2.0, 64)  # the bigger batch has the bigger norm: |G|^2 estimate > 0
    assert estimator.noise_scale == 0.0  # tr(Sigma) estimated < 0 reads as no noise
    estimator = S.GradientNoiseScale()
    estimator.update(10.0, 8, 0.5, 64)  # |G|^2 estimate < 0: the noise hides the gradient
    assert estimator.noise_scale is None


def test_bad_measurements():
    estimator = S.GradientNoiseScale()
    with pytest.warns(RuntimeWarning, match=r"skipped non-finite squared norms \(inf, 1.0\)"):
        estimator.update(float("inf"), 8, 1.0, 64)
    assert estimator.count == 0
    with pytest.raises(ValueError, match=r"batch_big must be > batch_small, got batch_small=64, batch_big=8"):
        estimator.update(1.0, 64, 1.0, 8)
    with pytest.raises(ValueError, match=r"squared norms must be >= 0"):
        estimator.update(-1.0, 8, 1.0, 64)
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"found no gradients: call it after backward"):
        estimator.measure([param], 8)
    param.grad = torch.ones(2)
    estimator.measure([param], 8)
    with pytest.raises(ValueError, match=r"two different batch sizes per pair, got 8 twice"):
        estimator.measure([param], 8)
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\), got 1.0"):
        S.GradientNoiseScale(beta=1.0)


def test_noise_scale_batch_follows_the_estimate_within_its_bounds():
    estimator = S.GradientNoiseScale(beta=0.0)
    batch = S.NoiseScaleBatch(32, 1024, estimator)
    assert batch(0) == 32  # no estimate yet
    for b_noise, size in [(300.4, 300), (5.0, 32), (1e6, 1024)]:
        estimator.update(1.0 + b_noise / 8, 8, 1.0 + b_noise / 64, 64)
        assert batch(12345) == size
    with pytest.raises(ValueError, match=r"max_size must be an int >= 32, got 16"):
        S.NoiseScaleBatch(32, 16, estimator)


def test_noise_scale_batch_state_resumes_through_the_plan():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        estimator = S.GradientNoiseScale(beta=0.5)
        return S.Plan(opt, 0.1, S.NoiseScaleBatch(16, 4096, estimator), lr_scaling="sqrt"), estimator

    plan, estimator = make()
    for b_noise in (100.0, 200.0, 400.0):
        estimator.update(1.0 + b_noise / 8, 8, 1.0 + b_noise / 64, 64)
        plan.step()
    state = plan.state_dict()
    resumed, resumed_estimator = make()
    resumed.load_state_dict(state)
    # EMA of tr(Sigma) with beta 0.5: 50, 125, 262.5; debiased by 1 - 0.5^3: 300 (|G|^2 is 1 throughout).
    assert resumed.batch_size == plan.batch_size == 300
    assert resumed.lr == plan.lr == pytest.approx(0.1 * math.sqrt(300 / 16))
    assert resumed_estimator.state_dict() == estimator.state_dict()
