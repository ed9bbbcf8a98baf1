"""The native kernels of the fused BatchNorm + add + ReLU (`resfast.kernels.native_bn`): the CPU
driver (csrc/cpu/bn.cpp) and the CUDA driver's logic run on the host (the host side and kernel bodies
of csrc/cuda/bn.cu, compiled for the CPU as torch.ops.resfast_cuda_on_host.native_bn_*; the same
kernels on a GPU: test_bn_cuda.py): against the specification (`reference_bn`) evaluated in float64,
over shapes x layouts x dtypes x train/eval x residual/none; the ops under opcheck and torch.compile;
the call count of a layer; refusals.

Tolerance (the rule of tests/test_bn_add_relu.py, `assert_close_to_float64`): each output's error
against the float64 specification is at most 2x the specification's own error when run in the
input's dtype (fp32 statistics, the same rounding points), plus a floor of two roundings of the
result's magnitude (the native kernels sum in another order, and (x - mean) * (invstd * weight)
rounds once more than the specification's ((x - mean) * invstd) * weight). Statistics are fp32
reductions of the same rounded inputs: within ~1e-6 of float64 (`assert_stats_close`).
Outputs are allocated NaN-filled (`poisoned_memory`), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import zlib
from itertools import product

import pytest
import torch
import torch.nn.functional as F

from resfast import backends
from resfast.kernels import reference_bn
from resfast.nn import BatchNormAddReLU, fuse_resnet
from resfast.nn.cifar import BasicBlock
from tests.bn_helpers import (
    NATIVE_DRIVERS,
    OFFSET_LAYOUTS,
    check_layer,
    layer_case_id,
    layer_inputs,
    make,
    native_kernels,
    poisoned_memory,  # noqa: F401 (fixture)
    run_layer,
    same_layout,
    values_per_channel,
)

ext, why = backends.native_extension()
pytestmark = [
    pytest.mark.skipif(ext is None, reason=f"native extension not built: {why}"),
    pytest.mark.usefixtures("poisoned_memory"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# C = 1; N = 1; H = W = 1; 2-D and 3-D; odd sizes whose runs and channel rows end in a partial SIMD
# vector (widths 8 and 16 fp32 values); the fewest values torch accepts in training (2); a 2-D batch
# of many channels; and shapes of more than one work item per channel (16384 values: csrc/bn_plan.h)
# with a partial last one, large enough to run on several threads. Channels-first shapes whose sample
# holds at most 16384 values run sample-major (items of whole samples, every channel, at least 4 items
# where the batch allows): (8, 40, 20, 20) and (5, 3, 64, 64) one sample per item, (37, 16, 8, 8) 10
# samples per item and a last item of 7;
# the larger ones (3, 5, 101, 70), (2, 40, 33, 17) and (2, 32, 160, 160) run one channel per item.
# Then for the CUDA driver's plan (csrc/bn_cuda_kernels.h): channels-first items of 16K values
# (spatial size a multiple of 8: 16-byte vectors; two chunks per channel); channels-last tiles of 32
# channels with a last tile overhanging C = 40; enough positions (51200) that a channels-last item
# takes two rounds per thread and the merging block's slices several chunks each; a 2-D batch whose
# channels fill whole vectors; C = 1 with one value per sample.
SHAPES = (
    (2, 1, 3, 3),
    (5, 4, 1, 1),
    (1, 3, 3, 5),
    (7, 3),
    (2, 3),
    (4, 3, 7),
    (3, 5, 7, 9),
    (4, 19, 5, 3),
    (6, 33),
    (3, 5, 101, 70),
    (2, 40, 33, 17),
    (5, 3, 64, 64),
    (8, 40, 20, 20),
    (2, 32, 160, 160),
    (37, 16, 8, 8),
    (64, 48),
    (7, 1),
)
# nchw and channels_last are read in place; sliced (every other channel) in place when the runs are
# spatial; cropped (spatial dims not flattenable) is copied first; the offset ones are read in place,
# by the CUDA driver with scalar accesses (not 16-byte aligned).
LAYOUTS = ("nchw", "channels_last", "sliced", "cropped", *OFFSET_LAYOUTS)
# The dense layouts every size runs in.
DENSE = ("nchw", "channels_last", *OFFSET_LAYOUTS)


def _layouts(shape: tuple[int, ...]) -> tuple[str, ...]:
    return LAYOUTS if len(shape) == 4 else tuple(layout for layout in LAYOUTS if layout != "cropped")


def _small(shape: tuple[int, ...]) -> bool:
    return values_per_channel(shape) * shape[1] < 50_000


CASES = [
    # every shape x layout, fp32, both modes, with and without a residual
    *(
        (shape, layout, torch.float32, training, residual)
        for shape in SHAPES
        for layout in _layouts(shape)
        for training, residual in product((True, False), (True, False))
        if _small(shape) or (residual and layout in DENSE)
    ),
    # the 16-bit dtypes on every shape in the two memory formats, aligned or not
    *(
        (shape, layout, dtype, training, True)
        for shape in SHAPES
        for layout in DENSE
        for dtype in DTYPES[1:]
        for training in (True, False)
    ),
]


def _native():
    return backends.kernel_module("batch_norm_add_relu", "cpu")


@pytest.fixture(params=NATIVE_DRIVERS)
def driver(request):
    """The kernel functions of each native driver (the CUDA one's logic running on the host)."""
    return native_kernels(request.param)


@pytest.mark.parametrize("case", CASES, ids=layer_case_id)
def test_matches_reference_in_float64(driver, case) -> None:
    shape, layout, dtype, training, residual = case
    seed = zlib.crc32(layer_case_id(case).encode())
    check_layer(driver, layer_inputs(shape, dtype, layout, residual, seed), training, dense=layout in DENSE)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_without_weight_bias_or_running_stats(driver, channels_last: bool) -> None:
    """Optional inputs absent: weight 1, bias 0, no running stats to update."""
    gen = torch.Generator().manual_seed(1)
    x = make((3, 6, 5, 7), torch.float32, "channels_last" if channels_last else "nchw", gen, offset=2.0)
    dy = torch.randn(x.shape, generator=gen)
    mean, var = driver.batch_stats(x, None, None, 0.1)
    y = driver.forward(x, None, None, None, mean, var, 1e-5)
    dx, dz, dw, db = driver.backward(dy, x, y, None, mean, var, 1e-5, True, True)
    x64 = x.double().requires_grad_()
    y64 = torch.relu(F.batch_norm(x64, None, None, training=True))
    (dx64,) = torch.autograd.grad(y64, [x64], dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        db.double(), torch.where(y64 > 0, dy.double(), 0).sum((0, 2, 3)), rtol=1e-5, atol=1e-5
    )
    assert dw.shape == (6,) and torch.equal(dz, torch.where(y > 0, dy, 0))


def test_backward_without_dx(driver) -> None:
    """need_dx=False returns None for dx and still every other gradient."""
    gen = torch.Generator().manual_seed(2)
    x = make((4, 3, 5, 5), torch.float32, "nchw", gen, offset=1.0)
    mean, var = driver.batch_stats(x, None, None, 0.1)
    y = driver.forward(x, None, None, None, mean, var, 1e-5)
    dy = torch.randn(x.shape, generator=gen)
    dx, dz, dw, db = driver.backward(dy, x, y, None, mean, var, 1e-5, True, False)
    ref = reference_bn.backward(dy, x, y, None, mean, var, 1e-5, True, False)
    assert dx is None and ref[0] is None
    for got, want in zip((dz, dw, db), ref[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count_kind", ["int", "per-channel tensor"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grad_input_with_given_sums(driver, layout: str, count_kind: str) -> None:
    """dx from sums over more values than x's own (synchronised statistics), as the reference."""
    gen = torch.Generator().manual_seed(3)
    x = make((4, 5, 3, 6), torch.float32, layout, gen, offset=1.0)
    dz = make((4, 5, 3, 6), torch.float32, layout, gen)
    w, mean, var = (
        torch.rand(5, generator=gen) + 0.5,
        torch.randn(5, generator=gen),
        torch.rand(5, generator=gen) + 1,
    )
    sums = torch.randn(5, generator=gen) * 10, torch.randn(5, generator=gen) * 10
    count = 300 if count_kind == "int" else torch.full((5,), 300.0)
    got = driver.grad_input(dz, x, w, mean, var, 1e-5, *sums, count)
    want = reference_bn.grad_input(dz.double(), x.double(), w.double(), mean.double(), var.double(), 1e-5,
                                   sums[0].double(), sums[1].double(), 300)  # fmt: skip
    assert got.stride() == x.stride()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_running_stats_of_any_dtype_and_stride(driver, layout: str, dtype: torch.dtype) -> None:
    """Running stats in the module's dtype (bf16 after model.to(bf16)), even strided views, are
    updated in place in fp32 and rounded once, as the reference does."""
    gen = torch.Generator().manual_seed(4)
    x = make((5, 3, 4, 4), torch.float32, layout, gen, offset=1.0)
    base = torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype)
    rm, rv = base[0][::2], base[1][::2]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    driver.batch_stats(x, rm, rv, 0.3)
    reference_bn.batch_stats(x, rm_ref, rv_ref, 0.3)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(base[0][1::2], torch.zeros(3, dtype=dtype)), "a write landed outside the view"


def test_one_value_per_channel_is_refused_as_torch_refuses_it(driver) -> None:
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError) as torch_error:
        F.batch_norm(x, None, None, training=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError) as ours:
        driver.batch_stats(x, rm, rv, 0.1)
    assert str(ours.value).splitlines()[0] == str(torch_error.value)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNormAddReLU(3, backend="cpu")(x)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda n, x: n.batch_stats(x.double(), None, None, 0.1), "float32, bfloat16 or float16, got Double"),
        (lambda n, x: n.batch_stats(x[0, 0, 0], None, None, 0.1), "at least 2 dims"),
        (
            lambda n, x: n.batch_stats(x, torch.zeros(4), torch.ones(4), 0.1),
            r"running_mean must have shape \(3,\)",
        ),
        (
            lambda n, x: n.forward(x, x[:1], None, None, torch.zeros(3), torch.ones(3), 1e-5),
            "residual has shape",
        ),
        (
            lambda n, x: n.forward(x, x.half(), None, None, torch.zeros(3), torch.ones(3), 1e-5),
            "residual has dtype",
        ),
        (
            lambda n, x: n.forward(x, None, torch.ones(2), None, torch.zeros(3), torch.ones(3), 1e-5),
            "weight must",
        ),
        (
            lambda n, x: n.backward(x.half(), x, x, None, torch.zeros(3), torch.ones(3), 1e-5, True, True),
            "dy has",
        ),
    ],
    ids=["float64", "rank", "running-shape", "residual-shape", "residual-dtype", "weight-shape", "dy-dtype"],
)
def test_ops_refuse_bad_inputs_with_clear_errors(driver, call, pattern: str) -> None:
    with pytest.raises(RuntimeError, match=pattern):
        call(driver, torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 19, 37), (2, 16, 40)], ids=["odd", "whole-vectors"])
