"""Hardening of the optimizers: every layout and size, non-finite values and bad checkpoints give
torch's answer or a clear error, never a silently wrong number.

Every test runs on every backend of every device (``device_backend_params()``: reference, triton and
the native cpu/cuda ones, on the CPU and, with a GPU, on CUDA; each skips, saying why, where it cannot
run). Against torch.optim (foreach=False, its readable loop) fp32 results may
differ by a few ulps per step (another operation order; torch's CPU kernels contract into FMAs),
compounded over a few steps: TORCH_RTOL = 1e-5 of the tensor's magnitude (~80 ulps) is far below what
a layout, offset or indexing error produces. Against the reference backend see ``fast_backend_bound``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor

import resfast.optim
from resfast.optim._layout import fast_layout
from tests.optim_cases import CASES, OPTIMIZERS, case_id
from tests.optim_helpers import (
    build,
    device_backend_params,
    fast_backend_bound,
    laid_out,
    make_params,
    run,
    state_tensors,
    untouched_outside,
)

TORCH_RTOL = 1e-5
DEVICE_BACKENDS = device_backend_params()
# One case per optimizer, the one with the most options, so that every state it keeps exists.
RICH = [max((c for c in CASES if c[0] == name), key=lambda c: len(c[1])) for name in OPTIMIZERS]


def _magnitude(t: Tensor) -> float:
    finite = t[t.isfinite()]
    return max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)


def assert_matches_torch(ours: Tensor, theirs: Tensor, label: str) -> None:
    """Same dtype, device and shape; same NaN positions and infinities; finite values within TORCH_RTOL."""
    atol = TORCH_RTOL * _magnitude(theirs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol, equal_nan=True, msg=lambda m: f"{label}: {m}")


def assert_state_matches_torch(mine: Tensor, want: Tensor, label: str) -> None:
    """As assert_matches_torch, except that a `step` counter is compared by value only: torch's
    non-fused optimizers keep it on the CPU, resfast beside its param (docs/ARCHITECTURE.md)."""
    if label.endswith(".step"):
        assert mine.item() == want.item(), label
    else:
        assert_matches_torch(mine, want, label)


def assert_states_match_torch(theirs, their_params, ours, our_params) -> None:
    expected, got = state_tensors(theirs, their_params), state_tensors(ours, our_params)
    assert [label for label, _ in got] == [label for label, _ in expected]
    for (label, want), (_, mine) in zip(expected, got, strict=True):
        assert_state_matches_torch(mine, want, label)


def _optimizer(impl: str, name: str, params, kwargs: dict, backend: str):
    if impl == "torch":
        return getattr(torch.optim, name)(params, foreach=False, **kwargs)
    return getattr(resfast.optim, name)(params, backend=backend, **kwargs)


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _relayout_states(state_dict: dict, layouts: list[str]) -> tuple[dict, list[tuple[Tensor, Tensor | None]]]:
    """The state dict with every state tensor of param i (except `step`) in layouts[i]; and the
    (view, buffer) pairs made, to check later that nothing outside a view was written."""
    state_dict = copy.deepcopy(state_dict)
    made = []
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if key != "step" and isinstance(value, Tensor):
                state[key], base = laid_out(value, layouts[index])
                made.append((state[key], base))
    return state_dict, made


# -- 1. layouts -------------------------------------------------------------------------------------

# (shape, param layout, grad layout) in one group: dense permuted layouts where param and grad agree
# (the fast kernel), and every mismatch or non-dense view (the reference path), side by side.
LAYOUT_PARAMS = [
    ((5, 7), "transposed", "transposed"),
    ((5, 7), "transposed", "contiguous"),
    ((5, 7), "contiguous", "transposed"),
    ((6, 5), "sliced", "contiguous"),
    ((6, 5), "contiguous", "sliced"),
    ((4, 3, 3, 3), "channels_last", "channels_last"),
    ((4, 3, 3, 3), "channels_last", "contiguous"),
    ((8, 3, 1, 1), "channels_last", "channels_last"),  # 1x1 conv: strides differ only on size-1 dims
    ((33,), "offset", "offset"),
    ((2, 3), "offset", "sliced"),
]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_layouts_update_in_place_as_torch(case, device, backend):
    """Non-contiguous, channels_last and misaligned params, with grads of the same or other strides:
    torch's result, written into the param's own storage, and nothing outside a view touched."""
    name, kwargs = case
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=gen).to(device) for shape, _, _ in LAYOUT_PARAMS]
    runs = {}
    for impl in ("torch", "resfast"):
        laid = [laid_out(v, layout) for v, (_, layout, _) in zip(values, LAYOUT_PARAMS, strict=True)]
        params = [p for p, _ in laid]
        addresses = [p.data_ptr() for p in params]
        opt = _optimizer(impl, name, params, kwargs, backend)
        for step in range(3):
            grads = torch.Generator().manual_seed(100 + step)
            for p, (shape, _, grad_layout) in zip(params, LAYOUT_PARAMS, strict=True):
                p.grad = laid_out(torch.randn(shape, generator=grads).to(device), grad_layout)[0]
            opt.step()
        assert [p.data_ptr() for p in params] == addresses
        assert all(untouched_outside(p, base) for p, base in laid)
        runs[impl] = (opt, params)
    assert_states_match_torch(*runs["torch"], *runs["resfast"])
    assert not any(torch.equal(p, v) for p, v in zip(runs["resfast"][1], values, strict=True))


# (param shape, layout of all its state tensors in the loaded checkpoint): "offset" keeps the param's
# strides (fast kernel, misaligned start); the others do not (reference path).
STATE_LAYOUTS = [
    ((6, 5), "transposed"),
    ((6, 5), "sliced"),
    ((6, 5), "offset"),
    ((33,), "offset"),
    ((4, 3, 3, 3), "channels_last"),
    ((1,), "sliced"),
]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_non_contiguous_and_misaligned_states_from_a_checkpoint(case, device, backend):
    name, kwargs = case
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen).to(device) for shape, _ in STATE_LAYOUTS]
    source = _optimizer("torch", name, start, kwargs, backend)
    for _ in range(2):
        for p in start:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        source.step()
    saved = _roundtrip(source.state_dict())
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in start] for _ in range(2)]

    runs = {}
    for impl in ("torch", "resfast"):
        params = [p.detach().clone() for p in start]
        opt = _optimizer(impl, name, params, kwargs, backend)
        loaded, views = _relayout_states(saved, [layout for _, layout in STATE_LAYOUTS])
        opt.load_state_dict(loaded)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        assert all(untouched_outside(view, base) for view, base in views)
        runs[impl] = (opt, params)
    assert_states_match_torch(*runs["torch"], *runs["resfast"])


# -- 2. sizes ---------------------------------------------------------------------------------------

# 0 and 1 element, odd sizes, and one off the chunk sizes of the backends (Triton's 1024 elements a
# program, CUDA's 4096 a block) and off every vector width (4 fp32 or 8 bf16 in 16 bytes).
SIZES = (0, 1, 2, 3, 5, 7, 9, 15, 17, 1023, 1025, 4097)
# (param, grad, state) layouts, taken in turn by the sizes: each of them misaligned (starting at
# element 1 of a buffer) while another is aligned, or misaligned alike.
OFFSETS = [
    ("offset", "offset", "contiguous"),
    ("contiguous", "offset", "offset"),
    ("offset", "contiguous", "offset"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_sizes_and_misaligned_offsets_match_reference(case, device, backend, dtype):
    """Against the reference backend on contiguous tensors: every size, with the param, the grad or the
    states (reloaded after the first step) starting at element 1 of a bigger buffer."""
    name, kwargs = case
    gen = torch.Generator().manual_seed(0)
    specs = [(n, OFFSETS[i % len(OFFSETS)]) for i, n in enumerate(SIZES)]
    values = [torch.randn(n, generator=gen).to(device, dtype) for n, _ in specs]
    grads = [[torch.randn(n, generator=gen).to(device, dtype) for n, _ in specs] for _ in range(2)]

    def trajectory(backend, misaligned):
        laid = [
            laid_out(v, lay[0] if misaligned else "contiguous")
            for v, (_, lay) in zip(values, specs, strict=True)
        ]
        params = [p for p, _ in laid]
        opt = _optimizer("resfast", name, params, kwargs, backend)
        views = []
        for step, step_grads in enumerate(grads):
            for p, g, (_, lay) in zip(params, step_grads, specs, strict=True):
                p.grad = laid_out(g, lay[1] if misaligned else "contiguous")[0]
            opt.step()
            if step == 0 and misaligned:
                loaded, views = _relayout_states(opt.state_dict(), [lay[2] for _, lay in specs])
                opt.load_state_dict(loaded)
        assert all(untouched_outside(v, base) for v, base in [*laid, *views])
        return opt, params

    expected, got = state_tensors(*trajectory("reference", False)), state_tensors(*trajectory(backend, True))
    assert [label for label, _ in got] == [label for label, _ in expected]
    for (label, want), (_, mine) in zip(expected, got, strict=True):
        torch.testing.assert_close(mine, want, rtol=0, atol=fast_backend_bound(want), msg=label)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_thousands_of_tiny_tensors_in_one_group(device, backend):
    """A thousand tensors of 1-3 elements, far past any per-launch tensor limit: one launch covers every
    one, each reading its own row. SGD with weight decay: the cheapest update under the Triton
    interpreter, which spends a few ms on each tensor."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(k % 3 + 1, generator=gen).to(device) for k in range(1000)]
    grads = [torch.randn(v.shape, generator=gen).to(device) for v in values]
    results = []
    for which in ("reference", backend):
        params = [v.clone() for v in values]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        resfast.optim.SGD(params, lr=0.1, weight_decay=0.1, backend=which).step()
        results.append(torch.cat(params))
    want, got = results
    torch.testing.assert_close(got, want, rtol=0, atol=fast_backend_bound(want))
    assert not torch.equal(got, torch.cat(values))


