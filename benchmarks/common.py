"""What resfast's benchmarks share: device and CLI parsing, timing, byte counting, the correctness
gate every path passes before it is timed, and the CSV / table / PNG outputs.

The method, the same in every script:

- A *case* (an optimizer over a parameter list, a BN shape, a model) is run by several *paths*
  (torch's for-loop, foreach, fused and compiled versions, resfast's backends). Each path first runs
  from the same inputs as a reference and is compared with it; a path that disagrees is reported as
  WRONG and never timed, so no speed-up is ever shown for a wrong result.
- Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call): median
  and 20th/80th percentiles. On CPU, the same statistics over repeated wall-clock calls. Warm-up
  calls come first (they also finish any compilation) and are never timed.
- Bandwidth: GB/s from the *minimal* byte count (each input read once, each output written once),
  beside the device-to-device copy bandwidth measured in the same run (bytes read + bytes written),
  so "% of copy" says how close a path gets to what the memory system can do.
- Every CSV row carries the device name, torch/triton versions, commit and date.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from resfast import backends
from resfast.backends import BackendUnavailable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# ----------------------------------------------------------------------------------------------------
# Devices, environment, command line
# ----------------------------------------------------------------------------------------------------

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def parse_device(text: str) -> torch.device:
    """cpu, cuda or cuda:N; an unknown name or a GPU that is not there is a ValueError saying so."""
    name = text.strip().lower()
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"unknown device {text!r}; choose from: {', '.join(DEVICE_CHOICES)}")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {text!r}: CUDA is not available here (torch {torch.__version__}); choose from: cpu"
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def default_device() -> torch.device:
    return parse_device("cuda" if torch.cuda.is_available() else "cpu")


def parse_choices(text: str, choices: Sequence[str], what: str, aliases: Mapping[str, str] = {}) -> list[str]:
    """A comma-separated selection from `choices` (case-insensitive; 'all' selects every one)."""
    names = [aliases.get(n.strip().lower(), n.strip()) for n in text.split(",") if n.strip()]
    if [n.lower() for n in names] == ["all"]:
        return list(choices)
    lookup = {c.lower(): c for c in choices}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown or not names:
        given = ", ".join(map(repr, unknown)) or "(nothing)"
        raise ValueError(
            f"unknown {what} {given}; choose from: {', '.join(choices)} (comma-separated, or 'all')"
        )
    return list(dict.fromkeys(lookup[n.lower()] for n in names))


def choice_list(choices: Sequence[str], what: str, aliases: Mapping[str, str] = {}) -> Callable[[str], list]:
    """An argparse `type` for a comma-separated selection; its error lists the choices."""

    def parse(text: str) -> list[str]:
        try:
            return parse_choices(text, choices, what, aliases)
        except ValueError as e:  # argparse shows an ArgumentTypeError's message as it is
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def device_arg(text: str) -> torch.device:
    try:
        return parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tag_arg(text: str) -> str:
    # Letters, digits, '.', '_' and '-' only: the tag becomes part of file names.
    if not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(f"tag {text!r}: use letters, digits, '.', '_' and '-' only")
    return text


def result_name(bench: str, args: argparse.Namespace) -> str:
    """The file stem of a run's CSV and PNG: the benchmark, then its --tag if any."""
    return f"{bench}-{args.tag}" if args.tag else bench


