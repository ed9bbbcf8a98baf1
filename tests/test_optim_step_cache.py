"""The step cache (resfast/optim/_step_cache.py) never serves a stale tensor.

Each scenario changes something between steps that the cached kernel calls depend on, runs the same
sequence through torch.optim (foreach=False) and through resfast, and compares every param and state
after every step (tolerance as in test_optim_hardening: 1e-5 of the magnitude, far below what an
update of the wrong tensor, a missed update or a stale state produces). A spy checks that steps where
nothing changed do reuse the cache, so the scenarios exercise it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import resfast.optim
from tests.optim_cases import backend_params
from tests.optim_helpers import state_tensors

TORCH_RTOL = 1e-5
# One case per optimizer, with the options that give it the most state.
CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    ("AdamW", {"lr": 0.01}),
]
BACKENDS = [b for b in backend_params() if b.values[0] in ("cpu", "triton", "reference")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(5, 4, generator=gen)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def _snapshot(opt, params) -> list[tuple[str, torch.Tensor]]:
    return [(label, t.detach().clone()) for label, t in state_tensors(opt, params)]


def _trajectory(impl: str, name: str, kwargs: dict, backend: str, event: Callable, steps: int = 6):
    model = _model()
    params = list(model.parameters())
    extra = {"backend": backend} if impl == "resfast" else {"foreach": False}
    opt = getattr(resfast.optim if impl == "resfast" else torch.optim, name)(params, **extra, **kwargs)
    snapshots = []
    for step in range(steps):
        _grads(model, step)
        event(step, model, opt)
        opt.step()
        params = [p for group in opt.param_groups for p in group["params"]]
        snapshots.append(_snapshot(opt, params))
    return snapshots, opt, model


def _assert_same(theirs: list, ours: list) -> None:
    for step, (want_now, mine_now) in enumerate(zip(theirs, ours, strict=True)):
        assert [label for label, _ in mine_now] == [label for label, _ in want_now], f"step {step}"
        for (label, want), (_, mine) in zip(want_now, mine_now, strict=True):
            if label.endswith(".step"):
                assert mine.item() == want.item(), f"step {step}: {label}"
                continue
            atol = TORCH_RTOL * max(want.abs().max().item() if want.numel() else 0.0, 1.0)
            torch.testing.assert_close(mine, want, rtol=0, atol=atol, msg=f"step {step}: {label}")


def _replace_storage(step, model, opt):
    """p.data = a copy: the param keeps its identity, its storage is new (the old one must not move)."""
    if step == 2:
        for p in model.parameters():
            p.data = p.data.clone()


def _cast_round_trip(step, model, opt):
    """model.double().float(), as a user casting for an evaluation would: every param gets new storage."""
    if step == 2:
        model.double().float()


def _some_grads_none(step, model, opt):
    if step in (2, 3):
        model[0].weight.grad = None
    if step == 4:
        model[2].bias.grad = None


def _transposed_grad(step, model, opt):
    """A grad with other strides than its param: the fast kernel cannot take it this step."""
    if step == 3:
        g = model[0].weight.grad
        model[0].weight.grad = g.t().contiguous().t()


def _add_group(step, model, opt):
    if step == 2:
        extra = nn.Parameter(torch.linspace(-1, 1, 7))
        model.register_parameter("extra", extra)
        opt.add_param_group({"params": [extra]})
    if step >= 2:
        model.extra.grad = torch.full_like(model.extra, 0.1 * step)


def _reload_state(step, model, opt):
    """load_state_dict of an earlier snapshot: every state tensor is replaced."""
    if step == 1:
        opt.saved = copy.deepcopy(opt.state_dict())
    if step == 3:
        opt.load_state_dict(opt.saved)


def _clear_state(step, model, opt):
    if step == 3:
        opt.state.clear()


def _change_options(step, model, opt):
    """Options that drop a state tensor from the update (torch cannot add one mid-run) switched off."""
    if step == 3:
        for group in opt.param_groups:
            for key, off in (("amsgrad", False), ("centered", False), ("momentum", 0.0)):
                if key in group:
                    group[key] = off


def _assign_state(step, model, opt):
    """A state tensor replaced by assignment, and a param's whole state dict replaced by a copy."""
    if step == 2:
        p = model[0].weight
        key = next(k for k in sorted(opt.state[p]) if k != "step")
        opt.state[p][key] = opt.state[p][key].clone() * 0.5
    if step == 4:
        p = model[2].bias
        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


