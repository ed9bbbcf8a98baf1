"""GradScaler: grads are unscaled inside the update, and an inf/nan leaves everything bit-identical."""

from __future__ import annotations

import pytest
import torch

import resfast.optim
from tests.optim_cases import CASES, backend_params, case_id
from tests.optim_helpers import make_params, max_err, state_tensors


def _step_with_scaler(opt, params, scaler, poison: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(p.shape, generator=gen) for p in params]
    opt.zero_grad()
    loss = sum((w * p.float()).sum() for w, p in zip(weights, params, strict=True))
    scaler.scale(loss).backward()
    if poison:
        params[5].grad.view(-1)[17] = float("inf")
    scaler.step(opt)
    scaler.update()


def _snapshot(opt, params):
    return [(label, t.clone()) for label, t in state_tensors(opt, params)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("when", ["first-step", "later-step"])
def test_inf_grad_step_changes_nothing(case, backend, when):
    """A step whose grads hold an inf leaves every param and existing state bit-identical, and the run
    then continues exactly as if that step had never been taken (scales are powers of two, so the
    unscaled grads are the same whatever the scale)."""
    name, kwargs = case
    finals = []
    for poisoned in (False, True):
        params = [p.requires_grad_() for p in make_params(torch.float32)]
        opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        if when == "later-step":
            _step_with_scaler(opt, params, scaler, poison=False, seed=0)
        if poisoned:
            before = dict(_snapshot(opt, params))
            _step_with_scaler(opt, params, scaler, poison=True, seed=1)
            assert scaler.get_scale() == 512.0  # the scaler saw the inf and backed off
            for label, value in state_tensors(opt, params):
                if label in before:
                    assert torch.equal(value, before[label]), label
                else:  # state made on a skipped first step must be exactly the initial state
                    initial = (
                        opt.defaults.get("initial_accumulator_value", 0.0) if label.endswith(".sum") else 0.0
                    )
                    assert bool((value == initial).all()), label
        _step_with_scaler(opt, params, scaler, poison=False, seed=2)
        finals.append(_snapshot(opt, params))
    assert [label for label, _ in finals[0]] == [label for label, _ in finals[1]]
    for (label, a), (_, b) in zip(*finals, strict=True):
        assert torch.equal(a, b), label


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scaled_steps_match_torch(case, backend):
    """With a scale of 2^10 the trajectory equals torch's (which unscales before its update)."""
    name, kwargs = case
    runs = {}
    for impl in ("torch", "resfast"):
        params = [p.requires_grad_() for p in make_params(torch.float32)]
        extra = {"backend": backend} if impl == "resfast" else {"foreach": False}
        opt = getattr(torch.optim if impl == "torch" else resfast.optim, name)(params, **extra, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for seed in range(3):
            _step_with_scaler(opt, params, scaler, poison=False, seed=seed)
        runs[impl] = (opt, params)
    (t_opt, t_params), (r_opt, r_params) = runs["torch"], runs["resfast"]
    for (label, a), (_, b) in zip(
        state_tensors(t_opt, t_params), state_tensors(r_opt, r_params), strict=True
    ):
        assert max_err(a, b) <= 1e-5 * max(a.abs().max().item() if a.numel() else 0, 1.0), label
    # Grads were left unscaled, as after torch's unscale_.
    for a, b in zip(t_params, r_params, strict=True):
        assert max_err(a.grad, b.grad) <= 1e-6 * max(a.grad.abs().max().item() if a.numel() else 0, 1.0)


def test_steps_support_amp_scaling_flag():
    assert resfast.optim.Adam([torch.zeros(1, requires_grad=True)])._step_supports_amp_scaling


def test_sgd_skipped_first_step_with_complex_param_leaves_no_buffer():
    """Regression: the skipped first step deleted the new buffer through the param's real view, which
    is not a key of the optimizer's state (KeyError); it must use the param itself."""
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    opt = resfast.optim.SGD([p], lr=0.1, momentum=0.9, backend="reference")
    p.grad = torch.randn(3, dtype=torch.complex64)
    opt.found_inf, opt.grad_scale = torch.tensor(1.0), torch.tensor(1.0)  # what GradScaler sets
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before) and "momentum_buffer" not in opt.state[p]
