"""One optimizer step: resfast's backends against every PyTorch path, on real parameter lists.

Cases: each optimizer (SGD with momentum, RMSprop, Adagrad, Adam, AdamW, LARS) × parameter list
(torchvision ResNet-18 / ResNet-50 shapes, CIFAR ResNet-20 shapes, one flat tensor) × dtype; and SGD and
Adam with gradient clipping: resfast's ``max_grad_norm`` against torch's ``clip_grad_norm_`` + step.
Paths: torch's for-loop (foreach=False), foreach, fused (where torch has it for that device and
dtype: found by trying), ``torch.compile`` of the step, and resfast with every backend available here.
torch.optim has no LARS: its rows have resfast's paths only.

Before timing, every path takes CHECK_STEPS steps from the same params, grads and fresh state and is
compared, on the params and every state tensor, with resfast's `reference` backend (the readable
spec). A path that disagrees is reported WRONG and is not timed.

Bytes: a step reads param, grad and every state and writes param and every state, so
(3 + 2 * states) * itemsize per element (fp32: SGD-momentum 20 B, Adam 28 B); plus what a norm needs
read once more: LARS's ‖w‖ and ‖g‖ (SGD-momentum's + 8 B), clipping's global ‖g‖ (+4 B). Per-tensor
scalars (step counters) are left out: < 0.01% of any list here.

Then a second table (optim_host.csv; --no-host skips it): the host's time per step over ResNet-50's
161 parameter tensors with one element each, where the step moves no data to speak of, for torch's
foreach and fused steps and every resfast backend. torch has no fused RMSprop: its row is compared
with torch's fused Adagrad, which moves the same three lists.

    python benchmarks/bench_optim.py --device cpu
    python benchmarks/bench_optim.py --device cuda --optimizer adam --params resnet50 --dtype fp32
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a file: make the repository (benchmarks, resfast) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resfast.optim
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
from benchmarks.common.correctness import eps, failures, max_abs_err
from benchmarks.common.env import start
from benchmarks.common.paths import Skip, Trial, release, run_paths
from benchmarks.common.results import EXIT_INTERRUPTED, Report, StopOnInterrupt
from benchmarks.common.rows import num
from benchmarks.common.table import (
    Summary,
    col,
    ms_column,
    ms_pct_cell,
    note_column,
    pct_copy_column,
    speedup_column,
    status_column,
)
from benchmarks.common.timing import Budget, elementwise_bytes
from resfast import backends
from resfast.nn.cifar import resnet20

Shape = tuple[int, ...]

# ----------------------------------------------------------------------------------------------------
# Optimizers and their byte counts
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimSpec:
    label: str
    cls: str  # the class name, in torch.optim and in resfast.optim
    kwargs: Mapping[str, Any]
    # The per-element state tensors a step reads and writes (torch's state keys, `step` aside).
    states: tuple[str, ...]
    # Clip the grads to this global norm: resfast's max_grad_norm, torch's clip_grad_norm_ before the step.
    max_grad_norm: float | None = None
    # Tensors read once more per element, for a norm (LARS: param and grad; clipping: grad).
    extra_reads: int = 0

    def resfast_kwargs(self) -> dict[str, Any]:
        clip = {} if self.max_grad_norm is None else {"max_grad_norm": self.max_grad_norm}
        return {**self.kwargs, **clip}


# Learning rates are large next to the params (scale 0.01, see make_case) so that any error in the
# update shows in the check, in bf16 too; the timing does not depend on the values.
OPTIMIZERS: dict[str, OptimSpec] = {
    "sgd": OptimSpec("SGD-momentum", "SGD", {"lr": 0.1, "momentum": 0.9}, ("momentum_buffer",)),
    "rmsprop": OptimSpec("RMSprop", "RMSprop", {"lr": 1e-2}, ("square_avg",)),
    "adagrad": OptimSpec("Adagrad", "Adagrad", {"lr": 1e-2}, ("sum",)),
    "adam": OptimSpec("Adam", "Adam", {"lr": 1e-2}, ("exp_avg", "exp_avg_sq")),
    "adamw": OptimSpec("AdamW", "AdamW", {"lr": 1e-2, "weight_decay": 1e-2}, ("exp_avg", "exp_avg_sq")),
    "lars": OptimSpec(
        "LARS",
        "LARS",
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        ("momentum_buffer",),
        extra_reads=2,
    ),
    # The grads' global norm is 0.1 * sqrt(numel) (make_case): 1.0 clips every case here.
    "sgd-clip": OptimSpec(
        "SGD-momentum+clip", "SGD", {"lr": 0.1, "momentum": 0.9}, ("momentum_buffer",), 1.0, extra_reads=1
    ),
    "adam-clip": OptimSpec("Adam+clip", "Adam", {"lr": 1e-2}, ("exp_avg", "exp_avg_sq"), 1.0, extra_reads=1),
}


def step_bytes(spec: OptimSpec, numel: int, dtype: torch.dtype) -> int:
    """Minimal bytes of one step over `numel` elements: param, grad and states read, param and
    states written; grads and states have the param's dtype, as in torch."""
    n = len(spec.states)
    return elementwise_bytes(numel, dtype.itemsize, reads=2 + n + spec.extra_reads, writes=1 + n)