def _assign_steps(step, model, opt):
    """Every step counter replaced by a new tensor with another count (a kept call must not go on
    counting, or building its bias corrections from, the old ones)."""
    if step == 2:
        for state in opt.state.values():
            if "step" in state:
                state["step"] = state["step"].clone() + 7


def _swap_tensors(step, model, opt):
    """torch.utils.swap_tensors (what nn.Module conversions do under torch.__future__'s
    swap_module_params_on_conversion): each param object stays, the tensor behind it is another."""
    if step == 2:
        for p in model.parameters():
            twin = nn.Parameter(p.detach().clone())
            twin.grad = p.grad
            torch.utils.swap_tensors(p, twin)


def _replace_param(step, model, opt):
    """A param replaced in the model and, at the same position, in its group's list."""
    if step == 2:
        old = model[0].bias
        model[0].bias = nn.Parameter(old.detach() + 1)
        model[0].bias.grad = old.grad.clone()
        params = opt.param_groups[0]["params"]
        params[next(i for i, p in enumerate(params) if p is old)] = model[0].bias


SCENARIOS = {
    "swap-tensors": _swap_tensors,
    "param-replaced": _replace_param,
    "replace-storage": _replace_storage,
    "cast-round-trip": _cast_round_trip,
    "some-grads-none": _some_grads_none,
    "transposed-grad": _transposed_grad,
    "add-param-group": _add_group,
    "load-state-dict": _reload_state,
    "state-cleared": _clear_state,
    "options-changed": _change_options,
    "state-assigned": _assign_state,
    "steps-assigned": _assign_steps,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[name for name, _ in CASES])
def test_changes_between_steps_are_seen(case, backend, scenario):
    name, kwargs = case
    event = SCENARIOS[scenario]
    theirs, *_ = _trajectory("torch", name, kwargs, backend, event)
    ours, *_ = _trajectory("resfast", name, kwargs, backend, event)
    _assert_same(theirs, ours)


@pytest.mark.parametrize("case", CASES, ids=[name for name, _ in CASES])
def test_unchanged_steps_reuse_the_cache(case, monkeypatch):
    """From the second step on (the first creates the states), a step that changes nothing plans
    nothing; replacing a param's storage makes the next step plan again."""
    name, kwargs = case
    model = _model()
    opt = getattr(resfast.optim, name)(model.parameters(), **kwargs)
    planned = []
    plan = type(opt)._plan
    monkeypatch.setattr(type(opt), "_plan", lambda self, group: planned.append(1) or plan(self, group))
    for step in range(5):
        _grads(model, step)
        if step == 3:
            model[0].weight.data = model[0].weight.data.clone()
        opt.step()
    # Step 0 (which creates the states: its plan is not kept), 1 and 3 (new storage); torch's Adagrad
    # creates its states in its constructor, so its first plan is kept already.
    assert len(planned) == (2 if name == "Adagrad" else 3)


def _prepared(opt) -> list:
    """The native backend's prepared update of each kept call (resfast.kernels.cext.launch)."""
    return [
        call.kept.get("native") for entry in opt._step_cache()._entries.values() for call, *_ in entry.calls
    ]