def base_parser(
    description: str, default_dtypes: str = "float32,bfloat16", dtypes: Sequence[str] = tuple(DTYPES)
) -> argparse.ArgumentParser:
    """The options every benchmark has; each script adds its own case and path selections."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda if present)"
    )
    p.add_argument(
        "--dtype",
        type=choice_list(dtypes, "dtype", DTYPE_ALIASES),
        default=default_dtypes,  # argparse passes a string default through `type`
        help=f"comma-separated: {', '.join(dtypes)} (or fp32, bf16, fp16); default {default_dtypes}",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes and few repetitions: checks the script runs"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results root; files go to OUT/<device>/ (default: benchmarks/results; a temp dir with --smoke)",
    )
    p.add_argument(
        "--tag",
        type=tag_arg,
        default=None,
        help="name results <bench>-<tag>.csv/.png, so that runs of different selections sit side by side",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="time torch.compile rows: auto = on CUDA only (compiling takes minutes on a small CPU)",
    )
    return p


# resfast backends worth a row on each device type: those that can run its tensors, at least once built.
RESFAST_BACKENDS = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "triton", "reference")}


def add_paths_option(p: argparse.ArgumentParser, paths: Sequence[str]) -> None:
    p.add_argument(
        "--paths",
        type=choice_list(paths, "path"),
        default=None,
        help=f"comma-separated subset of: {', '.join(paths)} (default: all that apply to the device)",
    )


def default_paths(paths: Sequence[str], device: torch.device) -> list[str]:
    """Every path but resfast backends for another device type (resfast-cuda on a CPU, ...)."""
    mine = {f"resfast-{b}" for b in RESFAST_BACKENDS[device.type]}
    return [p for p in paths if not p.startswith("resfast-") or p in mine]


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on the machine (device, output folder)."""
    args.device = args.device or default_device()
    args.dtypes = [DTYPES[name] for name in getattr(args, "dtype", ())]
    if args.out is None:
        # Smoke runs check that a script works; their numbers must never overwrite real results.
        args.out = Path(tempfile.gettempdir()) / "resfast-bench-smoke" if args.smoke else RESULTS
    return args


@dataclass(frozen=True)
class Context:
    """What a path's builder needs to know about the run."""

    device: torch.device
    smoke: bool
    compile_skip: str | None = None  # why torch.compile rows are not run, or None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        return cls(args.device, args.smoke, compile_skip_reason(args))

    def require_compile(self) -> None:
        if self.compile_skip:
            raise Skip(self.compile_skip)

    def require_backend(self, backend: str, dtype: torch.dtype) -> None:
        """Raise (a SKIP row) when resfast's `backend` cannot be timed here, saying why."""
        if backend == "triton" and self.device.type == "cpu" and not self.smoke:
            # The interpreter checks kernels' correctness; its speed means nothing.
            raise Skip("triton on CPU runs only under the interpreter (TRITON_INTERPRET=1): run with --smoke")
        backends.choose(self.device, dtype, backend)


