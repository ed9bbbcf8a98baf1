"""The CUDA optimizer kernel's logic, checked on the CPU.

csrc/multi_tensor_update.h is the body of the CUDA kernel; the extension also compiles it for the
host as the ops torch.ops.resfast_cuda_on_host.* (every block and thread in turn). Routing the `cpu`
backend's optimizer ops there runs resfast's optimizers through the GPU's work table, chunk lookup,
coefficient rows and 16-byte-vector / scalar-tail split, against the reference backend; for LARS also
its norm pass (a row of sums per chunk, each block's threads added in the GPU's order) and every
block's sum of its tensor's rows. The native CPU driver shares the table and lookup
(csrc/work_table.h), so these tests also run on it.

Regression (issue found by reading csrc/cuda/optim.cu): the table skips empty tensors, and the kernel
read its coefficient row at the table row's position instead of the tensor's index, so every tensor
after an empty one got its neighbour's lr scale, bias corrections and SGD `fresh` flag.
"""

from __future__ import annotations

import pytest
import torch

import resfast.optim
from resfast import backends
from tests.optim_cases import CASES, DTYPES, OPTIMIZERS, case_id
from tests.optim_helpers import (
    SHAPES,
    fast_backend_bound,
    laid_out,
    make_grads,
    make_params,
    state_tensors,
    untouched_outside,
)

try:
    backends.choose(torch.device("cpu"), torch.float32, "cpu")
    NATIVE = None
except backends.BackendUnavailable as e:
    NATIVE = str(e)
pytestmark = pytest.mark.skipif(NATIVE is not None, reason=f"needs the native extension: {NATIVE}")

OPTIM_OPS = ("sgd_", "rmsprop_", "adagrad_", "adam_", "lars_")


class _OpsOnHost:
    """torch.ops.resfast, with the optimizer ops replaced by the CUDA kernel body run on the host;
    `calls` counts the optimizer ops run."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):
        if name not in OPTIM_OPS:
            return getattr(torch.ops.resfast, name)
        op = getattr(torch.ops.resfast_cuda_on_host, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)

        return counted


def _prepared_on_host(ops: _OpsOnHost) -> type:
    """resfast._C.PreparedUpdate (what resfast.kernels.cext runs for a kept call, which every eager
    step's call is) with its op taken from `ops`: the C++ class would dispatch to torch.ops.resfast."""

    class PreparedOnHost:
        def __init__(self, op: str, params: list, states: list) -> None:
            self.op, self.params, self.states = f"{op}_", list(params), states
            self.addresses, self.loaded = [p.data_ptr() for p in params], None

        def load(self, group_params: list) -> bool:
            # The native load's rule, through resfast.optim._layout.grads_fit (the Python twin).
            from resfast.optim._layout import grads_fit

            grads = [p.grad for p in group_params]
            fits = (
                len(group_params) == len(self.params)
                and all(a is b for a, b in zip(group_params, self.params, strict=True))
                and None not in grads
                and grads_fit(self.params, grads, self.addresses, layout=True)
            )
            self.loaded = grads if fits else None
            return fits

        def watch(self, state_values: list, dicts: list, keys: list, tensors: list) -> None:
            self.watched = (state_values, dicts, keys, tensors)

        def holds(self, state: dict) -> bool:
            # The native rule: the same per-param dicts in order, each holding the same tensor objects.
            state_values, dicts, keys, tensors = self.watched
            values = list(state.values())
            return (
                len(values) == len(state_values)
                and all(a is b for a, b in zip(values, state_values, strict=True))
                and all(d.get(k) is t for d, k, t in zip(dicts, keys, tensors, strict=True))
            )

        def unload(self) -> None:
            self.loaded = None

        def run(self, grads, coef, grad_scale, found_inf, grad_clip=None, **options) -> None:
            if grads is None:
                grads, self.loaded = self.loaded, None
            getattr(ops, self.op)(
                self.params, grads, *self.states, coef, grad_scale, found_inf, **options, grad_clip=grad_clip
            )

    return PreparedOnHost


@pytest.fixture(params=["cuda-kernel-on-host", "cpu"])
def native(request, monkeypatch) -> str:
    """The `cpu` backend as it is, or with its ops running the CUDA kernel body (checked to have run)."""
    if request.param == "cpu":
        yield "cpu"
        return
    import resfast._C

    from resfast.kernels import cext

    try:  # the host build reproduces the GPU's fused multiply-adds: it needs a CPU with FMA
        no_tensors = [], [], [], torch.empty(0, 5), None, None
        torch.ops.resfast_cuda_on_host.sgd_(*no_tensors, False, False, False)
    except RuntimeError as e:
        pytest.skip(str(e))
    ops = _OpsOnHost()
    monkeypatch.setattr(cext, "_ops", ops)
    monkeypatch.setattr(resfast._C, "PreparedUpdate", _prepared_on_host(ops))
    yield "cpu"
    assert ops.calls > 0, "no optimizer op ran on the host: the test ran the CPU kernels instead"


def _step_grads(params: list[torch.Tensor], step: int) -> list:
    """tests/optim_helpers.make_grads's grads (None on some steps) for its SHAPES, else random float64
    ones of each param's shape."""
    if [tuple(p.shape) for p in params] == SHAPES:
        return make_grads(step, len(params))
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def _trajectory(name: str, kwargs: dict, backend: str, params: list[torch.Tensor], steps: int = 3) -> list:
    """Every param and state after each step; grads as tests/optim_helpers.make_grads draws them for
    its SHAPES (None on some steps), or of each param's shape when `params` are not those."""
    opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs)
    snapshots = []
    for step in range(steps):
        grads = _step_grads(params, step)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
        snapshots.append([(label, t.clone()) for label, t in state_tensors(opt, params)])
    return snapshots


