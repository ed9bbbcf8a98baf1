"""Training throughput (images/s) of torchvision ResNets on synthetic data, bf16 autocast and
channels_last: PyTorch (eager model + torch's fused SGD) against resfast (``fuse_resnet`` + resfast's
SGD), each also under ``torch.compile``, with peak memory.

A step is ``zero_grad, forward + cross-entropy under autocast, backward, SGD step`` on one fixed
batch (random images and labels on the device: data loading is not measured). SGD: lr 0.1,
momentum 0.9, Nesterov, weight decay 5e-4. Paths: `torch`, `torch+compile`, `resfast-sgd` (torch's
model with resfast's SGD: the optimizer's share of the gain), `resfast`, `resfast-bn-cuda` (the fused
BN on the native CUDA driver by name, where `resfast` takes auto's choice; skipped off CUDA),
`resfast+compile`.

Check before timing: from the same weights and batch, each path's first step is compared with an
fp32 step of the eager model (TF32 off): the logits and the gradients (relative L2) must be within
twice the `torch` path's own error in the same precision plus a floor, and the parameter update must
equal resfast's reference SGD applied to the path's own gradients. Otherwise the path is WRONG and
is not timed.

    python benchmarks/bench_train.py --device cpu
    python benchmarks/bench_train.py --device cuda --model resnet50
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file: make the repository (benchmarks, resfast) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resfast.optim
from benchmarks.common.chart import Chart
from benchmarks.common.cli import DTYPE_SHORT, base_parser, choice_list, finish_args, result_name
from benchmarks.common.context import Context, compile_stats, compiled
from benchmarks.common.correctness import eps, failures, l2_rel_err
from benchmarks.common.env import start
from benchmarks.common.paths import Skip, Trial, release, run_paths
from benchmarks.common.results import EXIT_INTERRUPTED, Report, StopOnInterrupt
from benchmarks.common.rows import num
from benchmarks.common.table import Summary, col, ms_column, note_column, speedup_column, status_column
from benchmarks.common.timing import Budget
from resfast.kernels import reference_optim
from resfast.nn import fuse_resnet


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # torchvision.models.<arch>
    image: int
    classes: int
    batch: int  # on CUDA
    cpu_batch: int  # 2 CPU cores: a step of a few tenths of a second
    smoke_batch: int


MODELS = {
    "resnet18": ModelSpec("resnet18", image=32, classes=10, batch=512, cpu_batch=32, smoke_batch=4),
    "resnet50": ModelSpec("resnet50", image=224, classes=1000, batch=256, cpu_batch=4, smoke_batch=2),
}
# CPU: ResNet-50 at 224² took 7-12 s a step on 2 cores (load ~3), ~140 s of a 7.4-minute default
# run_all; it runs when asked for (--model resnet50).
DEFAULT_MODELS = {"cuda": list(MODELS), "cpu": ["resnet18"], "smoke": ["resnet18"]}
SGD_ARGS: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


@dataclass(frozen=True)
class PathSpec:
    fuse: bool  # resfast.nn.fuse_resnet the model
    optimizer: str  # "torch" (torch.optim.SGD, fused=True) or "resfast" (resfast.optim.SGD, backend auto)
    compile: bool
    bn_backend: str = "auto"  # the fused BN's kernels (fuse only)


PATHS = {
    "torch": PathSpec(fuse=False, optimizer="torch", compile=False),
    "torch+compile": PathSpec(fuse=False, optimizer="torch", compile=True),
    "resfast-sgd": PathSpec(fuse=False, optimizer="resfast", compile=False),
    "resfast": PathSpec(fuse=True, optimizer="resfast", compile=False),
    # The native CUDA BN driver by name: auto picks Triton on GPUs until the two are timed.
    "resfast-bn-cuda": PathSpec(fuse=True, optimizer="resfast", compile=False, bn_backend="cuda"),
    "resfast+compile": PathSpec(fuse=True, optimizer="resfast", compile=True),
}
TORCH_PATHS = ("torch", "torch+compile")

# ----------------------------------------------------------------------------------------------------
# Models, optimizers, the step
# ----------------------------------------------------------------------------------------------------


def new_model(spec: ModelSpec) -> nn.Module:
    try:
        import torchvision
    except ImportError as e:
        raise Skip(f"torchvision cannot be imported ({e})") from None
    return getattr(torchvision.models, spec.arch)(num_classes=spec.classes)


def build_model(
    spec: ModelSpec, weights: Mapping[str, Tensor], device: torch.device, fuse: bool, bn_backend: str = "auto"
) -> nn.Module:
    model = new_model(spec)
    model.load_state_dict(weights)
    model = model.to(device, memory_format=torch.channels_last).train()
    if fuse:
        model = fuse_resnet(model, backend=bn_backend)
    return model


def new_optimizer(kind: str, model: nn.Module, foreach_reference: bool = False) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if foreach_reference:  # the fp32 reference: torch's plain per-tensor loop
        return torch.optim.SGD(params, **SGD_ARGS, foreach=False)
    if kind == "resfast":
        return resfast.optim.SGD(params, **SGD_ARGS)
    try:
        return torch.optim.SGD(params, **SGD_ARGS, fused=True)
    except RuntimeError as e:
        raise Skip(f"torch has no fused SGD here: {e}") from None


def make_step(
    model: Callable[[Tensor], Tensor],
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    amp: torch.dtype | None,
) -> Callable[[], Tensor]:
    """One training step; returns the logits. Grads stay until the next step (the check reads them)."""

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return logits

    return step


def autocast_dtype(dtype: torch.dtype) -> torch.dtype | None:
    return None if dtype == torch.float32 else dtype


# ----------------------------------------------------------------------------------------------------
# Cases and the correctness check
# ----------------------------------------------------------------------------------------------------

Measured = dict[str, Any]  # logits; grads, before, after: {param name: float64 tensor}


def measure(model: nn.Module, step: Callable[[], Tensor]) -> Measured:
    """One step's logits, and per parameter its gradient and its values before and after the step."""
    named = dict(model.named_parameters())
    before = {n: p.detach().double() for n, p in named.items()}  # .double() copies: p changes in place
    logits = step()
    return {
        "logits": logits.detach().float(),
        "grads": {n: p.grad.detach().double() for n, p in named.items() if p.grad is not None},
        "before": before,
        "after": {n: p.detach().double() for n, p in named.items()},
    }