def test_non_finite_values_in_the_vector_body_and_the_tail(driver, shape, layout: str, value: float) -> None:
    """A non-finite x in the first and in the last element of the data: each poisons exactly its own
    channel's statistics and outputs, as in torch. 19 channels of 37 spatial values: in either layout
    the first is in a full CPU SIMD vector and the last in a scalar tail (the CUDA driver reads them
    with scalar accesses); 16 channels of 40: 16-byte vectors of the CUDA driver in either layout."""
    x = make(shape, torch.float32, layout, torch.Generator().manual_seed(5))
    last = shape[1] - 1
    x[0, 0, 0] = value  # channels-last: vector lane 0; channels-first: vector lane 0 of run (0, 0)
    x[-1, -1, -1] = value  # the last channel (a tail lane when channels are innermost) and run's tail
    mean, var = driver.batch_stats(x, None, None, 0.1)
    ref_mean, ref_var = reference_bn.batch_stats(x, None, None, 0.1)
    assert torch.equal(mean.isfinite(), ref_mean.isfinite()) and torch.equal(var.isnan(), ref_var.isnan())
    y = driver.forward(x, None, None, None, mean, var, 1e-5)
    y_torch = torch.relu(F.batch_norm(x, None, None, training=True))
    assert torch.equal(y.isnan(), y_torch.isnan())
    assert y[:, [0, last]].isnan().all() and not y[:, 1:last].isnan().any()