@pytest.mark.parametrize(("device", "backend"), [p for p in DEVICE_BACKENDS if p.values[1] == "triton"])
def test_triton_offsets_past_2_31_elements_do_not_wrap(device, backend, monkeypatch):
    """The kernels' element offsets and bounds are 64-bit: a work table whose chunk starts past 2^31
    elements, with each address moved back as far, must update exactly the tensor's own elements.
    (Nothing that large is allocated; a 32-bit offset would wrap and address other memory.)"""
    from resfast.kernels import triton_optim

    gen = torch.Generator().manual_seed(0)
    param, grad = (torch.randn(5, generator=gen).to(device) for _ in range(2))
    expected = param - grad * 0.5
    start = 2**31 + triton_optim.BLOCK
    shift = start * param.element_size()
    table = torch.tensor([[param.data_ptr() - shift, grad.data_ptr() - shift, start + 5]], device=device)
    rows = torch.tensor([[0, start]], device=device)
    monkeypatch.setattr(triton_optim, "_work_table", lambda tensor_lists, device: (rows, table))
    triton_optim.sgd(
        [param], [grad], [None], [False],
        lr=0.5, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
    )  # fmt: skip
    torch.testing.assert_close(param, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("device", "backend"),
    [p for p in DEVICE_BACKENDS if p.values in (("cuda", "triton"), ("cuda", "cuda"))],
)
def test_tensor_of_more_than_2_31_elements_matches_reference(device, backend):
    """One bf16 tensor of 2^31 + 12293 elements (Adam: 4 such tensors, 17 GiB): the windows at its
    start, across element 2^31 and at its end match the reference, and every element was updated."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    n = 2**31 + 3 * 4096 + 5
    gen = torch.Generator(device).manual_seed(0)
    param = torch.rand(n, generator=gen, device=device, dtype=torch.bfloat16)
    param.grad = torch.rand(n, generator=gen, device=device, dtype=torch.bfloat16).add_(0.5)  # never 0
    windows = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 4096, n)]
    reference = [param[w].clone() for w in windows]
    for r, w in zip(reference, windows, strict=True):
        r.grad = param.grad[w].clone()
    opt = resfast.optim.Adam([param], lr=0.01, backend=backend)
    ref_opt = resfast.optim.Adam(reference, lr=0.01, backend="reference")
    opt.step()
    ref_opt.step()
    for r, w in zip(reference, windows, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            want = ref_opt.state[r][key]
            torch.testing.assert_close(opt.state[param][key][w], want, rtol=0, atol=fast_backend_bound(want))
        torch.testing.assert_close(param[w], r, rtol=0, atol=fast_backend_bound(r))
    assert int((opt.state[param]["exp_avg"] == 0).sum()) == 0


# -- 3. values --------------------------------------------------------------------------------------

# Cases where torch.lerp takes its other form (weight = 1 - beta1 or 1 - alpha >= 0.5), which keeps an
# infinite moment infinite where the small-weight form makes it NaN.
LERP_CASES = [
    ("Adam", {"betas": (0.5, 0.9)}),
    ("Adam", {"betas": (0.3, 0.9), "amsgrad": True}),
    ("AdamW", {"betas": (0.0, 0.9)}),
    ("RMSprop", {"centered": True, "alpha": 0.3}),
]


def _case_device_backend_params(cases: list[tuple[str, dict]]) -> list:
    out = []
    for case in cases:
        for param in DEVICE_BACKENDS:
            device, backend = param.values
            out.append(
                pytest.param(case, device, backend, marks=param.marks, id=f"{case_id(case)}-{param.id}")
            )
    return out


NAN, INF = float("nan"), float("inf")
# NaN and inf arithmetic is the point here; numpy (under the Triton interpreter) warns about it.
non_finite_warnings = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _non_finite_trajectory(impl: str, name: str, kwargs: dict, device: str, backend: str) -> list:
    """The params and states after each of 3 steps, starting from params holding NaN, inf and -inf; after
    the first step each state gets inf, -inf and NaN at positions of its own (so that one state's NaN
    does not hide what another does with its inf); the second step's grad holds NaN and inf. Compared
    step by step: a NaN that spreads later through weight decay would hide an earlier difference."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 3, generator=gen).to(device), torch.randn(33, generator=gen).to(device)]
    for p in params:
        p.view(-1)[:3] = torch.tensor([NAN, INF, -INF])
    opt = _optimizer(impl, name, params, kwargs, backend)
    snapshots = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
            if step == 1:
                p.grad.view(-1)[16:18] = torch.tensor([NAN, INF])
        opt.step()
        if step == 0:
            for p in params:
                keys = sorted(k for k in opt.state[p] if k != "step")
                for j, key in enumerate(keys):
                    opt.state[p][key].view(-1)[4 + 3 * j : 7 + 3 * j] = torch.tensor([INF, -INF, NAN])
        snapshots.append([(f"step {step}: {label}", t.clone()) for label, t in state_tensors(opt, params)])
    return snapshots