def resfast_builders(build: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """A resfast-<backend> path per backend, from a builder taking a `backend` keyword."""
    return {
        f"resfast-{b}": functools.partial(build, backend=b) for b in ("cuda", "triton", "cpu", "reference")
    }


def compile_skip_reason(args: argparse.Namespace) -> str | None:
    """None when torch.compile rows run, else the reason written in their rows."""
    if args.compile == "on":
        return None
    if args.compile == "off":
        return "torch.compile not run (--compile off)"
    if args.device.type == "cpu":
        return (
            "torch.compile not run on CPU by default (compiling takes minutes on a small CPU; --compile on)"
        )
    return None


@dataclass(frozen=True)
class Env:
    """Where and with what a run was made; every row carries it."""

    device: torch.device
    name: str
    slug: str
    torch: str
    triton: str
    commit: str
    date: str
    load: str  # 1-minute load average at the start: CPU figures from a busy machine are noisy

    def columns(self) -> dict[str, str]:
        return {
            "device": self.name,
            "torch": self.torch,
            "triton": self.triton,
            "commit": self.commit,
            "date": self.date,
            "load_avg": self.load,
        }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """Folder name of a device's results: the GPU's name, or cpu-<model> (CPU names lack 'cpu')."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(_cpu_name()).removeprefix("cpu-")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def start(device: torch.device, smoke: bool, extra: Sequence[str] = ()) -> tuple[Env, float]:
    """Begin a run: freeze what is alive (torch's modules) out of the garbage collector's scans,
    measure the copy bandwidth and print the header. Returns the environment and the bandwidth."""
    # release() collects garbage after every path; without the freeze each collection would scan
    # every object torch created at import (~0.25 s each on a small CPU).
    gc.freeze()
    env = environment(device)
    copy_gbps = copy_bandwidth(device, smoke)
    print(header_text(env.columns(), copy_gbps, extra), flush=True)
    return env, copy_gbps


def environment(device: torch.device) -> Env:
    return Env(
        device=device,
        name=device_name(device),
        slug=device_slug(device),
        torch=torch.__version__,
        triton=_version("triton"),
        commit=_commit(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load=f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown",
    )


def optional_attr(module: str, name: str) -> tuple[Any, str | None]:
    """(module.name, None), or (None, why not): resfast's own parts may not be built or written yet."""
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as e:  # any failure means the part is absent here; keep the reason to print it
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------
# Timing and bandwidth
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long one path is timed. do_bench takes milliseconds of warm-up and repetition; on CPU a
    loop samples calls until `cpu_seconds` have passed, between `cpu_min_reps` and `cpu_max_reps`."""

    warmup_calls: int = 1  # untimed calls right before timing (compilation, allocator, autotuning)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_seconds: float = 0.5  # a default CPU run of all three benchmarks takes a few minutes
    cpu_min_reps: int = 5
    cpu_max_reps: int = 50
    # CPU: bytes written before every sample to evict the last-level cache (32 MB here), as do_bench
    # flushes the GPU's L2: every call starts from memory, whatever the size of its data.
    cpu_flush_bytes: int = 128 << 20

    def smoke(self) -> Budget:
        # The correctness check before timing has already run each path a few times.
        return replace(
            self,
            warmup_calls=0,
            warmup_ms=1.0,
            rep_ms=5.0,
            cpu_seconds=0.0,
            cpu_min_reps=1,
            cpu_flush_bytes=0,
        )


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    p20: float
    p80: float


def _clear_grads(tensors: Iterable[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def bench(
    fn: Callable[[], object], device: torch.device, budget: Budget, grad_to_none: Sequence[Tensor] = ()
) -> Timing:
    """Median and 20th/80th percentile milliseconds of fn() on `device`, after warm-up calls.
    `grad_to_none` tensors get `.grad = None` before every call, outside the timed region."""
    for _ in range(budget.warmup_calls):
        _clear_grads(grad_to_none)
        fn()
    if device.type == "cuda":
        from triton.testing import do_bench  # CUDA only: CPU runs must not need a working Triton

        median, p20, p80 = do_bench(
            fn,
            warmup=budget.warmup_ms,
            rep=budget.rep_ms,
            grad_to_none=list(grad_to_none) or None,
            quantiles=[0.5, 0.2, 0.8],
        )
        return Timing(median, p20, p80)
    return _wall_clock(fn, budget, grad_to_none)


def _wall_clock(fn: Callable[[], object], budget: Budget, grad_to_none: Sequence[Tensor]) -> Timing:
    flush = torch.empty(budget.cpu_flush_bytes // 4)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < budget.cpu_min_reps or (
        time.perf_counter() - start < budget.cpu_seconds and len(samples) < budget.cpu_max_reps
    ):
        _clear_grads(grad_to_none)
        flush.zero_()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    # Percentiles by linear interpolation between samples; with few samples they lie near min/max.
    p20, _, _, p80 = (
        statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    )
    return Timing(statistics.median(samples), p20, p80)


def gbps(nbytes: int, ms: float) -> float:
    """GB/s (10^9 bytes per second) for `nbytes` moved in `ms` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def elementwise_bytes(numel: int, itemsize: int, reads: int, writes: int) -> int:
    """Minimal bytes of an elementwise pass: each of `reads` inputs read once, each of `writes`
    outputs written once, all of `numel` elements of `itemsize` bytes."""
    return numel * itemsize * (reads + writes)


def copy_bandwidth(device: torch.device, smoke: bool = False) -> float:
    """GB/s of one large device-to-device copy, counting bytes read plus bytes written.

    Sizes are far beyond the last-level cache (H100 L2: 50 MB; CPUs: tens of MB), so this is memory
    bandwidth, the ceiling every elementwise path here is judged against."""
    nbytes = 16 << 20 if smoke else (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    budget = Budget(warmup_calls=2, cpu_seconds=1.0, cpu_min_reps=5)
    timing = bench(lambda: dst.copy_(src), device, budget.smoke() if smoke else budget)
    return gbps(elementwise_bytes(src.numel(), 4, reads=1, writes=1), timing.ms)


# ----------------------------------------------------------------------------------------------------
# Correctness measures
# ----------------------------------------------------------------------------------------------------


def max_abs_err(got: Tensor, want: Tensor) -> float:
    """max|got - want| in float64; inf when shapes differ or a NaN appears anywhere: NaN never passes."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    diff = (got.detach().to(want.device).double() - want.detach().double()).abs_()
    return math.inf if diff.isnan().any() else diff.max().item()


def max_rel_err(got: Tensor, want: Tensor) -> float:
    """max|got - want| / max|want| (the absolute error when want is all zero); inf as max_abs_err."""
    err = max_abs_err(got, want)
    scale = want.detach().double().abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 and math.isfinite(err) else err


def l2_rel_err(got: Tensor, want: Tensor) -> float:
    """‖got - want‖ / ‖want‖ in float64; inf on shape mismatch or NaN.

    Used where a few elements may legitimately flip sides of ReLU's kink under rounding (a max-based
    error would then measure the flip, not the kernel)."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    want64 = want.detach().double()
    err = (got.detach().to(want64.device).double() - want64).norm().item()
    if math.isnan(err):
        return math.inf
    scale = want64.norm().item()
    return err / scale if scale > 0 else err


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def failures(errors: Mapping[str, float], bounds: Mapping[str, float]) -> str | None:
    """None if every error is within its bound (NaN never is), else how many are not and the worst."""
    bad = {k: e for k, e in errors.items() if not e <= bounds[k]}
    if not bad:
        return None
    worst = max(bad, key=lambda k: bad[k] / bounds[k] if bounds[k] > 0 else math.inf)
    return (
        f"{len(bad)} of {len(errors)} outputs differ from the reference; worst {worst}: "
        f"error {bad[worst]:.3g} > tolerance {bounds[worst]:.3g}"
    )


# ----------------------------------------------------------------------------------------------------
# Evaluating one path: build, check, time
# ----------------------------------------------------------------------------------------------------


class Skip(Exception):
    """A path that cannot run here; its message is written in the row."""


@dataclass
class Trial:
    """A path ready to run. `check` runs it from the case's shared inputs and returns None if the
    result agrees with the reference, else what disagrees. `step` is the call that is timed."""

    step: Callable[[], object]
    check: Callable[[], str | None]
    grad_to_none: Sequence[Tensor] = ()
    describe: Callable[[], str] = lambda: ""


@dataclass
class Outcome:
    status: str  # ok | WRONG (disagrees: never timed) | SKIP (not available here) | ERROR (crashed)
    timing: Timing | None = None
    note: str = ""
    warmup_s: float | None = None  # wall time of the check (includes compilation)
    peak_mib: float | None = None  # CUDA: peak memory this path allocated above what was live before


# Exceptions that mean "this path does not exist here" rather than "it broke".
_SKIPS = (Skip, BackendUnavailable, NotImplementedError)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _attempt(build: Callable[[], Trial], device: torch.device, budget: Budget) -> Outcome:
    base = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        trial = build()
        start = time.perf_counter()
        why = trial.check()
        warmup_s = time.perf_counter() - start
        if why is not None:
            return Outcome("WRONG", note=why, warmup_s=warmup_s)
        timing = bench(trial.step, device, budget, trial.grad_to_none)
    except _SKIPS as e:
        # BackendUnavailable goes on to list every other backend; the row needs only its own reason.
        return Outcome("SKIP", note=_one_line(e).split(". Other backends")[0])
    except Exception as e:  # one broken path must not stop the suite: its row says what happened
        return Outcome("ERROR", note=f"{type(e).__name__}: {_one_line(e)}")
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return Outcome("ok", timing, trial.describe(), warmup_s, peak)


def run_paths(
    case: Mapping[str, Any],
    trials: Mapping[str, Callable[[], Trial]],
    device: torch.device,
    budget: Budget,
    nbytes: int | None,
    copy_gbps: float,
) -> list[dict]:
    """One row per path of a case: built, checked against the reference and, if it agrees, timed."""
    return [
        outcome_row(case, name, evaluate(build, device, budget), nbytes, copy_gbps)
        for name, build in trials.items()
    ]


def evaluate(build: Callable[[], Trial], device: torch.device, budget: Budget) -> Outcome:
    """Build a path, check it against the reference and, only if it agrees, time it."""
    outcome = _attempt(build, device, budget)
    release(device)
    return outcome


def release(device: torch.device) -> None:
    """Free what the last path held, so the next one starts from the same memory."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with dynamo's caches reset first. Every case compiles afresh: otherwise the
    same code (opt.step, one BN expression) recompiled for many cases would pass dynamo's recompile
    limit and silently run eager while its row says "compile"."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(fn)


def compile_stats() -> str:
    """Graphs and graph breaks dynamo recorded since the last `compiled` call."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    return f"graphs={counters['stats']['unique_graphs']} graph_breaks={breaks}"


# ----------------------------------------------------------------------------------------------------
# Rows, CSV, tables, charts
# ----------------------------------------------------------------------------------------------------

TIMING_COLUMNS = (
    "path",
    "status",
    "ms",
    "ms_p20",
    "ms_p80",
    "gbps",
    "pct_copy",
    "speedup",
    "best_torch",
    "warmup_s",
    "peak_mib",
    "note",
)
ENV_COLUMNS = ("device", "torch", "triton", "commit", "date", "load_avg", "copy_gbps")


def outcome_row(case: Mapping[str, Any], path: str, o: Outcome, nbytes: int | None, copy_gbps: float) -> dict:
    """One row: the case's columns, the path's outcome and, when timed and bytes are counted, GB/s."""
    row: dict[str, Any] = {
        **case,
        "path": path,
        "status": o.status,
        "note": o.note,
        "warmup_s": o.warmup_s,
        "peak_mib": o.peak_mib,
    }
    if o.timing is not None:
        row.update(ms=o.timing.ms, ms_p20=o.timing.p20, ms_p80=o.timing.p80)
        if nbytes is not None:
            row["gbps"] = gbps(nbytes, o.timing.ms)
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    return row


def add_speedups(rows: list[dict], baselines: Collection[str]) -> None:
    """speedup = (fastest correct PyTorch path's ms) / (this row's ms), within one case's rows."""
    timed = [r for r in rows if r["status"] == "ok" and r["path"] in baselines]
    if not timed:
        return
    best = min(timed, key=lambda r: r["ms"])
    for r in rows:
        if r["status"] == "ok":
            r["speedup"] = best["ms"] / r["ms"]
            r["best_torch"] = best["path"]


def num(row: Mapping[str, Any], key: str) -> float | None:
    """A row's number, whether the row was just made or read back from a CSV."""
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Column:
    header: str
    render: Callable[[Mapping[str, Any]], str]


def col(key: str, header: str | None = None, spec: str | None = None) -> Column:
    """A table column showing row[key], formatted with `spec` when it is a number."""

    def render(row: Mapping[str, Any]) -> str:
        value = num(row, key) if spec else None
        if value is not None:
            return format(value, spec)
        text = row.get(key)
        return "" if text is None else str(text)

    return Column(header or key, render)


def fmt_ms(ms: float) -> str:
    """Milliseconds with 3-4 significant digits and never an exponent (1500, 21.3, 0.0512)."""
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def ms_column() -> Column:
    """Median ms with the 20th-80th percentile spread."""

    def render(row: Mapping[str, Any]) -> str:
        ms, lo, hi = num(row, "ms"), num(row, "ms_p20"), num(row, "ms_p80")
        return "" if ms is None or lo is None or hi is None else f"{fmt_ms(ms)} ({fmt_ms(lo)}-{fmt_ms(hi)})"

    return Column("ms (p20-p80)", render)


def status_column() -> Column:
    """The status, with the reason for anything but ok (a WRONG row says what disagreed)."""

    def render(row: Mapping[str, Any]) -> str:
        status, note = str(row.get("status", "")), str(row.get("note") or "")
        if status == "ok" or not note:
            return status
        # The CSV keeps the whole reason; the table shows its start.
        return f"{status}: {note[:100]}..." if len(note) > 100 else f"{status}: {note}"

    return Column("status", render)


def note_column() -> Column:
    """The note of a timed row (e.g. a compiled path's graph breaks); other rows show theirs in status."""

    def render(row: Mapping[str, Any]) -> str:
        return str(row.get("note") or "") if row.get("status") == "ok" else ""

    return Column("note", render)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table (pipes escaped), readable in a terminal and pasteable into RESULTS.md."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [c.render(row).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_text(env: Mapping[str, Any], copy_gbps: float | str, extra: Sequence[str] = ()) -> str:
    """The lines that say where and with what figures were measured (`env`: Env.columns() or a CSV row)."""
    lines = [
        f"device: {env['device']}",
        f"torch {env['torch']}, triton {env['triton']}, resfast commit {env['commit']}, {env['date']}, "
        f"load average {env.get('load_avg', 'unknown')} at the start",
        f"device-to-device copy bandwidth (read + write): {float(copy_gbps):.1f} GB/s",
        *extra,
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Summary:
    """A compact table: one line per case, one column per path, and the best resfast speed-up."""

    case_keys: tuple[str, ...]
    cell: Callable[[Mapping[str, Any]], str]  # what a checked and timed row shows


def summary_table(rows: Sequence[Mapping[str, Any]], summary: Summary) -> str:
    cases: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        cases.setdefault(tuple(str(row.get(k, "")) for k in summary.case_keys), {})[str(row["path"])] = row
    paths = list(dict.fromkeys(str(row["path"]) for row in rows))
    lines = [
        "| " + " | ".join([*summary.case_keys, *paths, "best resfast vs best torch"]) + " |",
        "|" + "---|" * (len(summary.case_keys) + len(paths) + 1),
    ]
    for key, by_path in cases.items():
        cells = [_summary_cell(by_path.get(p), summary) for p in paths]
        lines.append("| " + " | ".join([*key, *cells, _best_resfast(by_path.values())]) + " |")
    return "\n".join(lines)


def _summary_cell(row: Mapping[str, Any] | None, summary: Summary) -> str:
    if row is None:
        return ""
    status = row.get("status")
    return summary.cell(row) if status == "ok" else "-" if status == "SKIP" else str(status)


def _best_resfast(rows: Iterable[Mapping[str, Any]]) -> str:
    timed = [r for r in rows if str(r["path"]).startswith("resfast") and num(r, "speedup") is not None]
    if not timed:
        return ""
    best = max(timed, key=lambda r: num(r, "speedup") or 0.0)
    return f"{num(best, 'speedup'):.2f}x ({best['path']} vs {best.get('best_torch', '')})"


def ms_pct_cell(row: Mapping[str, Any]) -> str:
    """ms and % of copy bandwidth, for the kernel benchmarks' summaries."""
    ms, pct = num(row, "ms"), num(row, "pct_copy")
    return ("" if ms is None else f"{fmt_ms(ms)} ms") + (f" ({pct:.0f}%)" if pct is not None else "")


@dataclass(frozen=True)
class Chart:
    """A PNG of grouped horizontal bars: one panel per value of `panel_keys`, one group of bars per
    value of `group_keys`, one bar colour per path; only rows that were checked and timed."""

    panel_keys: tuple[str, ...]
    group_keys: tuple[str, ...]
    value_key: str
    xlabel: str


def _label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return " ".join(str(row.get(k, "")) for k in keys)


def bar_chart(rows: Sequence[Mapping[str, Any]], chart: Chart, title: str, path: Path) -> Path | None:
    """Write the chart; returns None (and says why) when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no chart: matplotlib cannot be imported ({e})")
        return None
    timed = [r for r in rows if r.get("status") == "ok" and num(r, chart.value_key) is not None]
    if not timed:
        print(f"no chart: no timed rows for {path.name}")
        return None
    panels = list(dict.fromkeys(_label(r, chart.panel_keys) for r in timed))
    series = list(dict.fromkeys(str(r["path"]) for r in timed))
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    tallest = max(
        len({_label(r, chart.group_keys) for r in timed if _label(r, chart.panel_keys) == p}) for p in panels
    )
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(7.5 * ncols, nrows * (1.2 + 0.22 * tallest * len(series))), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for ax, panel in zip(axes.flat, panels, strict=False):
        mine = [r for r in timed if _label(r, chart.panel_keys) == panel]
        groups = list(dict.fromkeys(_label(r, chart.group_keys) for r in mine))
        height = 0.8 / len(series)
        for s, name in enumerate(series):
            values = {_label(r, chart.group_keys): num(r, chart.value_key) for r in mine if r["path"] == name}
            ys = [g + s * height for g, group in enumerate(groups) if group in values]
            ax.barh(ys, [values[g] for g in groups if g in values], height, color=colours(s % 10), label=name)
        ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], groups, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(chart.xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(series), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9, y=0.0, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.35 / (nrows * (1.2 + 0.22 * tallest * len(series)))))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class Report:
    """One benchmark's output: rows are written to <out>/<device>/<name>.csv as each case finishes
    (a run cut short keeps what it measured), then `finish` prints the table and writes the PNG."""

    name: str
    env: Env
    copy_gbps: float
    out_root: Path
    columns: Sequence[str]  # the case's columns (what was run), then TIMING_COLUMNS
    metrics: Sequence[str] = ()  # extra measured columns (e.g. img/s)
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.out_root / self.env.slug
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / f"{self.name}.csv"
        self._all_columns = [*self.columns, *TIMING_COLUMNS, *self.metrics, *ENV_COLUMNS]
        with self.csv_path.open("w", newline="") as f:
            csv.DictWriter(f, self._all_columns, extrasaction="ignore").writeheader()

    def add(self, rows: list[dict], baselines: Collection[str]) -> None:
        add_speedups(rows, baselines)
        env = {**self.env.columns(), "copy_gbps": self.copy_gbps}
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self._all_columns, extrasaction="ignore")
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in {**row, **env}.items()})
        for row in rows:
            self.rows.append(row)
            _progress(row, self.columns)

    def finish(
        self, table: Sequence[Column], summary: Summary, chart: Chart, extra: Sequence[str] = ()
    ) -> None:
        print()
        print(format_table(self.rows, table))
        print()
        print(header_text(self.env.columns(), self.copy_gbps, extra))
        print()
        print(summary_table(self.rows, summary))
        png = bar_chart(
            self.rows,
            chart,
            f"{self.env.name} · torch {self.env.torch} · {self.env.date}",
            self.dir / f"{self.name}.png",
        )
        print(f"\nwrote {self.csv_path}" + (f" and {png}" if png else ""))


def _progress(row: Mapping[str, Any], case_columns: Sequence[str]) -> None:
    case = " ".join(str(row.get(k, "")) for k in case_columns)
    ms = num(row, "ms")
    timing = f"{ms:9.4g} ms" if ms is not None else " " * 12
    print(f"{case:<44} {row['path']:<20} {timing}  {row['status']} {row.get('note') or ''}", flush=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
