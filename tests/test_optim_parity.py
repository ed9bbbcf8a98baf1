"""Trajectory parity: resfast's optimizers follow torch.optim's on every option, dtype and backend.

Tolerance (flash-attention's rule): on every param and state tensor, resfast's error against a float64
run of torch.optim is at most twice torch's own error in the same dtype, plus a floor of 8 units in the
last place of the dtype (relative to the tensor's magnitude) for tensors where torch happens to be
exact. Low-precision states are compared only where torch's error is meaningful, so this rule is tight
for fp32 (a few ulps) and reflects bf16/fp16 rounding otherwise. Fast backends are also checked
against the reference backend, much more tightly: both compute in fp32, so they may differ only by
fp32 rounding (FMA contraction) and the one rounding of each stored low-precision value.
"""

from __future__ import annotations

import pytest
import torch

from tests.optim_cases import CASES, DTYPES, backend_params, case_id
from tests.optim_helpers import build, make_grads, make_params, max_err, state_tensors, ulp

STEPS = 4


def _trajectory(name, kwargs, impl, dtype, backend=None, grad_dtype=None):
    params = make_params(dtype)
    opt = build(name, impl, params, kwargs, backend)
    for step in range(STEPS):
        for p, g in zip(params, make_grads(step, len(params)), strict=True):
            # Every run sees the same gradients: those representable in the dtype under test.
            p.grad = None if g is None else g.to(grad_dtype or dtype).to(p.dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch_within_its_own_error(case, backend, dtype):
    name, kwargs = case
    truth_opt, truth = _trajectory(name, kwargs, "torch", torch.float64, grad_dtype=dtype)
    torch_opt, theirs = _trajectory(name, kwargs, "torch", dtype)
    ours_opt, ours = _trajectory(name, kwargs, "resfast", dtype, backend)

    expected = state_tensors(truth_opt, truth)
    got = state_tensors(ours_opt, ours)
    assert [n for n, _ in got] == [n for n, _ in expected] == [n for n, _ in state_tensors(torch_opt, theirs)]
    for (label, want), (_, mine), (_, torch_value) in zip(
        expected, got, state_tensors(torch_opt, theirs), strict=True
    ):
        if label.endswith(".step"):
            assert torch.equal(mine.cpu().double(), want.double()), label  # per-tensor counts, exact
            continue
        assert mine.dtype == torch_value.dtype and mine.shape == want.shape, label
        scale = want.abs().max().item() if want.numel() else 0.0
        bound = 2 * max_err(torch_value, want) + 8 * ulp(dtype) * max(scale, 1e-3)
        assert max_err(mine, want) <= bound, f"{label}: error {max_err(mine, want):.3g} > {bound:.3g}"


FAST = [b for b in backend_params() if b.values[0] != "reference"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fast_backend_matches_reference(case, backend, dtype):
    name, kwargs = case
    ref_opt, ref = _trajectory(name, kwargs, "resfast", dtype, "reference")
    fast_opt, fast = _trajectory(name, kwargs, "resfast", dtype, backend)
    for (label, want), (_, got) in zip(
        state_tensors(ref_opt, ref), state_tensors(fast_opt, fast), strict=True
    ):
        scale = want.abs().max().item() if want.numel() else 0.0
        # fp32: a few ulps of fp32 reassociation; low precision: one rounding step of the stored dtype.
        bound = (4 * ulp(torch.float32) if dtype == torch.float32 else 2 * ulp(dtype)) * max(scale, 1.0)
        assert max_err(got, want) <= bound, f"{label}: {max_err(got, want):.3g} > {bound:.3g}"
