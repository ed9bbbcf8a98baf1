"""torch.compile over resfast: a fused ResNet with fullgraph=True, the registered ops under opcheck,
and compiled optimizer steps that do not recompile when the lr changes. CPU only."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import resfast.optim
from resfast import backends
from resfast.nn import fuse_resnet
from resfast.nn.cifar import BasicBlock, resnet20
from tests.bn_helpers import make
from tests.test_cext_ops import _cases as optimizer_op_cases

# A compiled forward/backward may sum in another order than eager; fp32 rounding of sums over a few
# thousand terms, relative to the largest value compared.
COMPILE_RTOL = 1e-4
DTYPES = (torch.float32, torch.bfloat16)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float) -> None:
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what)


def _train_step(model: nn.Module, run: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, parameter gradients and buffers of `model` after one forward/backward of `run` (the
    model or its compiled form) on x."""
    out = run(x)
    out.square().mean().backward()
    return {
        "out": out.detach(),
        **{f"grad {n}": p.grad for n, p in model.named_parameters()},
        **{f"buffer {n}": b for n, b in model.named_buffers()},
    }


class _RecordingBackend:
    """A torch.compile backend that notes the functions its graphs call, then hands them on."""

    def __init__(self, backend: str) -> None:
        self.inner = torch._dynamo.lookup_backend(backend)
        self.called: set[str] = set()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.called |= {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
        return self.inner(gm, example_inputs)


def _compare(model: nn.Module, x: torch.Tensor, backend: str, rtol: float) -> None:
    """Compiled (fullgraph=True: a graph break raises) against eager, in training and eval; the
    graph must hold the registered ops, not a trace through the eager path's kernels."""
    eager = copy.deepcopy(model)
    recording = _RecordingBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=recording)
    got, want = _train_step(model, compiled, x), _train_step(eager, eager, x)
    assert got.keys() == want.keys()
    for name, value in want.items():
        _assert_close(got[name], value, name, rtol)
    model.eval()
    eager.eval()
    _assert_close(compiled(x), eager(x), "eval output", rtol)
    assert {"resfast.bn_stats.default", "resfast.bn_add_relu_fwd.default"} <= recording.called


