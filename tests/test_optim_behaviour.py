"""What PyTorch checks of its own optimizers: schedulers, closures, hooks, tensor lr, no-grad steps."""

from __future__ import annotations

import pytest
import torch

import resfast.optim
from tests.optim_cases import CASES, OPTIMIZERS, backend_params, case_id
from tests.optim_helpers import build, make_params, max_err, run, state_tensors

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7),
    "LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=3),
    "PolynomialLR": lambda opt: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=4, power=2.0),
    "Chained": lambda opt: torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
        ]
    ),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_scheduler_drives_lr_as_in_torch(name, scheduler, backend):
    results = []
    for impl in ("torch", "resfast"):
        params = make_params(torch.float32)
        opt = build(name, impl, params, {"lr": 0.05}, backend)
        sched = SCHEDULERS[scheduler](opt)
        for step in range(5):
            run(opt, params, steps=1, first=step)
            sched.step()
        results.append((opt, params))
    (t_opt, t_params), (r_opt, r_params) = results
    assert [g["lr"] for g in t_opt.param_groups] == [g["lr"] for g in r_opt.param_groups]
    for (label, a), (_, b) in zip(
        state_tensors(t_opt, t_params), state_tensors(r_opt, r_params), strict=True
    ):
        assert max_err(a, b) <= 1e-5 * max(a.abs().max().item() if a.numel() else 0, 1.0), label


@pytest.mark.parametrize("backend", backend_params())
def test_reduce_lr_on_plateau(backend):
    params = make_params(torch.float32)
    opt = build("Adam", "resfast", params, {"lr": 0.1}, backend)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for step in range(3):
        run(opt, params, steps=1, first=step)
        sched.step(1.0)  # a metric that never improves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] != "Adagrad" or "lr_decay" not in c[1]], ids=case_id
)
def test_tensor_lr_equals_float_lr(case, backend):
    name, kwargs = case
    kwargs = {**kwargs, "lr": 0.03}
    finals = []
    for lr in (0.03, torch.tensor(0.03)):
        params = make_params(torch.float32)
        opt = getattr(resfast.optim, name)(params, backend=backend, **{**kwargs, "lr": lr})
        run(opt, params, steps=3)
        finals.append(params)
    for a, b in zip(*finals, strict=True):
        assert max_err(a, b) <= 1e-6 * max(a.abs().max().item() if a.numel() else 0, 1.0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_quadratic_loss_decreases_and_maximize_increases(case, backend):
    name, kwargs = case
    maximize = kwargs.get("maximize", False)
    target = torch.linspace(-1, 1, 12)
    weight = torch.zeros(12, requires_grad=True)
    # A transposed (non-contiguous) param too: it must update in place like any other.
    matrix = torch.zeros(4, 3).t().requires_grad_()
    opt = getattr(resfast.optim, name)([weight, matrix], backend=backend, **kwargs)

    def loss_fn():
        return ((weight - target) ** 2).sum() + ((matrix - 1) ** 2).sum()

    first = loss_fn().item()
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert (loss_fn().item() > first) if maximize else (loss_fn().item() < first)
    assert not matrix.is_contiguous() and matrix.abs().sum() > 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_with_closure_and_without_grads(name, backend):
    p = torch.ones(5, requires_grad=True)
    opt = getattr(resfast.optim, name)([p], lr=0.1, backend=backend)
    opt.step()  # no grads: nothing changes, no state
    assert torch.equal(p, torch.ones(5)) and all(
        k == "step" or k == "sum" for s in opt.state.values() for k in s
    )

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(5.0)
    assert (p < 1).all()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hooks_and_add_param_group(name):
    p, q = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = getattr(resfast.optim, name)([p], lr=0.1)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.add_param_group({"params": [q], "lr": 0.0})
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert calls == ["pre", "post"]
    assert torch.equal(q, torch.ones(2)) and not torch.equal(p, torch.ones(3))  # per-group lr honoured
    pre.remove()
    post.remove()
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_meta_params_step_as_in_torch(case):
    """Params on the meta device (shapes without values, e.g. to plan memory) step as with torch: the
    same state keys, shapes, dtypes and devices (the step count on the CPU, where torch keeps it)."""
    name, kwargs = case
    states = []
    for module in (torch.optim, resfast.optim):
        p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
        opt = getattr(module, name)([p], **kwargs)
        for _ in range(2):
            p.grad = torch.empty_like(p)
            opt.step()
        states.append({k: (v.shape, v.dtype, v.device) for k, v in opt.state[p].items()})
    assert states[1] == states[0]