@pytest.mark.parametrize("case", CASES, ids=[name for name, _ in CASES])
def test_a_kept_native_call_is_prepared_once_and_takes_option_changes(case):
    """On the cpu backend a kept call's params and states stay in one PreparedUpdate across steps, which
    reads the grads itself; flipping `maximize` (an op flag) reaches it (every step still matches
    torch's)."""
    name, kwargs = case
    if "cpu" not in [b.values[0] for b in BACKENDS]:
        pytest.skip("resfast._C is not built")
    model, twin = _model(), _model()
    opt = getattr(resfast.optim, name)(model.parameters(), backend="cpu", **kwargs)
    ref = getattr(torch.optim, name)(twin.parameters(), foreach=False, **kwargs)
    seen, seen_kept = [], []
    for step in range(6):
        if step == 4:
            for group in opt.param_groups + ref.param_groups:
                group["maximize"] = True
        for m in (model, twin):
            _grads(m, step)
        opt.step()
        ref.step()
        seen.append(_prepared(opt))
        if step >= 2:
            entries = opt._step_cache()._entries.values()
            seen_kept.extend(call.kept for entry in entries for call, *_ in entry.calls)
        _assert_same([_snapshot(ref, list(twin.parameters()))], [_snapshot(opt, list(model.parameters()))])
    # Steps 0-1 plan (the states are created at step 0); steps 2-5 reuse step 1's call and its update.
    assert len(seen[2]) == 1 and seen[2][0] is not None
    assert all(later[0] is seen[2][0] for later in seen[3:])
    assert opt._step_cache()._entries[id(opt.param_groups[0])].native is seen[2][0]
    # Its step counters are held natively too, made once at the call's first step.
    counters = [kept.get("steps") for kept in seen_kept]
    if opt._spec.has_step:
        assert counters[0] is not None and all(c is counters[0] for c in counters)
        assert len(counters[0]) == len(list(model.parameters()))
    else:
        assert counters == [None] * len(counters)


def test_a_kept_triton_call_rebuilds_its_work_table_only_when_the_grads_move():
    """The Triton launcher keeps a kept call's work table by its grads' addresses: reused while the
    grads stay in place (zero_grad(set_to_none=False)), rebuilt when new grads arrive elsewhere, and
    every step matches torch's."""
    if "triton" not in [b.values[0] for b in BACKENDS]:
        pytest.skip("triton is not available")
    from resfast.kernels import triton_optim

    model, twin = _model(), _model()
    opt = resfast.optim.Adam(model.parameters(), lr=0.01, backend="triton")
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, foreach=False)
    built, held = [], []
    build = triton_optim._work_table
    triton_optim._work_table = lambda *a: built.append(1) or build(*a)
    try:
        for step in range(6):
            for m in (model, twin):
                if step == 4:  # new grad tensors for one step, elsewhere: the old ones are held
                    held.append([p.grad for p in m.parameters()])
                    m.zero_grad(set_to_none=True)
                _grads_in_place(m, step)
            opt.step()
            ref.step()
            want, got = _snapshot(ref, list(twin.parameters())), _snapshot(opt, list(model.parameters()))
            _assert_same([want], [got])
    finally:
        triton_optim._work_table = build
    # Built at steps 0 and 1 (each planned; step 0 created the states) and 4 (the grads moved); steps
    # 2, 3 and 5 reused the kept table.
    assert len(built) == 3


def _grads_in_place(model: nn.Module, step: int) -> None:
    """This step's grads, written into the existing grad tensors where there are some."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def test_a_step_that_raises_releases_the_grads_it_loaded():
    """Group 0's native update reads its grads (the step cache's fast path) before group 1's plan raises:
    the raise must release them (they would hold their memory until the next step) and change nothing."""
    if "cpu" not in [b.values[0] for b in BACKENDS]:
        pytest.skip("resfast._C is not built")
    model = _model()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = resfast.optim.Adam(groups, lr=0.01, backend="cpu")
    for step in range(2):
        _grads(model, step)
        opt.step()
    native = opt._step_cache()._entries[id(opt.param_groups[0])].native
    assert native is not None  # the fast path serves group 0
    _grads(model, 2)
    opt.param_groups[1]["capturable"] = True  # refused on the CPU, when group 1 is planned again
    before = _snapshot(opt, list(model.parameters()))
    with pytest.raises(AssertionError, match="capturable=True"):
        opt.step()
    for (label, want), (_, got) in zip(before, _snapshot(opt, list(model.parameters())), strict=True):
        assert torch.equal(got, want), label
    with pytest.raises(RuntimeError, match="none loaded"):
        native.run(None, torch.zeros(2, 7), None, None)