def _assert_matches_reference(got: list, want: list) -> None:
    """Step by step, within fast_backend_bound of the largest magnitude each tensor has reached so far
    (a momentum buffer that shrinks keeps the rounding error of its larger past values)."""
    reached: dict[str, float] = {}
    for step, (mine_now, want_now) in enumerate(zip(got, want, strict=True)):
        assert [label for label, _ in mine_now] == [label for label, _ in want_now]
        for (label, mine), (_, expected) in zip(mine_now, want_now, strict=True):
            size = expected.abs().max().item() if expected.numel() else 0.0
            reached[label] = max(reached.get(label, 0.0), size)
            bound = fast_backend_bound(expected, reached[label])
            torch.testing.assert_close(
                mine,
                expected,
                rtol=0,
                atol=bound,
                msg=lambda m, label=label, step=step: f"step {step}, {label}: {m}",
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_kernel_body_matches_reference(native, case, dtype):
    """tests/optim_helpers.SHAPES: an empty tensor first, 1-element, odd sizes, a tensor of two CUDA
    chunks (4100 > 4096), and grads that are None on some steps, so step counts differ per tensor."""
    name, kwargs = case
    want = _trajectory(name, kwargs, "reference", make_params(dtype))
    _assert_matches_reference(_trajectory(name, kwargs, native, make_params(dtype)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_clip_factor_in_the_kernel_body(native, name, dtype):
    """max_grad_norm's factor (3.0 clips every step of these grads) multiplies the grad in the kernel body."""
    kwargs = {"max_grad_norm": 3.0, "weight_decay": 0.1, "maximize": True}
    want = _trajectory(name, kwargs, "reference", make_params(dtype))
    _assert_matches_reference(_trajectory(name, kwargs, native, make_params(dtype)), want)


def _staggered_steps(name: str, backend: str, scaler_skips_first: bool) -> list:
    """An empty tensor between tensors whose step counts differ: `late` gets its first grad one step
    after the others. With scaler_skips_first, the first step is skipped as GradScaler skips it
    (found_inf = 1): SGD must then still start its momentum buffers fresh on the next step."""
    gen = torch.Generator().manual_seed(0)
    early, empty, late, big = (torch.randn(n, generator=gen) for n in (5, 0, 7, 4100))
    params = [early, empty, late, big]
    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}, "RMSprop": {"centered": True},
              "Adagrad": {"lr_decay": 0.3}, "Adam": {"lr": 0.1}, "AdamW": {"lr": 0.1}}[name]  # fmt: skip
    opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs)
    snapshots = []
    for step in range(4):
        for p in params:
            p.grad = None if (p is late and step == 0) else torch.randn(p.shape, generator=gen)
        skip = scaler_skips_first and step == 0
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(float(skip))  # as GradScaler sets
        opt.step()
        snapshots.append([(label, t.clone()) for label, t in state_tensors(opt, params)])
    return snapshots