# ----------------------------------------------------------------------------------------------------
# Parameter lists
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSet:
    shapes: list[Shape]
    source: str  # where the shapes come from, written in every row


RESNET50_NUMEL = 25_557_032  # torchvision resnet50's parameter count (tested against torchvision)


def _torchvision(arch: str) -> ParamSet:
    try:
        import torchvision
    except ImportError as e:
        raise Skip(f"torchvision cannot be imported ({e}): {arch} shapes unavailable") from None
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = getattr(torchvision.models, arch)()
    return ParamSet([tuple(p.shape) for p in model.parameters()], f"torchvision {arch}")


def _cifar_resnet20() -> ParamSet:
    with torch.device("meta"):
        model = resnet20()
    return ParamSet([tuple(p.shape) for p in model.parameters()], "resfast.nn.cifar resnet20")


# Smoke: 1-element, odd and multi-block (> 1024 elements) tensors, few enough for the Triton interpreter.
_TINY = [(16, 3, 3, 3), (10,), (7,), (1,), (1100,)]

PARAM_SETS: dict[str, Callable[[], ParamSet]] = {
    "resnet18": functools.partial(_torchvision, "resnet18"),
    "resnet50": functools.partial(_torchvision, "resnet50"),
    "cifar-resnet20": _cifar_resnet20,
    "flat": lambda: ParamSet([(RESNET50_NUMEL,)], "one tensor, as many elements as resnet50"),
    "flat-8m": lambda: ParamSet([(1 << 23,)], "one tensor of 2^23 elements"),
    "tiny": lambda: ParamSet(list(_TINY), "smoke-test shapes"),
}
# CPU: 2 cores take ~1 s per step of torch's for-loop Adam over ResNet-18's 11.7M params; the
# default CPU run keeps to ResNet-20 and a flat tensor whose data (>= 64 MB) is past the 32 MB L3.
DEFAULT_PARAMS = {
    "cuda": ["resnet18", "resnet50", "cifar-resnet20", "flat"],
    "cpu": ["cifar-resnet20", "flat-8m"],
    "smoke": ["tiny"],
}

# ----------------------------------------------------------------------------------------------------
# Cases and the correctness check
# ----------------------------------------------------------------------------------------------------

CHECK_STEPS = 3  # the first step creates state (SGD copies the grad); later ones update it
# Tolerance against the reference, per tensor: max |got - want| <= TOL(dtype) * magnitude, where
# magnitude is the larger of the tensor's first and last values plus how far the steps moved it
# (states start from 0). Correct paths differ from the reference only by rounding:
# - bf16/fp16: torch's non-fused paths round every intermediate to the storage dtype where the
#   reference rounds once (<= 0.5 eps measured after 3 steps); ULPS = 4 eps leaves room and still
#   flags an lr 10% off (~6 eps);
# - fp32: op order and FMA (<= 1 eps), but also coefficients evaluated in fp32, where 1 - beta2^t
#   cancels (torch.compile's Adam: ~25 eps, 3e-6 relative). FP32_TOL = 1e-4 covers that and still
#   flags anything 0.01% off.
ULPS = 4
FP32_TOL = 1e-4