# Both plans with several tasks per pass (csrc/cpu/bn.cpp: tasks of at least 4096 values), and a
# small sample-major layer split into 4 items for the threads (csrc/bn_plan.h: kMinItems).
@pytest.mark.parametrize(
    "shape",
    [(3, 5, 101, 70), (150, 16, 8, 8), (32, 64, 2, 2)],
    ids=["channel-items", "sample-major", "small-sample-major"],
)
def test_bitwise_reproducible_and_independent_of_threads(shape) -> None:
    """The per-channel merge order is fixed by the shape (csrc/bn_plan.h): one thread or all give
    the same bits."""
    gen = torch.Generator().manual_seed(6)
    C = shape[1]
    t = {
        "x": make(shape, torch.float32, "nchw", gen, 2.0),
        "residual": make(shape, torch.float32, "nchw", gen),
    }
    t |= {"weight": torch.rand(C, generator=gen), "bias": torch.randn(C, generator=gen)}
    t |= {
        "running_mean": torch.zeros(C),
        "running_var": torch.ones(C),
        "dy": torch.randn(shape, generator=gen),
    }
    threads = torch.get_num_threads()
    try:
        runs = [run_layer(_native(), t, True)]
        torch.set_num_threads(1)
        runs.append(run_layer(_native(), t, True))
    finally:
        torch.set_num_threads(threads)
    runs.append(run_layer(_native(), t, True))
    for name in runs[0]:
        for other in runs[1:]:
            assert torch.equal(runs[0][name], other[name]), name