def _flat(tensors: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([tensors[n].flatten() for n in names])


def spec_update(got: Measured) -> dict[str, Tensor]:
    """What the step should have done to the params given the path's own gradients: resfast's
    reference SGD (the specification) applied, in float64, to the params as they were before it."""
    names = list(got["grads"])
    params = [got["before"][n].clone() for n in names]
    grads = [got["grads"][n] for n in names]
    bufs = [torch.zeros_like(p) for p in params]
    reference_optim.sgd(params, grads, bufs, [True] * len(params), dampening=0, maximize=False, **SGD_ARGS)
    return dict(zip(names, params, strict=True))


def errors(got: Measured, truth: Measured) -> dict[str, float]:
    """Relative L2 errors: logits and gradients (all tensors as one vector) against the fp32
    reference, and the parameter update against what SGD's specification makes of the same grads."""
    names = list(truth["grads"])
    if set(got["grads"]) != set(names):
        return {"grads": float("inf")}
    expected = spec_update(got)
    update = _flat(got["after"], names) - _flat(got["before"], names)
    return {
        "logits": l2_rel_err(got["logits"], truth["logits"]),
        "grads": l2_rel_err(_flat(got["grads"], names), _flat(truth["grads"], names)),
        "update": l2_rel_err(update, _flat(expected, names) - _flat(got["before"], names)),
    }


def floor(dtype: torch.dtype) -> float:
    """What a correct path may differ by where the torch path happens to be near-exact: a rounding of
    the autocast dtype, or in fp32 reassociation (and TF32 convolutions) through tens of layers."""
    return eps(dtype) if dtype != torch.float32 else 1e-3


# The update is a difference of fp32 params: its rounding is ~ulp(p) / |update|, measured ~2e-7 here;
# 1e-5 leaves room and still flags an lr or momentum 0.1% off.
UPDATE_TOL = 1e-5


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off: the reference must be a true fp32 computation."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(
            enabled=True, benchmark=torch.backends.cudnn.benchmark, allow_tf32=False
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@dataclass
class Case:
    model_name: str
    spec: ModelSpec
    batch: int
    dtype: torch.dtype
    weights: dict[str, Tensor]
    x: Tensor
    y: Tensor
    truth: Measured
    bounds: dict[str, float]

    def columns(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "image": self.spec.image,
            "batch": self.batch,
            "dtype": DTYPE_SHORT[self.dtype],
        }


def make_case(name: str, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    spec = MODELS[name]
    torch.manual_seed(0)
    weights = new_model(spec).state_dict()
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 3, spec.image, spec.image, generator=gen, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.classes, (batch,), generator=gen, device=device)
    case = Case(name, spec, batch, dtype, weights, x, y, truth={}, bounds={})
    with full_fp32():
        model = build_model(spec, weights, device, fuse=False)
        case.truth = measure(model, make_step(model, new_optimizer("torch", model, True), x, y, amp=None))
    del model
    # The torch path's own error in this precision sets the bounds on logits and gradients. In bf16
    # the gradients of a freshly initialised ResNet on random data are ill-conditioned (a 2^-9
    # relative change of the input moves them by ~20%), so their bound only catches gross errors;
    # logits (error ~5%) and the update (held to its specification) are the tight checks.
    model = build_model(spec, weights, device, fuse=False)
    got = measure(model, make_step(model, new_optimizer("torch", model), x, y, autocast_dtype(dtype)))
    own = errors(got, case.truth)
    case.bounds = {
        "logits": 2 * own["logits"] + floor(dtype),
        "grads": 2 * own["grads"] + floor(dtype),
        "update": UPDATE_TOL,
    }
    return case


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------


def trial(case: Case, path: PathSpec, ctx: Context) -> Trial:
    if path.compile:
        ctx.require_compile()
    if path.bn_backend != "auto":
        ctx.require_backend(path.bn_backend, case.dtype, op="batch_norm_add_relu")
    model = build_model(case.spec, case.weights, ctx.device, path.fuse, path.bn_backend)
    opt = new_optimizer(path.optimizer, model)
    run: Callable[[Tensor], Tensor] = compiled(model) if path.compile else model
    step = make_step(run, opt, case.x, case.y, autocast_dtype(case.dtype))

    def check() -> str | None:
        names, want = {n for n, _ in model.named_parameters()}, set(case.truth["grads"])
        if names != want:
            return f"parameter names differ from the unfused model's: {sorted(names ^ want)[:3]}"
        return failures(errors(measure(model, step), case.truth), case.bounds)

    return Trial(step=step, check=check, describe=compile_stats if path.compile else lambda: "")


def run_case(
    case: Case, paths: Mapping[str, PathSpec], ctx: Context, budget: Budget, copy_gbps: float
) -> Iterator[dict]:
    trials = {name: functools.partial(trial, case, path, ctx) for name, path in paths.items()}
    for row in run_paths(case.columns(), trials, ctx.device, budget, None, copy_gbps):
        if "ms" in row:
            row["img_s"] = case.batch * 1e3 / row["ms"]
        yield row


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

CASE_COLUMNS = ("model", "image", "batch", "dtype")
TABLE = [
    col("model"),
    col("image"),
    col("batch"),
    col("dtype"),
    col("path"),
    status_column(),
    ms_column(),
    col("img_s", "img/s", ".0f"),
    speedup_column(),
    col("peak_mib", "peak MiB", ".0f"),
    col("reliable"),
    note_column(),
]
SUMMARY = Summary(("model", "image", "batch", "dtype"), lambda row: f"{num(row, 'img_s'):.0f} img/s")
CHART = Chart(("dtype",), ("model", "batch"), "img_s", "images per second (higher is better)")
# What run_all.py --report prints for each CSV stem: its full table and its summary.
OUTPUTS = {"train": (TABLE, SUMMARY)}
# A step takes tens (GPU) to hundreds (CPU) of ms: time for longer than the kernel benchmarks do. On
# CUDA, warm-up also covers cudnn.benchmark's algorithm search.
BUDGET = {
    "cuda": Budget(warmup_calls=3, rep_ms=1500.0),
    "cpu": Budget(warmup_calls=1, cpu_seconds=2.0, cpu_min_reps=3, cpu_max_reps=20),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0], default_dtypes="bfloat16", dtypes=("bfloat16", "float32"))
    p.add_argument(
        "--model",
        type=choice_list(tuple(MODELS), "model"),
        default=None,
        help=f"comma-separated: {', '.join(MODELS)} (default: both on CUDA, else resnet18)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="batch size for every model (default: per model and device)"
    )
    p.add_argument(
        "--paths",
        type=choice_list(tuple(PATHS), "path"),
        default=list(PATHS),
        help=f"comma-separated subset of: {', '.join(PATHS)}",
    )
    args = finish_args(p.parse_args(argv))
    if args.model is None:
        args.model = DEFAULT_MODELS["smoke" if args.smoke else args.device.type]
    return args