# Clipping rows: torch's fp32 norm on the CPU accumulates in fp32 (measured 2.9e-4 relative error over
# 2^23 elements; resfast's native CPU norm sums in double), and every clipped value carries the norm's
# error. 1e-3 covers that and still flags an update 0.1% off.
CLIP_TOL = 1e-3


def tolerance(dtype: torch.dtype, clipped: bool = False) -> float:
    return max(ULPS * eps(dtype), CLIP_TOL if clipped else FP32_TOL)


def magnitude(want: Tensor, initial: Tensor | None) -> float:
    """The size of what the steps computed for one tensor (see the tolerance above)."""
    last = want.detach().double()
    first = torch.zeros_like(last) if initial is None else initial.detach().double().to(last.device)
    if last.numel() == 0:
        return 0.0
    return max(last.abs().max().item(), first.abs().max().item()) + (last - first).abs().max().item()


@dataclass
class Case:
    spec: OptimSpec
    params_name: str
    pset: ParamSet
    dtype: torch.dtype
    device: torch.device
    params: list[Tensor]
    grads: list[Tensor]
    reference: dict[str, Tensor]

    def columns(self) -> dict[str, Any]:
        return {
            "optimizer": self.spec.label,
            "params": self.params_name,
            "dtype": DTYPE_SHORT[self.dtype],
            "n_tensors": len(self.params),
            "numel": sum(p.numel() for p in self.params),
            "source": self.pset.source,
        }

    def nbytes(self) -> int:
        return step_bytes(self.spec, sum(p.numel() for p in self.params), self.dtype)

    def fresh(self) -> list[Tensor]:
        """Copies of the case's params with their grads attached: every path starts from these."""
        params = [p.clone() for p in self.params]
        for p, g in zip(params, self.grads, strict=True):
            p.grad = g.clone()
        return params


def make_case(
    spec: OptimSpec, params_name: str, pset: ParamSet, dtype: torch.dtype, device: torch.device
) -> Case:
    gen = torch.Generator(device).manual_seed(0)
    # Random, never zero (zeros hide unwritten outputs), drawn in fp32 on the device (ResNet-50's
    # 25.6M take a second on a CPU) and rounded to the dtype: every path sees the same values.
    params = [(torch.randn(s, generator=gen, device=device) * 0.01).to(dtype) for s in pset.shapes]
    grads = [(torch.randn(s, generator=gen, device=device) * 0.1).to(dtype) for s in pset.shapes]
    case = Case(spec, params_name, pset, dtype, device, params, grads, reference={})
    ref_params = case.fresh()
    ref = getattr(resfast.optim, spec.cls)(ref_params, backend="reference", **spec.resfast_kwargs())
    for _ in range(CHECK_STEPS):
        ref.step()
    case.reference = snapshot(ref, ref_params)
    return case