@pytest.mark.parametrize("scaler_skips_first", [False, True], ids=["plain", "first-step-skipped"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_empty_tensor_between_tensors_of_different_step_counts(native, name, scaler_skips_first):
    want = _staggered_steps(name, "reference", scaler_skips_first)
    _assert_matches_reference(_staggered_steps(name, native, scaler_skips_first), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_vector_and_tail_split_on_aligned_and_misaligned_tensors(native, layout, dtype):
    """Sizes around the 16-byte vector width (4 fp32, 8 bf16/fp16 elements) and the 4096-element chunk,
    contiguous (vector path, then a scalar tail) and starting at element 1 of a buffer (scalar path
    only); nothing outside a view is written."""
    sizes = (1, 3, 4, 5, 8, 9, 15, 17, 4095, 4096, 4097, 8200)
    values = make_params(dtype)[:1] + [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
    results = {}
    for backend in ("reference", native):
        laid = [laid_out(v, layout) for v in values]
        params = [p for p, _ in laid]
        results[backend] = _trajectory("Adam", {"amsgrad": True, "weight_decay": 0.1}, backend, params)
        assert all(base is None or int((base == 96.0).sum()) == base.numel() - p.numel() for p, base in laid)
    _assert_matches_reference(results[native], results["reference"])


# -- LARS: the norm pass, then the update -----------------------------------------------------------

# (optimizer kwargs, second param group's options): each option, and a group without adaptation (one
# launch, no norm pass) beside an adapted one. lr and trust_coefficient large enough that a step moves
# the params by ~10% (smaller updates would round away in bf16 and prove nothing).
LARS_CASES = [
    ({}, {}),
    ({"weight_decay": 0.05, "nesterov": True}, {}),
    ({"maximize": True, "momentum": 0.5}, {}),
    ({"momentum": 0.0, "eps": 0.1}, {}),
    ({"weight_decay": 0.05}, {"lars_adaptation": False, "weight_decay": 0.0, "lr": 0.3}),
]
ZERO_PARAM, ZERO_GRAD = 3, 2  # indices into SHAPES: an all-zero param; a zero grad on step 1 (trust 1)


def _lars_trajectory(kwargs: dict, second: dict, backend: str, params: list[torch.Tensor], steps: int = 3):
    """Every param and momentum buffer after each step; tests/optim_helpers.make_grads's grads (None on
    some steps) for its SHAPES, else random ones of each param's shape; zero for ZERO_GRAD on step 1."""
    groups = [{"params": params[::2]}, {"params": params[1::2], **second}]
    opt = resfast.optim.LARS(groups, **{"lr": 4.0, "trust_coefficient": 0.02, **kwargs}, backend=backend)
    snapshots = []
    for step in range(steps):
        grads = _step_grads(params, step)
        if step == 1 and grads[ZERO_GRAD] is not None:
            grads[ZERO_GRAD] = torch.zeros_like(grads[ZERO_GRAD])
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
        snapshots.append([(label, t.clone()) for label, t in state_tensors(opt, params)])
    return snapshots


def _lars_params(dtype: torch.dtype) -> list[torch.Tensor]:
    params = make_params(dtype)
    params[ZERO_PARAM].zero_()
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kwargs", "second"), LARS_CASES, ids=[str(c) for c in LARS_CASES])
def test_lars_cuda_kernel_body_matches_reference(native, kwargs, second, dtype):
    """SHAPES (an empty tensor first, 1-element, odd sizes, two CUDA chunks) with an all-zero param and
    a zero grad (trust 1 for both), grads None on some steps."""
    want = _lars_trajectory(kwargs, second, "reference", _lars_params(dtype))
    got = _lars_trajectory(kwargs, second, native, _lars_params(dtype))
    _assert_matches_reference(got, want)
    # The zero param moved by the plain lr (trust 1), so it is no longer zero; nothing is NaN.
    final = dict(got[-1])
    assert final[f"param{ZERO_PARAM}"].abs().sum() > 0
    assert not any(t.isnan().any() for _, t in got[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_lars_norms_and_update_over_vector_tails_chunks_and_misaligned_tensors(native, layout, dtype):
    """Sizes around the 16-byte vector width and the 4096-element chunk (a tensor of 3 chunks and one
    element sums 4 rows of the norm pass), contiguous (vectors, then a scalar tail) and starting at
    element 1 of a buffer (scalar path only); nothing outside a view is written."""
    sizes = (1, 3, 4, 5, 8, 9, 15, 17, 4095, 4096, 4097, 8200, 12289)
    values = make_params(dtype)[:1] + [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
    results = {}
    for backend in ("reference", native):
        laid = [laid_out(v, layout) for v in values]
        params = [p for p, _ in laid]
        results[backend] = _lars_trajectory({"weight_decay": 0.05, "nesterov": True}, {}, backend, params)
        assert all(untouched_outside(p, base) for p, base in laid)
    _assert_matches_reference(results[native], results["reference"])


def test_lars_skipped_step_and_grad_scale(native):
    """found_inf = 1 leaves params, grads and buffers bit-identical (on the first step, which only
    creates zero buffers, and on later ones); with found_inf = 0, grads scaled by 8 (exact) give the
    unscaled run's bits, and are written back unscaled."""
    shapes = [(0,), (5,), (4100,), (7, 3)]

    def snapshot(opt, params) -> list[torch.Tensor]:
        buffers = [opt.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in params]
        return [t.clone() for t in (*params, *(p.grad for p in params), *buffers)]

    def run(scaled: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen) for s in shapes]
        opt = resfast.optim.LARS(params, lr=2.0, trust_coefficient=0.05, weight_decay=0.01, backend=native)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for p, g in zip(params, grads, strict=True):
                p.grad = g * 8 if scaled else g
            if scaled:
                before = snapshot(opt, params)
                opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
                opt.step()
                assert all(torch.equal(a, b) for a, b in zip(before, snapshot(opt, params), strict=True))
                opt.found_inf = torch.tensor(0.0)
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
        return snapshot(opt, params)

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)