def batch_size(args: argparse.Namespace, spec: ModelSpec) -> int:
    if args.batch is not None:
        return args.batch
    return spec.smoke_batch if args.smoke else spec.batch if args.device.type == "cuda" else spec.cpu_batch


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context.from_args(args)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training scripts do; the same for every path
    env = start(args.device, args.smoke, [])
    budget = BUDGET[args.device.type].smoke() if args.smoke else BUDGET[args.device.type]
    report = Report(result_name("train", args), env, args.out, CASE_COLUMNS, metrics=("img_s",))
    paths = {name: PATHS[name] for name in args.paths}
    with StopOnInterrupt() as stop:
        for name in args.model:
            for dtype in args.dtypes:
                try:
                    case = make_case(name, batch_size(args, MODELS[name]), dtype, args.device)
                except Skip as e:
                    print(f"skipping {name}: {e}")
                    continue
                report.add(run_case(case, paths, ctx, budget, env.copy_gbps), TORCH_PATHS)
                del case
                release(args.device)
    sgd = ", ".join(f"{k}={v}" for k, v in SGD_ARGS.items())
    report.finish(
        TABLE,
        SUMMARY,
        CHART,
        [
            f"SGD: {sgd}; synthetic fixed batch, channels_last, autocast to dtype "
            f"(fp32: none); cudnn.benchmark on CUDA",
        ],
    )
    return EXIT_INTERRUPTED if stop.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
