"""Fused BatchNorm (+ residual add) + ReLU in training mode: resfast against eager PyTorch and
torch.compile of the unfused expression ``relu(batch_norm(x) + residual)``.

Cases: shape × memory layout (NCHW, channels_last) × dtype × residual (add, none) × mode (forward,
forward + backward). Inputs are in the dtype under test; weight, bias and running stats in fp32, as
under autocast. Paths: eager, torch.compile, and resfast's `batch_norm_add_relu` with every backend
available here.

Check before timing: each path runs once from the same inputs and running stats, and every output
(y, the running stats, and with backward dx, dresidual, dweight, dbias) is compared with a float64
evaluation of the eager expression. A path passes when its error ‖out - ref‖/‖ref‖ is at most twice
eager PyTorch's own error in the same dtype plus a floor (see `floor`); else it is WRONG and not timed.

Bytes (minimal): the forward reads x (and the residual) and writes y; the backward also reads dy and
writes dx (and dresidual). Per-channel vectors (C floats) are left out.

    python benchmarks/bench_bn.py --device cpu
    python benchmarks/bench_bn.py --device cuda --shape 256x256x56x56 --layout channels_last --dtype bf16
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # run as a file: make the repository (benchmarks, resfast) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common.chart import Chart
from benchmarks.common.cli import (
    DTYPE_SHORT,
    add_paths_option,
    base_parser,
    choice_list,
    default_paths,
    finish_args,
    result_name,
)
from benchmarks.common.context import Context, compile_stats, compiled, resfast_builders
from benchmarks.common.correctness import eps, failures, l2_rel_err
from benchmarks.common.env import start
from benchmarks.common.paths import Trial, release, run_paths
from benchmarks.common.results import EXIT_INTERRUPTED, Report, StopOnInterrupt
from benchmarks.common.table import (
    Summary,
    col,
    ms_column,
    ms_pct_cell,
    pct_copy_column,
    speedup_column,
    status_column,
)
from benchmarks.common.timing import Budget, elementwise_bytes
from resfast.nn.functional import batch_norm_add_relu

MOMENTUM, EPS = 0.1, 1e-5

SHAPES: dict[str, tuple[tuple[int, int, int, int], str]] = {
    "256x256x56x56": ((256, 256, 56, 56), "ResNet-50 layer1 block output, batch 256"),
    "256x1024x14x14": ((256, 1024, 14, 14), "ResNet-50 layer3 block output, batch 256"),
    "512x64x32x32": ((512, 64, 32, 32), "64 channels at 32x32 (CIFAR ResNet-18 stage 1), batch 512"),
    "512x16x32x32": ((512, 16, 32, 32), "CIFAR ResNet-20 stage 1, batch 512"),
    "512x32x16x16": ((512, 32, 16, 16), "CIFAR ResNet-20 stage 2, batch 512"),
    "512x64x8x8": ((512, 64, 8, 8), "CIFAR ResNet-20 stage 3, batch 512"),
    "4x8x6x6": ((4, 8, 6, 6), "smoke test"),
    "3x5x7x5": ((3, 5, 7, 5), "smoke test, odd sizes"),
}
DEFAULT_SHAPES = {
    "cuda": ["256x256x56x56", "256x1024x14x14", "512x64x32x32", "512x16x32x32", "512x32x16x16", "512x64x8x8"],
    # 2 CPU cores take ~0.1-0.3 s per forward+backward at these sizes; the GPU sizes take seconds.
    "cpu": ["512x16x32x32", "512x32x16x16", "512x64x8x8"],
    "smoke": ["3x5x7x5"],
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
RESIDUALS = ("add", "none")
DEFAULT_RESIDUALS = {"cuda": list(RESIDUALS), "cpu": ["add"], "smoke": list(RESIDUALS)}  # CPU: keep it short
MODES = ("fwd", "fwd+bwd")


def bn_bytes(numel: int, dtype: torch.dtype, residual: bool, backward: bool) -> int:
    """Minimal bytes: x (+ residual) read and y written; backward adds dy read, dx (+ dresidual) written."""
    reads, writes = 1 + residual, 1
    if backward:
        reads, writes = reads + 1, writes + 1 + residual
    return elementwise_bytes(numel, dtype.itemsize, reads, writes)


def eager(x: Tensor, r: Tensor | None, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The unfused expression every path computes (and torch.compile compiles)."""
    y = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    return F.relu(y if r is None else y + r)


Op = Callable[[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor], Tensor]

# ----------------------------------------------------------------------------------------------------
# Cases and the correctness check
# ----------------------------------------------------------------------------------------------------


def floor(dtype: torch.dtype) -> float:
    """Error a correct path may have, on any output, even where eager happens to be almost exact:
    with bf16/fp16 inputs a rounding of an intermediate to the input dtype (torch.compile's BN
    backward does so: ~4e-3 on dweight), in fp32 the reassociation of reductions over ~10^6 elements."""
    return max(eps(dtype), 1e-5)