def test_fused_resnet18_compiles_as_one_graph() -> None:
    """Every fused BatchNorm of torchvision's resnet18 is traced (no graph break), and the compiled
    model's outputs, gradients and running stats equal eager ones. aot_eager runs the traced graph
    with eager kernels, so this checks the capture (fake implementations, autograd formula, mutation
    of the running stats) without paying Inductor's compile time for 20 convolutions."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = fuse_resnet(torchvision.models.resnet18(num_classes=10))
    # Batch 8: at batch 2 the last stage normalises 2 values per channel, and its gradients are so
    # ill-conditioned that even torch's unfused model compiled differs from eager by 1%.
    _compare(model, torch.randn(8, 3, 32, 32), "aot_eager", COMPILE_RTOL)


def test_fused_block_compiles_with_inductor() -> None:
    """Inductor (torch.compile's default) lowers the ops and the running-stat mutation."""
    torch.manual_seed(0)
    block = fuse_resnet(BasicBlock(8, 16, stride=2))
    _compare(block, torch.randn(4, 8, 8, 8), "inductor", COMPILE_RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_resnet_compiles_on_cuda(monkeypatch) -> None:
    """On CUDA the ops run the Triton BN kernels; Inductor compiles everything around them."""
    # TF32 convolutions would differ between eager's and Inductor's algorithms by ~1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = fuse_resnet(resnet20()).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    _compare(model, x, "inductor", COMPILE_RTOL)


# -- opcheck ---------------------------------------------------------------------------------------


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _bn_cases(backend: str, layout: str, dtype: torch.dtype) -> dict[str, tuple]:
    """Arguments of each BN op for inputs of one layout (the residual and dy in other layouts, so
    the outputs' strides must follow x's, as the fake implementations promise)."""
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 5, 6)
    x = make(shape, dtype, layout, gen, offset=3.0)
    residual, dy = make(shape, dtype, "nchw", gen), make(shape, dtype, "sliced", gen)
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    ops = torch.ops.resfast
    mean, var = ops.bn_stats(x, None, None, 0.1, backend)
    y = ops.bn_add_relu_fwd(x, residual, weight, bias, mean, var, 1e-5, True, backend)
    return {
        "bn_stats": (x, running_mean, running_var, 0.1, backend),
        "bn_add_relu_fwd": (_leaf(x), _leaf(residual), _leaf(weight), bias, mean, var, 1e-5, True, backend),
        "bn_add_relu_bwd": (dy, x, y, weight, mean, var, 1e-5, True, True, backend),
        "bn_add_relu_bwd (no dx)": (dy, x, y, weight, mean, var, 1e-5, False, False, backend),
    }


def _skip_unless_available(backend: str, implemented: tuple[str, ...] = backends.BACKENDS[1:]) -> None:
    try:
        backends.choose("cpu", torch.float32, backend, implemented=implemented)
    except backends.BackendUnavailable as e:
        pytest.skip(f"{e} (set TRITON_INTERPRET=1 to run Triton on the CPU)")


# Every layout (a cropped x is copied by the Triton launchers and the native CPU driver, a
# channels_last one read in place) and dtype on the reference; the Triton kernels, slow under the
# interpreter, and the native ones (their own ops are opchecked in test_bn_native.py) on two of them.
OPCHECK_CASES = [
    *(("reference", layout, dtype) for layout in ("nchw", "channels_last", "cropped") for dtype in DTYPES),
    ("triton", "channels_last", torch.bfloat16),
    ("triton", "cropped", torch.float32),
    ("cpu", "channels_last", torch.bfloat16),
    ("cpu", "cropped", torch.float32),
]


@pytest.mark.parametrize(
    ("backend", "layout", "dtype"), OPCHECK_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_opcheck_bn_ops(backend: str, layout: str, dtype: torch.dtype) -> None:
    """Schemas, fake implementations (shapes, dtypes and strides), the autograd formula and the
    declared mutation pass torch's own checks, for each backend behind the ops."""
    _skip_unless_available(backend, implemented=backends.implementing("batch_norm_add_relu"))
    for name, args in _bn_cases(backend, layout, dtype).items():
        op = getattr(torch.ops.resfast, name.split()[0]).default
        torch.library.opcheck(op, args)


def test_every_registered_op_is_opchecked() -> None:
    """A new op in the resfast namespace must join an opcheck table (here or test_cext_ops.py)."""
    checked = {name.split()[0] for name in _bn_cases("reference", "nchw", torch.float32)}
    if backends.native_extension()[0] is not None:
        from tests.test_bn_native import native_op_cases

        # (a case named "<op>+<variant>" checks <op> with other arguments)
        checked |= {name.split("+")[0] for name in optimizer_op_cases()} | {
            name.split()[0] for name in native_op_cases()
        }
    registered = {
        n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("resfast::")
    }
    assert registered == checked


def test_constant_marker_is_what_torch_compiler_sets() -> None:
    """resfast.backends marks `choose` as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at import time; if torch changes the mechanism, this fails first."""
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert marked._dynamo_marked_constant is True
    assert backends.choose._dynamo_marked_constant is True


# -- compiled optimizer steps ----------------------------------------------------------------------

OPTIMIZERS = {
    "SGD": {"momentum": 0.9, "weight_decay": 0.01},
    "RMSprop": {"momentum": 0.5, "centered": True},
    "Adagrad": {"lr_decay": 0.01},
    "Adam": {"amsgrad": True},
    "AdamW": {},
    "LARS": {"weight_decay": 0.01, "trust_coefficient": 0.02, "nesterov": True},
}
LRS = (0.01, 0.03, 0.002, 0.05)


class _CountingBackend:
    """A torch.compile backend that runs graphs eagerly and counts how many it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def _trajectory(name: str, backend: str, compile_with, lr_tensor: bool) -> list[torch.Tensor]:
    """Params after a warm-up step, then one step per lr of LRS (set as torch's schedulers do)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in ((10,), (3, 4), (7,), (1,))]
    lr = torch.tensor(LRS[0]) if lr_tensor else LRS[0]
    opt = getattr(resfast.optim, name)(params, lr=lr, backend=backend, **OPTIMIZERS[name])
    step = opt.step if compile_with is None else compile_with(opt.step)
    for i, lr in enumerate((LRS[0], *LRS)):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if lr_tensor:
            opt.param_groups[0]["lr"].fill_(lr)
        else:
            opt.param_groups[0]["lr"] = lr
        # The first step creates the state eagerly, as a training loop's first step would be traced
        # anyway: the compiled function then sees the same state structure on every call.
        (opt.step if i == 0 else step)()
    return params


def _assert_same_params(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        # The coefficients are computed by the same torch ops, possibly fused differently: fp32
        # rounding of a handful of operations.
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"param {i}")


needs_cpu_ops = pytest.mark.skipif(
    backends.native_extension()[0] is None,
    reason=f"native extension not built: {backends.native_extension()[1]}",
)


@needs_cpu_ops
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_step_is_one_graph_that_survives_lr_changes(name: str) -> None:
    """On the `cpu` backend (registered ops) the whole step traces as one graph (fullgraph=True),
    a tensor lr changed between steps does not recompile, and every step uses the new lr."""
    counter = _CountingBackend()
    got = _trajectory(name, "cpu", lambda f: torch.compile(f, fullgraph=True, backend=counter), True)
    assert counter.graphs == 1
    _assert_same_params(got, _trajectory(name, "cpu", None, True))


@needs_cpu_ops
def test_compiled_step_with_a_float_lr_recompiles_at_most_once() -> None:
    """A float lr is first specialised, then (dynamo's automatic dynamic) becomes a symbolic float:
    one recompile, then none, whatever the schedule. A tensor lr avoids even that one."""
    counter = _CountingBackend()
    got = _trajectory("Adam", "cpu", lambda f: torch.compile(f, backend=counter), False)
    assert counter.graphs <= 2
    _assert_same_params(got, _trajectory("Adam", "cpu", None, False))


@needs_cpu_ops
def test_compiled_step_with_inductor() -> None:
    got = _trajectory("Adam", "cpu", lambda f: torch.compile(f, fullgraph=True), True)
    _assert_same_params(got, _trajectory("Adam", "cpu", None, True))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_step_on_other_backends(backend: str) -> None:
    """The reference backend traces; the triton launchers run eagerly behind a graph break (their
    work table is built from tensor addresses on the host). Both give eager's results."""
    _skip_unless_available(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes about the graph break
        got = _trajectory("Adam", backend, lambda f: torch.compile(f, backend="eager"), True)
    _assert_same_params(got, _trajectory("Adam", backend, None, True))