def _assert_trajectories_match(theirs: list, ours: list) -> None:
    for expected, got in zip(theirs, ours, strict=True):
        assert [label for label, _ in got] == [label for label, _ in expected]
        for (label, want), (_, mine) in zip(expected, got, strict=True):
            assert_state_matches_torch(mine, want, label)


@non_finite_warnings
@pytest.mark.parametrize(("case", "device", "backend"), _case_device_backend_params(CASES))
def test_nan_and_inf_in_params_and_states_propagate_as_in_torch(case, device, backend):
    name, kwargs = case
    theirs = _non_finite_trajectory("torch", name, kwargs, device, backend)
    _assert_trajectories_match(theirs, _non_finite_trajectory("resfast", name, kwargs, device, backend))


@non_finite_warnings
@pytest.mark.parametrize(("case", "device", "backend"), _case_device_backend_params(LERP_CASES))
def test_lerp_weight_of_half_or_more_keeps_infinite_moments_as_torch(case, device, backend):
    """Regression: the Triton kernels lerped exp_avg (Adam) and grad_avg (centered RMSprop) with the
    small-weight form whatever the weight, turning torch's inf into NaN when beta1 or alpha <= 0.5."""
    name, kwargs = case
    theirs = _non_finite_trajectory("torch", name, kwargs, device, backend)
    _assert_trajectories_match(theirs, _non_finite_trajectory("resfast", name, kwargs, device, backend))


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_bitwise_reproducible_run_to_run(case, device, backend):
    """Two runs from the same inputs (fp32, bf16 and fp16 buckets; empty, small and, in fp32,
    multi-chunk tensors) agree bit for bit; the second one also reuses the cached work tables."""
    name, kwargs = case
    runs = []
    for _ in range(2):
        params = [
            *make_params(torch.float32, device)[:6],
            *make_params(torch.bfloat16, device)[:5],
            *make_params(torch.float16, device)[:5],
        ]
        opt = _optimizer("resfast", name, params, kwargs, backend)
        for step in range(2):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device, p.dtype)
            opt.step()
        runs.append(state_tensors(opt, params))
    for (label, a), (_, b) in zip(*runs, strict=True):
        assert torch.equal(a, b), label