def snapshot(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[str, Tensor]:
    """Every param and every tensor in its state, by name (p<i>, p<i>.<state key>)."""
    out: dict[str, Tensor] = {}
    for i, p in enumerate(params):
        out[f"p{i}"] = p.detach()
        for key, value in opt.state[p].items():
            if isinstance(value, Tensor):
                out[f"p{i}.{key}"] = value.detach()
    return out


def compare(
    got: Mapping[str, Tensor],
    want: Mapping[str, Tensor],
    initial: Mapping[str, Tensor],
    dtype: torch.dtype,
    clipped: bool = False,
) -> str | None:
    """None if `got` matches the reference within the tolerance (step counters exactly), else what
    differs. `initial` holds the params' values before the steps (states start from zero)."""
    if got.keys() != want.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        return f"state tensors differ from the reference: missing {missing[:3]}, unexpected {extra[:3]}"
    errors, bounds = {}, {}
    for k in want:
        scale = magnitude(want[k], initial.get(k)) or 1.0
        errors[k] = max_abs_err(got[k], want[k]) / scale
        bounds[k] = 0.0 if k.endswith(".step") else tolerance(dtype, clipped)
    return failures(errors, bounds)


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------


@dataclass
class Built:
    opt: torch.optim.Optimizer
    step: Callable[[], object]
    describe: Callable[[], str] = lambda: ""


def _torch_class(spec: OptimSpec) -> type[torch.optim.Optimizer]:
    cls = getattr(torch.optim, spec.cls, None)
    if cls is None:
        raise Skip(f"torch.optim has no {spec.cls}")
    return cls


def _torch_step(spec: OptimSpec, opt: torch.optim.Optimizer, params: list[Tensor]) -> Callable[[], None]:
    """torch's step, after clip_grad_norm_ (torch's default foreach path) when the case clips."""
    if spec.max_grad_norm is None:
        return opt.step
    max_norm = spec.max_grad_norm

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()

    return step


def _torch(spec: OptimSpec, params: list[Tensor], ctx: Context, **flags: Any) -> Built:
    opt = _torch_class(spec)(params, **{**spec.kwargs, **flags})
    return Built(opt, _torch_step(spec, opt, params))


def _torch_fused(spec: OptimSpec, params: list[Tensor], ctx: Context) -> Built:
    # Whether torch has a fused kernel for this optimizer, device and dtype: try one on a probe.
    probe = torch.ones(3, device=params[0].device, dtype=params[0].dtype)
    probe.grad = torch.ones_like(probe)
    try:
        _torch_class(spec)([probe], fused=True, **spec.kwargs).step()
    except (TypeError, RuntimeError, ValueError) as e:
        raise Skip(f"torch has no fused {spec.cls} for {params[0].dtype} on {ctx.device.type}: {e}") from None
    return _torch(spec, params, ctx, fused=True)


def _torch_compiled(spec: OptimSpec, params: list[Tensor], ctx: Context) -> Built:
    ctx.require_compile()
    # torch's default implementation choice (foreach on CUDA), compiled as torch's tutorial does.
    opt = _torch_class(spec)(params, **spec.kwargs)
    eager = _torch_step(spec, opt, params)

    def step() -> None:
        eager()

    return Built(opt, compiled(step), compile_stats)


def _resfast(spec: OptimSpec, params: list[Tensor], ctx: Context, backend: str) -> Built:
    ctx.require_backend(backend, params[0].dtype)
    opt = getattr(resfast.optim, spec.cls)(params, backend=backend, **spec.resfast_kwargs())
    return Built(opt, opt.step)


Builder = Callable[[OptimSpec, list[Tensor], Context], Built]
BUILDERS: dict[str, Builder] = {
    "torch-forloop": functools.partial(_torch, foreach=False),
    "torch-foreach": functools.partial(_torch, foreach=True),
    "torch-fused": _torch_fused,
    "torch-compile": _torch_compiled,
    **resfast_builders(_resfast),
}
TORCH_PATHS = ("torch-forloop", "torch-foreach", "torch-fused", "torch-compile")


def trial(case: Case, build: Builder, ctx: Context) -> Trial:
    params = case.fresh()
    built = build(case.spec, params, ctx)

    def check() -> str | None:
        for _ in range(CHECK_STEPS):
            built.step()
        initial = {f"p{i}": p for i, p in enumerate(case.params)}
        clipped = case.spec.max_grad_norm is not None
        return compare(snapshot(built.opt, params), case.reference, initial, case.dtype, clipped)

    return Trial(step=built.step, check=check, describe=built.describe)


def run_case(
    case: Case, builders: Mapping[str, Builder], ctx: Context, budget: Budget, copy_gbps: float
) -> Iterator[dict]:
    trials = {name: functools.partial(trial, case, build, ctx) for name, build in builders.items()}
    return run_paths(case.columns(), trials, ctx.device, budget, case.nbytes(), copy_gbps)


# ----------------------------------------------------------------------------------------------------
# Host time per step
# ----------------------------------------------------------------------------------------------------

# ResNet-50's parameter count, in tensors of one element each: the step moves almost no bytes, so
# its time is the host's (Python, dispatch, launches), which a fused kernel cannot hide on small
# models or a fast GPU.
RESNET50_TENSORS = 161
HOST_PARAMS = {
    "host": ParamSet(
        [(1,)] * RESNET50_TENSORS, f"{RESNET50_TENSORS} one-element tensors (ResNet-50's count)"
    ),
    "smoke": ParamSet([(1,)] * 5, "5 one-element tensors (smoke)"),
}
HOST_PATHS = ("torch-foreach", "torch-fused", *(name for name in BUILDERS if name.startswith("resfast-")))
HOST_BASELINES = ("torch-foreach", "torch-fused")
# torch has no fused RMSprop; its fused Adagrad moves the same three lists (param, grad, one state).
# torch has no LARS at all; its fused SGD with momentum moves the same lists.
FUSED_STAND_IN = {"rmsprop": "adagrad", "lars": "sgd"}
# Each sample is 20 steps back to back (then a device sync): a sample of a ~0.3 ms step lasts ~6 ms.
HOST_BUDGET = Budget(warmup_calls=3, cpu_seconds=0.3, cpu_min_reps=5, cpu_max_reps=50, host_calls=20)


def host_trials(
    opt_name: str, builders: Mapping[str, Builder], ctx: Context, case_of: Callable[[str], Case]
) -> dict[str, Callable[[], Trial]]:
    """The host-time paths of one optimizer, each checked against the reference before it is timed.
    Where torch has no fused step, its `torch-fused` row is the stand-in's (checked as that one)."""
    trials = {}
    for name, build in builders.items():
        if name not in HOST_PATHS:
            continue
        stand_in = FUSED_STAND_IN.get(opt_name) if name == "torch-fused" else None
        if stand_in is None:
            trials[name] = functools.partial(trial, case_of(opt_name), build, ctx)
        else:
            note = f"{OPTIMIZERS[stand_in].cls}'s: torch has no fused {OPTIMIZERS[opt_name].cls}"
            trials[name] = functools.partial(_noted, note, trial, case_of(stand_in), build, ctx)
    return trials


def _noted(note: str, make: Callable[..., Trial], *args: Any) -> Trial:
    return replace(make(*args), describe=lambda: note)


def run_host(report: Report, opt_names: Sequence[str], builders: Mapping[str, Builder], ctx: Context) -> None:
    """Host time per step of every selected optimizer's paths on HOST_PARAMS (fp32), into `report`."""
    pset = HOST_PARAMS["smoke" if ctx.smoke else "host"]
    budget = HOST_BUDGET.smoke() if ctx.smoke else HOST_BUDGET
    cases: dict[str, Case] = {}

    def case_of(name: str) -> Case:
        if name not in cases:
            cases[name] = make_case(OPTIMIZERS[name], "host", pset, torch.float32, ctx.device)
        return cases[name]

    for opt_name in opt_names:
        trials = host_trials(opt_name, builders, ctx, case_of)
        report.add(
            run_paths(case_of(opt_name).columns(), trials, ctx.device, budget, None, 0.0), HOST_BASELINES
        )


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

CASE_COLUMNS = ("optimizer", "params", "dtype", "n_tensors", "numel", "source")
TABLE = [
    col("optimizer"),
    col("params"),
    col("dtype"),
    col("path"),
    status_column(),
    ms_column(),
    col("gbps", "GB/s", ".1f"),
    pct_copy_column(),
    speedup_column(),
    col("reliable"),
]
SUMMARY = Summary(("optimizer", "params", "dtype"), ms_pct_cell)
CHART = Chart(("params", "dtype"), ("optimizer",), "pct_copy", "% of copy bandwidth (higher is better)")
HOST_TABLE = [
    col("optimizer"),
    col("path"),
    status_column(),
    ms_column("µs"),
    speedup_column(),
    col("best_torch", "over"),
    col("reliable"),
    note_column(),
]
HOST_SUMMARY = Summary(("optimizer",), lambda row: f"{num(row, 'ms') * 1e3:.0f} µs")
# What run_all.py --report prints for each CSV stem: its full table and its summary.
OUTPUTS = {"optim": (TABLE, SUMMARY), "optim_host": (HOST_TABLE, HOST_SUMMARY)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--optimizer",
        type=choice_list(tuple(OPTIMIZERS), "optimizer"),
        default=list(OPTIMIZERS),
        help=f"comma-separated: {', '.join(OPTIMIZERS)} (default: all)",
    )
    p.add_argument(
        "--params",
        type=choice_list(tuple(PARAM_SETS), "parameter list"),
        default=None,
        help=f"comma-separated: {', '.join(PARAM_SETS)} (default depends on device)",
    )
    add_paths_option(p, tuple(BUILDERS))
    p.add_argument(
        "--no-host",
        dest="host",
        action="store_false",
        help=f"skip the host-time table (a step over {RESNET50_TENSORS} one-element tensors; ~15 s on a CPU)",
    )
    args = finish_args(p.parse_args(argv))
    if args.params is None:
        args.params = DEFAULT_PARAMS["smoke" if args.smoke else args.device.type]
    return args


def _header_lines(ctx: Context, sets: Mapping[str, ParamSet], dtypes: Sequence[torch.dtype]) -> list[str]:
    auto = ", ".join(f"{DTYPE_SHORT[d]}: {backends.choose(ctx.device, d, 'auto')}" for d in dtypes)
    lines = [f"resfast backend='auto' here -> {auto}"]
    for name, s in sets.items():
        lines.append(
            f"params {name}: {len(s.shapes)} tensors, {sum(map(_numel, s.shapes)):,} elements ({s.source})"
        )
    lines.append(
        f"check: {CHECK_STEPS} steps from identical state vs resfast's reference backend, every param and "
        f"state within max({ULPS} eps(dtype), {FP32_TOL:g}; {CLIP_TOL:g} for +clip rows) of its magnitude "
        "(see bench_optim.tolerance); "
        "bytes/element = (3 + 2 x states + norm reads) x itemsize"
    )
    return lines


def _numel(shape: Shape) -> int:
    return int(torch.Size(shape).numel())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context.from_args(args)
    budget = Budget().smoke() if args.smoke else Budget()
    env = start(args.device, args.smoke)
    report = Report(result_name("optim", args), env, args.out, CASE_COLUMNS)
    builders = {name: BUILDERS[name] for name in args.paths or default_paths(tuple(BUILDERS), args.device)}
    sets: dict[str, ParamSet] = {}
    with StopOnInterrupt() as stop:
        for params_name in args.params:
            try:
                sets[params_name] = PARAM_SETS[params_name]()
            except Skip as e:
                print(f"skipping params {params_name}: {e}")
                continue
            for dtype in args.dtypes:
                for opt_name in args.optimizer:
                    case = make_case(OPTIMIZERS[opt_name], params_name, sets[params_name], dtype, args.device)
                    report.add(run_case(case, builders, ctx, budget, env.copy_gbps), TORCH_PATHS)
                    del case
                    release(args.device)
    report.finish(TABLE, SUMMARY, CHART, _header_lines(ctx, sets, args.dtypes))
    if not args.host or stop.interrupted:
        return EXIT_INTERRUPTED if stop.interrupted else 0
    host = Report(result_name("optim_host", args), env, args.out, CASE_COLUMNS)
    with StopOnInterrupt() as stop:
        run_host(host, args.optimizer, builders, ctx)
    host.finish(HOST_TABLE, HOST_SUMMARY, None, _host_lines(ctx))
    return EXIT_INTERRUPTED if stop.interrupted else 0


def _host_lines(ctx: Context) -> list[str]:
    pset = HOST_PARAMS["smoke" if ctx.smoke else "host"]
    return [
        f"host time per step: {pset.source}, fp32; each sample {HOST_BUDGET.host_calls} steps back to "
        "back then a device sync, no cache flush; every path checked against the reference first",
        "torch-fused of RMSprop: torch's fused Adagrad (torch has no fused RMSprop; the same three lists); "
        "of LARS: torch's fused SGD-momentum (torch has no LARS; the same lists)",
        "+clip rows: torch's paths run clip_grad_norm_ (foreach) then the step; resfast's take max_grad_norm",
    ]


if __name__ == "__main__":
    sys.exit(main())
