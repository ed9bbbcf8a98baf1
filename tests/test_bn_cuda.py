"""GPU-only: the native `cuda` backend of the fused BatchNorm + add + ReLU (csrc/cuda/bn.cu) on a GPU.

The driver's logic (plan, vector/scalar split, block reductions, ticketed merge) also runs on every
CI host, compiled for the CPU (tests/test_bn_native.py, driver "cuda-kernel-on-host"); here the
kernels themselves: against the specification evaluated in float64 over shapes x layouts x dtypes x
modes, ResNet's CIFAR and ImageNet shapes included (the tolerance rule of test_bn_native.py:
`bn_helpers.check_layer`); bit-for-bit repeatable results (the partial results are merged in a fixed
order, with no float atomics); the kernel launches of each op, counted by the profiler; no host
synchronisation; a fused layer's forward and backward captured in a CUDA graph. Skips without a CUDA
device or without the extension's CUDA kernels.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from resfast import backends
from resfast.kernels import reference_bn
from resfast.nn import BatchNormAddReLU
from tests.bn_helpers import OFFSET_LAYOUTS, check_layer, layer_case_id, layer_inputs, make, run_layer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not backends.native_runs("cuda"),
    reason="needs a CUDA device and resfast._C built with its CUDA kernels",
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Odd sizes, C = 1, one value per sample (2-D), channel counts that are not whole tiles (40) or
# vectors (5, 33), several chunks per channel (NCHW 5x3x64x64) and per tile (channels-last 2x32x160x160).
SMALL = ((2, 1, 3, 3), (4, 3, 7), (3, 5, 7, 9), (6, 33), (7, 1), (64, 48), (2, 40, 33, 17), (8, 40, 20, 20),
         (5, 3, 64, 64), (2, 32, 160, 160))  # fmt: skip
# ResNet's: CIFAR's first and last stages at batch 512, ImageNet's first stage (its 256-channel
# layers) at batch 64: 51M values, several rounds per thread in a channels-last item; batch 256 would
# need ~16 GB per case for the float64 specification, too much for parallel test workers on one GPU.
LARGE = ((512, 64, 32, 32), (512, 512, 4, 4), (64, 256, 56, 56))
LAYOUTS = ("nchw", "channels_last", "sliced", "cropped", *OFFSET_LAYOUTS)

CASES = [
    *(
        (shape, layout, dtype, training, residual)
        for shape in SMALL
        for layout in LAYOUTS
        if layout != "cropped" or len(shape) == 4
        for dtype in DTYPES
        for training in (True, False)
        for residual in (True, False)
    ),
    *(
        (shape, layout, dtype, True, True)
        for shape in LARGE
        for layout in ("nchw", "channels_last")
        for dtype in (torch.float32, torch.bfloat16)
    ),
]


def _cuda():
    return backends.kernel_module("batch_norm_add_relu", "cuda")


@pytest.mark.parametrize("case", CASES, ids=layer_case_id)
def test_matches_reference_in_float64(case) -> None:
    shape, layout, dtype, training, residual = case
    t = layer_inputs(shape, dtype, layout, residual, zlib.crc32(layer_case_id(case).encode()), device="cuda")
    check_layer(_cuda(), t, training, dense=layout in ("nchw", "channels_last", *OFFSET_LAYOUTS))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_for_bit_repeatable(layout: str, dtype: torch.dtype) -> None:
    """The last block of each group merges every block's partial results in chunk order, whichever
    block it is: two runs give the same bits (float atomics would not)."""
    t = layer_inputs((512, 64, 32, 32), dtype, layout, True, 7, device="cuda")
    first, second = run_layer(_cuda(), t, True), run_layer(_cuda(), t, True)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def _launched(fn) -> tuple[object, list[str]]:
    """fn()'s result, and the kernel bodies (csrc/bn_cuda_kernels.h) it launched in order, or the
    whole name of any other kernel it ran (which a test then sees as unexpected); memsets are left
    out."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    bodies = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or "memset" in event.name.lower():
            continue
        found = [
            b
            for b in ("StatsKernel", "ApplyKernel", "GradReduceKernel", "GradInputKernel")
            if b in event.name
        ]
        bodies.append(found[0] if found else event.name)
    return result, bodies


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_launches_per_op(layout: str) -> None:
    """Training forward: one statistics kernel and one normalising kernel; backward: two kernels
    (dz with the sums, then dx); nothing else but the memsets of the ticket counters."""
    k = _cuda()
    t = layer_inputs((64, 64, 16, 16), torch.float32, layout, True, 3, device="cuda")
    x, r, w, b = t["x"], t["residual"], t["weight"], t["bias"]
    dy = torch.randn_like(x)  # in x's layout: one of another layout would be copied first (a kernel)
    (mean, var), launched = _launched(lambda: k.batch_stats(x, t["running_mean"], t["running_var"], 0.1))
    assert launched == ["StatsKernel"]
    y, launched = _launched(lambda: k.forward(x, r, w, b, mean, var, 1e-5))
    assert launched == ["ApplyKernel"]
    _, launched = _launched(lambda: k.backward(dy, x, y, w, mean, var, 1e-5, True, True))
    assert launched == ["GradReduceKernel", "GradInputKernel"]