@dataclass
class Inputs:
    x: Tensor
    residual: Tensor | None
    dy: Tensor | None  # None: forward only
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor


def make_inputs(
    shape: Sequence[int],
    layout: torch.memory_format,
    dtype: torch.dtype,
    residual: bool,
    backward: bool,
    device: torch.device,
) -> Inputs:
    gen = torch.Generator(device).manual_seed(0)
    c = shape[1]

    def rand(*size: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return torch.randn(size, generator=gen, device=device) * scale + shift

    def act() -> Tensor:  # random activations with a nonzero mean, in the layout and dtype under test
        return (rand(*shape) + 0.5).to(dtype).contiguous(memory_format=layout)

    return Inputs(
        x=act(),
        residual=act() if residual else None,
        dy=act() if backward else None,
        weight=rand(c, scale=0.2, shift=1.0),
        bias=rand(c, scale=0.2),
        running_mean=rand(c, scale=0.1),
        running_var=rand(c, scale=0.1).abs() + 1.0,
    )


def run_once(op: Op, inp: Inputs, backward: bool, cast: Callable[[Tensor], Tensor] = lambda t: t) -> dict:
    """Every output of one training step of `op` on fresh leaves and running-stat copies."""

    def leaf(t: Tensor) -> Tensor:
        return cast(t).detach().requires_grad_(backward)

    x, w, b = leaf(inp.x), leaf(inp.weight), leaf(inp.bias)
    r = None if inp.residual is None else leaf(inp.residual)
    rm, rv = cast(inp.running_mean).clone(), cast(inp.running_var).clone()
    y = op(x, r, rm, rv, w, b)
    out = {"y": y.detach(), "running_mean": rm, "running_var": rv}
    if backward:
        assert inp.dy is not None
        y.backward(cast(inp.dy))
        grads = {"dx": x.grad, "dweight": w.grad, "dbias": b.grad, "dresidual": None if r is None else r.grad}
        # A gradient that was never computed is missing from the outputs (and fails the check).
        out.update({k: g for k, g in grads.items() if g is not None})
    return out


@dataclass
class Case:
    shape_name: str
    layout: str
    dtype: torch.dtype
    residual: bool
    backward: bool
    inputs: Inputs
    truth: dict[str, Tensor]  # float64 evaluation of `eager`
    bounds: dict[str, float]  # per output: 2 x eager's own error + floor

    def columns(self) -> dict[str, Any]:
        return {
            "shape": self.shape_name,
            "layout": self.layout,
            "dtype": DTYPE_SHORT[self.dtype],
            "residual": "add" if self.residual else "none",
            "mode": "fwd+bwd" if self.backward else "fwd",
            "numel": self.inputs.x.numel(),
        }

    def nbytes(self) -> int:
        return bn_bytes(self.inputs.x.numel(), self.dtype, self.residual, self.backward)


def errors(got: Mapping[str, Tensor], truth: Mapping[str, Tensor]) -> dict[str, float]:
    # Relative L2, not max: a few elements may sit on the other side of ReLU's kink after rounding.
    return {k: l2_rel_err(got[k], truth[k]) if k in got else float("inf") for k in truth}


def make_cases(
    shape_name: str,
    layout: str,
    dtype: torch.dtype,
    residual: bool,
    modes: Sequence[str],
    device: torch.device,
) -> list[Case]:
    """The cases of one input set, one per mode; the float64 reference and eager's error are computed
    once, with the backward when any mode needs it (the forward outputs are the same)."""
    backward = "fwd+bwd" in modes
    inp = make_inputs(SHAPES[shape_name][0], LAYOUTS[layout], dtype, residual, backward, device)
    truth = run_once(eager, inp, backward, cast=torch.Tensor.double)
    got = run_once(eager, inp, backward)
    eager_err = errors(got, truth)
    bounds = {k: 2 * eager_err[k] + floor(dtype) for k in truth}
    del got
    cases = []
    for mode in modes:
        keys = truth.keys() if mode == "fwd+bwd" else ("y", "running_mean", "running_var")
        cases.append(
            Case(
                shape_name,
                layout,
                dtype,
                residual,
                mode == "fwd+bwd",
                inp,
                {k: truth[k] for k in keys},
                {k: bounds[k] for k in keys},
            )
        )
    return cases


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------


def _eager(ctx: Context, dtype: torch.dtype) -> tuple[Op, Callable[[], str]]:
    return eager, lambda: ""


def _compiled(ctx: Context, dtype: torch.dtype) -> tuple[Op, Callable[[], str]]:
    ctx.require_compile()
    return compiled(eager), compile_stats


def _resfast(ctx: Context, dtype: torch.dtype, backend: str) -> tuple[Op, Callable[[], str]]:
    # A backend that cannot run these tensors (resfast-cuda on a CPU, ...) says why when called.
    ctx.require_backend(backend, dtype, op="batch_norm_add_relu")

    def op(x: Tensor, r: Tensor | None, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return batch_norm_add_relu(x, r, rm, rv, w, b, True, MOMENTUM, EPS, backend=backend)

    return op, lambda: ""


# (context, dtype) -> (the op, what to say about it once run)
Builder = Callable[[Context, torch.dtype], tuple[Op, Callable[[], str]]]
BUILDERS: dict[str, Builder] = {
    "torch-eager": _eager,
    "torch-compile": _compiled,
    **resfast_builders(_resfast),
}
TORCH_PATHS = ("torch-eager", "torch-compile")


def trial(case: Case, build: Builder, ctx: Context) -> Trial:
    op, describe = build(ctx, case.dtype)
    inp = case.inputs

    def check() -> str | None:
        return failures(errors(run_once(op, inp, case.backward), case.truth), case.bounds)

    # The timed call: the same inputs every time, the running stats on copies.
    x, w, b = (t.detach().requires_grad_(case.backward) for t in (inp.x, inp.weight, inp.bias))
    r = None if inp.residual is None else inp.residual.detach().requires_grad_(case.backward)
    rm, rv = inp.running_mean.clone(), inp.running_var.clone()
    if not case.backward:
        return Trial(step=lambda: op(x, r, rm, rv, w, b), check=check, describe=describe)
    leaves = [t for t in (x, r, w, b) if t is not None]
    return Trial(
        step=lambda: op(x, r, rm, rv, w, b).backward(inp.dy),
        check=check,
        grad_to_none=leaves,
        describe=describe,
    )


def run_case(
    case: Case, builders: Mapping[str, Builder], ctx: Context, budget: Budget, copy_gbps: float
) -> Iterator[dict]:
    trials = {name: functools.partial(trial, case, build, ctx) for name, build in builders.items()}
    return run_paths(case.columns(), trials, ctx.device, budget, case.nbytes(), copy_gbps)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

CASE_COLUMNS = ("shape", "layout", "dtype", "residual", "mode", "numel")
TABLE = [
    col("shape"),
    col("layout"),
    col("dtype"),
    col("residual"),
    col("mode"),
    col("path"),
    status_column(),
    ms_column(),
    col("gbps", "GB/s", ".1f"),
    pct_copy_column(),
    speedup_column(),
    col("reliable"),
]
SUMMARY = Summary(("shape", "layout", "dtype", "residual", "mode"), ms_pct_cell)
CHART = Chart(
    ("layout", "dtype"), ("shape", "residual", "mode"), "pct_copy", "% of copy bandwidth (higher is better)"
)
# What run_all.py --report prints for each CSV stem: its full table and its summary.
OUTPUTS = {"bn": (TABLE, SUMMARY)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape",
        type=choice_list(tuple(SHAPES), "shape"),
        default=None,
        help=f"comma-separated NxCxHxW: {', '.join(SHAPES)} (default depends on device)",
    )
    p.add_argument(
        "--layout",
        type=choice_list(tuple(LAYOUTS), "layout"),
        default=list(LAYOUTS),
        help=f"comma-separated: {', '.join(LAYOUTS)} (default: both)",
    )
    p.add_argument(
        "--residual",
        type=choice_list(RESIDUALS, "residual"),
        default=None,
        help="add: relu(bn(x) + r); none: relu(bn(x)) (default: both; add only on the CPU)",
    )
    p.add_argument(
        "--mode",
        type=choice_list(MODES, "mode"),
        default=list(MODES),
        help="fwd and/or fwd+bwd (default: both)",
    )
    add_paths_option(p, tuple(BUILDERS))
    args = finish_args(p.parse_args(argv))
    if args.shape is None:
        args.shape = DEFAULT_SHAPES["smoke" if args.smoke else args.device.type]
    if args.residual is None:
        args.residual = DEFAULT_RESIDUALS["smoke" if args.smoke else args.device.type]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context.from_args(args)
    env = start(args.device, args.smoke, [])
    budget = Budget().smoke() if args.smoke else Budget()
    report = Report(result_name("bn", args), env, args.out, CASE_COLUMNS)
    builders = {name: BUILDERS[name] for name in args.paths or default_paths(tuple(BUILDERS), args.device)}
    with StopOnInterrupt() as stop:
        for shape_name in args.shape:
            for layout in args.layout:
                for dtype in args.dtypes:
                    for residual in args.residual:
                        for case in make_cases(
                            shape_name, layout, dtype, residual == "add", args.mode, args.device
                        ):
                            report.add(run_case(case, builders, ctx, budget, env.copy_gbps), TORCH_PATHS)
                        release(args.device)
    shapes = [f"{name}: {SHAPES[name][1]}" for name in args.shape]
    check = "check: every output within 2x eager's own error (relative L2 vs a float64 reference) + a floor"
    report.finish(TABLE, SUMMARY, CHART, [*shapes, check])
    return EXIT_INTERRUPTED if stop.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