def _scaled_step(opt, params, scaler, poison: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = sum((torch.randn(p.shape, generator=gen).to(p.device) * p.float()).sum() for p in params)
    opt.zero_grad()
    scaler.scale(loss).backward()
    if poison:
        grad = params[-1].grad
        grad[(0,) * grad.dim()] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_inf_grad_under_grad_scaler_leaves_every_layout_and_dtype_bit_identical(case, device, backend):
    """tests/test_optim_amp.py checks contiguous fp32 params; here fp32, fp16 and (on the CPU) bf16
    params in dense permuted, misaligned and sliced layouts (fast kernel and reference path in one
    step). Not bf16 on CUDA: torch's CUDA unscale kernel, which GradScaler runs on the grads before
    any optimizer sees them, has no bf16 (GradScaler exists for fp16)."""
    name, kwargs = case
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cpu" else ())
    laid = [
        laid_out(torch.randn(6, 5, generator=gen).to(device, dtype), layout)
        for dtype in dtypes
        for layout in ("transposed", "offset", "sliced")
    ]
    params = [p.requires_grad_() for p, _ in laid]
    opt = _optimizer("resfast", name, params, kwargs, backend)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    _scaled_step(opt, params, scaler, poison=False, seed=1)
    before = [(label, t.clone()) for label, t in state_tensors(opt, params)]
    _scaled_step(opt, params, scaler, poison=True, seed=2)
    assert scaler.get_scale() == 512.0  # the scaler saw the inf
    after = state_tensors(opt, params)
    assert [label for label, _ in after] == [label for label, _ in before]
    for (label, a), (_, b) in zip(before, after, strict=True):
        assert torch.equal(a, b), label
    assert all(untouched_outside(p, base) for p, base in laid)


# -- 4. checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(
    ("saved", "loaded"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str
)
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_checkpoint_of_another_dtype_or_device_is_cast_as_torch_casts(case, saved, loaded, device, backend):
    """A CPU checkpoint of one dtype loads as torch loads it: states cast to the param's dtype and
    device, `step` left as saved (a float32 CPU tensor); resfast moves `step` beside the param at its
    first step, and then follows the reference backend loaded the same way."""
    name, kwargs = case
    source_params = make_params(saved)[:5]
    source = build(name, "resfast", source_params, kwargs, "reference")
    run(source, source_params, steps=2)
    saved_dict = _roundtrip(source.state_dict())

    def load(impl, which):
        params = [p.detach().to(device, loaded) for p in source_params]
        opt = build(name, impl, params, kwargs, which)
        # A copy each: torch keeps the loaded `step` tensors themselves, which would couple the three.
        opt.load_state_dict(copy.deepcopy(saved_dict))
        return opt, params

    theirs, ours, reference = load("torch", None), load("resfast", backend), load("resfast", "reference")
    expected, got = state_tensors(*theirs), state_tensors(*ours)
    assert [label for label, _ in got] == [label for label, _ in expected]
    for (label, want), (_, mine) in zip(expected, got, strict=True):
        assert (mine.dtype, mine.device) == (want.dtype, want.device), label
        assert torch.equal(mine, want), label

    run(ours[0], ours[1], steps=2, first=2)
    run(reference[0], reference[1], steps=2, first=2)
    for (label, want), (_, mine) in zip(state_tensors(*reference), state_tensors(*ours), strict=True):
        if label.endswith(".step"):
            assert mine.device == ours[1][0].device and mine.item() == want.item(), label
        else:
            assert (mine.dtype, mine.device.type) == (loaded, device), label
            torch.testing.assert_close(mine, want, rtol=0, atol=fast_backend_bound(want), msg=label)


def _first_state_key(state: dict) -> str:
    return sorted(k for k in state if k != "step")[0]


def _replace_first_state(shape):
    def corrupt(state):
        state[_first_state_key(state)] = torch.zeros(shape)

    return corrupt


def _delete(key_of):
    def corrupt(state):
        del state[key_of(state)]

    return corrupt


def _set_step(state):
    state["step"] = torch.tensor([2.0, 2.0])


# name -> (what it does to the state dict, given the saved state of the (7, 3) param; the error; its
# message, {index} being that param's index; whether it applies only to optimizers that count steps).
# torch loads the first five without a word and fails (or, for a broadcastable shape, runs) at the
# step, after updating the params before the bad one; it raises on the last three before changing
# anything, and resfast must too.
CORRUPTIONS = {
    "state-of-another-shape": (
        _replace_first_state((6, 3)),
        ValueError,
        r"parameter {index} .*shape \(6, 3\)",
        False,
    ),
    "state-of-one-element": (
        _replace_first_state((1,)),
        ValueError,
        r"parameter {index} .*shape \(1,\)",
        False,
    ),
    "missing-state-key": (
        _delete(_first_state_key),
        ValueError,
        r"parameter {index} .* lacks \['\w+'\]",
        True,
    ),
    "missing-step": (
        _delete(lambda state: "step"),
        ValueError,
        r"parameter {index} .* lacks \['step'\]",
        True,
    ),
    "step-not-0-d": (_set_step, ValueError, r"parameter {index} .*'step' must be a 0-d tensor", True),
    "fewer-params": (lambda sd: sd["param_groups"][0]["params"].pop(), ValueError, "size", False),
    "more-groups": (
        lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])),
        ValueError,
        "groups",
        False,
    ),
    "no-state": (lambda sd: sd.pop("state"), KeyError, "state", False),
}
WHOLE_DICT = ("fewer-params", "more-groups", "no-state")