def test_no_host_synchronisation() -> None:
    """No op reads a device value on the host (torch raises on any synchronising call)."""
    k = _cuda()
    t = layer_inputs((16, 32, 8, 8), torch.bfloat16, "channels_last", True, 4, device="cuda")
    x, r, w, b, dy = t["x"], t["residual"], t["weight"], t["bias"], t["dy"]
    count = torch.tensor(512.0, device="cuda")  # (a copy from the host, before the check starts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mean, var = k.batch_stats(x, t["running_mean"], t["running_var"], 0.1)
        y = k.forward(x, r, w, b, mean, var, 1e-5)
        _, dz, dw, db = k.backward(dy, x, y, w, mean, var, 1e-5, True, True)
        k.grad_input(dz, x, w, mean, var, 1e-5, db, dw, count)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_cpp_eager_layer_makes_no_host_synchronisation() -> None:
    """BatchNormAddReLU(backend="cuda")'s forward and backward (the C++ autograd path of
    csrc/bn_autograd.cpp) read no device value on the host."""
    m = BatchNormAddReLU(32, backend="cuda").cuda()
    x = torch.randn(16, 32, 8, 8, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn_like(x).requires_grad_()
    dy = torch.randn_like(x)
    m(x, r).backward(dy)  # the first call loads and caches what it may
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = m(x, r)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.grad_fn is not None and "CppNode" in y.grad_fn.name()
    assert x.grad is not None and r.grad is not None and m.weight.grad is not None


def test_fused_layer_forward_and_backward_capture_in_a_cuda_graph() -> None:
    """BatchNormAddReLU(backend="cuda")'s forward and backward captured once, replayed on new
    inputs: the same outputs, gradients and running statistics as an eager step, bit for bit."""
    torch.manual_seed(0)
    m = BatchNormAddReLU(64, backend="cuda").cuda()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    shape, cl = (32, 64, 16, 16), torch.channels_last
    x = torch.randn(shape, device="cuda").to(memory_format=cl).requires_grad_()
    r = torch.randn(shape, device="cuda").to(memory_format=cl).requires_grad_()
    dy = torch.randn(shape, device="cuda")

    def step() -> tuple[torch.Tensor, ...]:
        y = m(x, r)
        return (y.detach(), *torch.autograd.grad(y, (x, r, m.weight, m.bias), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (x, r, dy):
            t.copy_(torch.randn(shape, generator=gen) * 2 + 1)
    buffers = [b.clone() for b in m.buffers()]
    graph.replay()
    replayed = [t.clone() for t in captured]
    replayed_buffers = [b.clone() for b in m.buffers()]
    with torch.no_grad():
        for b, before in zip(m.buffers(), buffers, strict=True):
            b.copy_(before)
    eager = step()
    for name, got, want in zip(("y", "dx", "dresidual", "dweight", "dbias"), replayed, eager, strict=True):
        assert torch.equal(got, want), name
    for got, want in zip(replayed_buffers, m.buffers(), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(replayed_buffers[0], buffers[0]), "the replay did not update the running mean"


@pytest.mark.parametrize("count_kind", ["scalar", "per-channel"])
def test_grad_input_with_a_count_on_the_device(count_kind: str) -> None:
    """Synchronised BN passes the count as a device tensor: read by the kernel, as the reference."""
    gen = torch.Generator().manual_seed(3)
    x = make((4, 5, 3, 6), torch.float32, "channels_last", gen, offset=1.0, device="cuda")
    dz = make((4, 5, 3, 6), torch.float32, "nchw", gen, device="cuda")
    w, mean, var = (
        torch.rand(5, generator=gen) + 0.5,
        torch.randn(5, generator=gen),
        torch.rand(5, generator=gen) + 1,
    )
    sums = torch.randn(5, generator=gen) * 10, torch.randn(5, generator=gen) * 10
    count = torch.tensor(300.0) if count_kind == "scalar" else torch.full((5,), 300.0)
    args = [t.cuda() for t in (w, mean, var)]
    got = _cuda().grad_input(dz, x, *args, 1e-5, sums[0].cuda(), sums[1].cuda(), count.cuda())
    want = reference_bn.grad_input(dz.double(), x.double(), *(t.double() for t in args), 1e-5,
                                   sums[0].cuda().double(), sums[1].cuda().double(), 300)  # fmt: skip
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_inputs_on_another_device_are_refused() -> None:
    x = torch.randn(4, 3, 2, 2, device="cuda")
    with pytest.raises(
        RuntimeError, match="running_mean must be a CUDA tensor on x's device cuda:0, got one on cpu"
    ):
        _cuda().batch_stats(x, torch.zeros(3), torch.ones(3), 0.1)
    with pytest.raises(RuntimeError, match="residual must be a strided CUDA tensor on x's device"):
        _cuda().forward(
            x, x.cpu(), None, None, torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"), 1e-5
        )