# ---- the thin launch path ------------------------------------------------------------------------


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "none"])
def test_a_layer_is_two_native_calls_forward_and_one_backward(residual: bool) -> None:
    """Training forward: the statistics and the normalisation; backward: one call for both passes.
    Nothing else that touches data is dispatched (no casts, copies or per-call allocations outside the
    ops): only detach, a view without data (autograd's saved tensors, and x handed to the statistics),
    and nn.BatchNorm2d's own num_batches_tracked += 1."""
    m = BatchNormAddReLU(8, backend="cpu")
    x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last) if residual else None
    with _OpLog() as forward:
        y = m(x, r)
    dy = torch.randn_like(y)
    with _OpLog() as backward:
        y.backward(dy)
    natives = {"resfast.native_bn_stats_", "resfast.native_bn_forward", "resfast.native_bn_backward"}
    assert [op for op in forward.ops if op in natives] == [
        "resfast.native_bn_stats_",
        "resfast.native_bn_forward",
    ]
    assert [op for op in backward.ops if op in natives] == ["resfast.native_bn_backward"]
    assert set(forward.ops) - natives <= {"aten.detach", "aten.add_"}
    assert forward.ops.count("aten.add_") == 1
    assert set(backward.ops) - natives <= {"aten.detach"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_cpp_layer_gives_the_python_functions_outputs_and_gradients(training: bool, dtype) -> None:
    """The native backends' eager layer (csrc/bn_autograd.cpp: its autograd node in C++) against the
    Python autograd.Function on the same kernels, bit for bit: y, the running stats, and the gradient of
    every input that requires one (None for the others), over every combination of residual, weight and
    bias given or not and of which inputs require grad: the C++ node finds each input's gradient slot."""
    from resfast.kernels import native_bn
    from resfast.nn import functional

    gen = torch.Generator().manual_seed(7)
    shape = (4, 3, 5, 2)
    base = {
        "x": make(shape, dtype, "channels_last", gen, 1.0),
        "residual": make(shape, dtype, "nchw", gen),
        "weight": torch.rand(3, generator=gen) + 0.5,
        "bias": torch.randn(3, generator=gen).to(
            dtype
        ),  # another dtype than weight's: each grad keeps its own
        "dy": torch.randn(shape, generator=gen).to(dtype),
    }
    for given in product((True, False), repeat=3):
        optional = dict(zip(("residual", "weight", "bias"), given, strict=True))
        names = ["x"] + [k for k, on in optional.items() if on]
        for wanted in product((True, False), repeat=len(names)):
            needs = dict(zip(names, wanted, strict=True))
            runs = []
            for path in ("cpp", "python"):
                t = {k: base[k].detach().clone().requires_grad_(needs.get(k, False)) for k in names}
                rm, rv = torch.linspace(-1, 1, 3), torch.linspace(0.5, 2, 3)
                args = (t["x"], t.get("residual"), rm, rv, t.get("weight"), t.get("bias"))
                if path == "cpp":
                    y = native_bn.layer(*args, training, 0.1, 1e-5)
                else:
                    mean, var = native_bn.batch_stats(t["x"].detach(), rm, rv, 0.1) if training else (rm, rv)
                    y = functional._EagerBatchNormAddReLU.apply(
                        t["x"],
                        t.get("residual"),
                        t.get("weight"),
                        t.get("bias"),
                        mean,
                        var,
                        1e-5,
                        training,
                        "cpu",
                    )
                if y.requires_grad:
                    y.backward(base["dy"])
                runs.append({"y": y.detach(), "rm": rm, "rv": rv} | {f"d{k}": v.grad for k, v in t.items()})
            label = f"given {optional}, requires grad {needs}"
            cpp, python = runs
            assert cpp.keys() == python.keys(), label
            for key in cpp:
                if python[key] is None:
                    assert cpp[key] is None, f"{label}: {key}"
                else:
                    assert cpp[key].dtype == python[key].dtype and torch.equal(cpp[key], python[key]), (
                        f"{label}: {key}"
                    )
            assert all(python[f"d{k}"] is not None for k in names if needs[k]), label


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_the_module_runs_the_cpp_layer_eagerly(backend: str) -> None:
    """Eagerly, a fused layer on the native CPU kernels is the C++ autograd node (csrc/bn_autograd.cpp),
    not the Python Function the other backends use."""
    m = BatchNormAddReLU(8, backend=backend)
    y = m(torch.randn(4, 8, 3, 3, requires_grad=True), torch.randn(4, 8, 3, 3))
    assert "BnAddRelu" in y.grad_fn.name()


def test_auto_picks_the_native_kernels_on_the_cpu() -> None:
    implemented = backends.implementing("batch_norm_add_relu")
    for dtype in DTYPES:
        assert (
            backends.choose("cpu", dtype, "auto", implemented=implemented, op="batch_norm_add_relu") == "cpu"
        )
    # float64 is not a native dtype: the reference runs it.
    picked = backends.choose("cpu", torch.float64, "auto", implemented=implemented, op="batch_norm_add_relu")
    assert picked == "reference"


# ---- opcheck and torch.compile -------------------------------------------------------------------


def native_op_cases(layout: str = "channels_last", dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """Arguments of each native op (residual and dy in other layouts than x, so the outputs' strides
    must follow x's, as the fake implementations promise)."""
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 5, 6)
    x = make(shape, dtype, layout, gen, offset=3.0)
    residual, dy = make(shape, dtype, "nchw", gen), make(shape, dtype, "sliced", gen)
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    ops = torch.ops.resfast
    mean, var = ops.native_bn_stats_(x, None, None, 0.1)
    y = ops.native_bn_forward(x, residual, weight, bias, mean, var, 1e-5)
    return {
        "native_bn_stats_": (x, torch.zeros(3), torch.ones(3), 0.1),
        "native_bn_forward": (x, residual, weight, bias, mean, var, 1e-5),
        "native_bn_backward": (dy, x, y, weight, mean, var, 1e-5, True, True),
        "native_bn_backward (no dx, eval)": (dy, x, y, None, mean, var, 1e-5, False, False),
        "native_bn_grad_input": (y, x, weight, mean, var, 1e-5, mean * 3, var * 2, torch.tensor(120.0)),
    }


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "cropped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("namespace", ["resfast", "resfast_cuda_on_host"])
def test_opcheck_native_ops(namespace: str, layout: str, dtype: torch.dtype) -> None:
    """Schemas, fake implementations (shapes, dtypes, strides), the declared mutation of the running
    stats, and tracing under AOT autograd, by torch's own checks: the ops, and the CUDA driver's
    compiled for the host (which the CUDA ops share their schemas and fake implementations with)."""
    _native()  # registers the fake implementations
    for name, args in native_op_cases(layout, dtype).items():
        torch.library.opcheck(getattr(getattr(torch.ops, namespace), name.split()[0]).default, args)


def test_fused_block_compiles_fullgraph_on_the_cpu_backend() -> None:
    """A fused BasicBlock on the cpu backend under torch.compile(fullgraph=True) with Inductor: one
    graph holding resfast's ops, and the same outputs, gradients and running stats as eager."""
    torch.manual_seed(0)
    block = fuse_resnet(BasicBlock(8, 16, stride=2), backend="cpu")
    eager = fuse_resnet(BasicBlock(8, 16, stride=2), backend="cpu")
    eager.load_state_dict(block.state_dict())
    called: set[str] = set()

    def recording(gm: torch.fx.GraphModule, example_inputs: list):
        called.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    compiled = torch.compile(block, fullgraph=True, backend=recording)
    x = torch.randn(4, 8, 8, 8)
    out, out_eager = compiled(x), eager(x)
    out.square().mean().backward()
    out_eager.square().mean().backward()
    torch.testing.assert_close(out, out_eager, rtol=1e-4, atol=1e-4)
    for (name, p), p_eager in zip(block.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b), b_eager in zip(block.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, b_eager, rtol=1e-4, atol=1e-4, msg=name)
    assert {"resfast.bn_stats.default", "resfast.bn_add_relu_fwd.default"} <= called


def test_native_ops_trace_directly_under_compile() -> None:
    """The native ops themselves, called from compiled code, trace through their fake
    implementations (fullgraph: no graph break) and give the eager results."""
    nat = _native()

    def layer(x, r, w, b, rm, rv):
        mean, var = nat.batch_stats(x, rm, rv, 0.1)
        return nat.forward(x, r, w, b, mean, var, 1e-5)

    gen = torch.Generator().manual_seed(7)
    args = [
        make((4, 6, 3, 5), torch.float32, "channels_last", gen, 1.0),
        torch.randn(4, 6, 3, 5, generator=gen),
    ]
    args += [torch.rand(6, generator=gen), torch.randn(6, generator=gen)]
    stats_c, stats_e = (torch.zeros(6), torch.ones(6)), (torch.zeros(6), torch.ones(6))
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(*args, *stats_c)
    torch.testing.assert_close(y, layer(*args, *stats_e))
    assert same_layout(y, args[0])
    for got, want in zip(stats_c, stats_e, strict=True):
        torch.testing.assert_close(got, want)