def _snapshot(opt) -> tuple[list, dict]:
    """Everything a load could change: each group's options and param objects, each state's objects
    and values."""
    groups = [
        ({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
        for g in opt.param_groups
    ]
    state = {
        id(p): {k: (id(v), v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    return groups, state


def _assert_unchanged(opt, before: tuple[list, dict]) -> None:
    groups, state = _snapshot(opt)
    assert groups == before[0]
    assert {p: s.keys() for p, s in state.items()} == {p: s.keys() for p, s in before[1].items()}
    for p, entries in before[1].items():
        for key, (obj, value) in entries.items():
            now_obj, now_value = state[p][key]
            assert now_obj == obj and torch.equal(torch.as_tensor(now_value), torch.as_tensor(value)), key


def _bad_state_dict_params() -> list:
    """Every corruption on the reference backend (the checks run at load, whatever the backend); the
    one that used to reach the fused kernels (a state of another shape) on every backend."""
    reference = next(p for p in DEVICE_BACKENDS if p.values == ("cpu", "reference"))
    out = []
    for case in RICH:
        for corruption, (*_, needs_step) in CORRUPTIONS.items():
            if needs_step and case[0] == "SGD":
                continue  # SGD keeps no step, and torch starts a missing buffer afresh (tested below)
            for param in DEVICE_BACKENDS if corruption == "state-of-another-shape" else [reference]:
                ident = f"{case_id(case)}-{corruption}-{param.id}"
                out.append(pytest.param(case, corruption, *param.values, marks=param.marks, id=ident))
    return out


@pytest.mark.parametrize(("case", "corruption", "device", "backend"), _bad_state_dict_params())
def test_bad_state_dict_raises_before_anything_changes(case, corruption, device, backend):
    """Regression (shape): a state of another shape loaded silently, and the fused kernels then read and
    wrote past its end. Regression (missing step): torch's __setstate__ raised only after replacing the
    state, leaving the optimizer half-loaded. Now: a clear error, the optimizer as it was, and it goes
    on exactly like a twin that never saw the bad checkpoint."""
    name, kwargs = case
    corrupt, error, pattern, _ = CORRUPTIONS[corruption]
    params, twin_params = make_params(torch.float32, device)[:5], make_params(torch.float32, device)[:5]
    opt, twin = (
        build(name, "resfast", params, kwargs, backend),
        build(name, "resfast", twin_params, kwargs, backend),
    )
    run(opt, params, steps=1)
    run(twin, twin_params, steps=1)
    order = [p for group in opt.param_groups for p in group["params"]]
    index = next(i for i, p in enumerate(order) if p.shape == (7, 3))
    bad = copy.deepcopy(opt.state_dict())
    corrupt(bad if corruption in WHOLE_DICT else bad["state"][index])
    before = _snapshot(opt)
    with pytest.raises(error, match=pattern.format(index=index)):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, before)
    run(opt, params, steps=2, first=1)
    run(twin, twin_params, steps=2, first=1)
    for (label, a), (_, b) in zip(state_tensors(opt, params), state_tensors(twin, twin_params), strict=True):
        assert torch.equal(a, b), label


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_sgd_momentum_buffer_missing_or_none_starts_from_the_grad_as_torch(device, backend):
    """Regression: a loaded momentum_buffer of None (torch 1.x saved one for every param) crashed the
    step with an AttributeError; torch starts such a buffer, like a missing one, from the next grad."""
    start = make_params(torch.float32, device)
    source = build("SGD", "torch", start, {"lr": 0.1, "momentum": 0.9}, None)
    run(source, start, steps=2)
    saved = copy.deepcopy(source.state_dict())
    saved["state"][2]["momentum_buffer"] = None
    del saved["state"][3]["momentum_buffer"]
    runs = {}
    for impl in ("torch", "resfast"):
        params = [p.detach().clone() for p in start]
        opt = build("SGD", impl, params, {"lr": 0.1, "momentum": 0.9}, backend)
        opt.load_state_dict(copy.deepcopy(saved))
        run(opt, params, steps=2, first=2)
        runs[impl] = (opt, params)
    assert_states_match_torch(*runs["torch"], *runs["resfast"])


def test_fast_layout_refuses_tensors_of_another_shape_or_device():
    """Regression: equal strides (or a state of one element) were enough for the fused kernels, which
    then walked the param's element count through a smaller state."""
    p = torch.zeros(4, 3)
    assert fast_layout(p, [torch.zeros(4, 3), torch.ones(4, 3)])
    assert not fast_layout(p, [torch.zeros(2, 3)])  # same strides, half the elements
    assert not fast_layout(p, [torch.zeros(5, 3)])
    assert not fast_layout(p, [torch.zeros(1)])  # one element: its strides say nothing
    assert not fast_layout(p, [torch.zeros(4, 3, device="meta")])
    assert fast_layout(torch.zeros(1, 1), [torch.zeros(1, 1)[:, :1]])  # 1 element, any strides


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Adam"])
def test_state_of_another_shape_set_directly_fails_the_step_as_torch(name, device, backend):
    """A state replaced by hand (no load to check it) goes to the reference path and fails as torch's
    step fails, instead of a kernel running past the state's end."""
    for module in (torch.optim, resfast.optim):
        p = torch.zeros(4, 3, device=device)
        p.grad = torch.ones(4, 3, device=device)
        opt = getattr(module, name)([p], **({"backend": backend} if module is resfast.optim else {}))
        opt.step()
        key = _first_state_key(opt.state[p])
        opt.state[p][key] = torch.zeros(2, 3, device=device)
        with pytest.raises(RuntimeError, match="size"):
            opt.step()
