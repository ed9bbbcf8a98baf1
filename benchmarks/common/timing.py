"""Timers, byte counts and the copy bandwidth every elementwise path is judged against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Budget:
    """How long one path is timed. do_bench takes milliseconds of warm-up and repetition; on CPU a
    loop samples calls until `cpu_seconds` have passed, between `cpu_min_reps` and `cpu_max_reps`."""

    warmup_calls: int = 1  # untimed calls right before timing (compilation, allocator, autotuning)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_seconds: float = 0.5  # per path: keeps a default CPU run of all three benchmarks to minutes
    cpu_min_reps: int = 5
    cpu_max_reps: int = 50
    # CPU: bytes written before every sample to evict the last-level cache (32 MB here), as do_bench
    # flushes the GPU's L2: every call starts from memory, whatever the size of its data.
    cpu_flush_bytes: int = 128 << 20
    # > 0: time the host instead, on any device: each sample is this many back-to-back calls, then a
    # device synchronisation, divided by the count; nothing is flushed (a training loop's host data
    # stays in cache). Sampling stops as on the CPU (cpu_seconds, cpu_min_reps, cpu_max_reps).
    host_calls: int = 0

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
            host_calls=min(self.host_calls, 2),
        )


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    p20: float
    p80: float

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how far apart the middle 60% of the samples lie."""
        return (self.p80 - self.p20) / self.ms if self.ms > 0 else 0.0


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
    if budget.host_calls:
        return _sample(lambda: _host_calls(fn, device, budget.host_calls), budget)
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
    flush = torch.empty(budget.cpu_flush_bytes // 4)

    def one_call() -> float:
        _clear_grads(grad_to_none)
        flush.zero_()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return _sample(one_call, budget)


def _host_calls(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Milliseconds per call of `calls` back-to-back calls. With one-element tensors the device
    finishes each call before the host has issued the next, so this is the host's time per call."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / calls


def _sample(measure: Callable[[], float], budget: Budget) -> Timing:
    """Median and 20th/80th percentiles of `measure()` (ms), sampled as `budget` says."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < budget.cpu_min_reps or (
        time.perf_counter() - start < budget.cpu_seconds and len(samples) < budget.cpu_max_reps
    ):
        samples.append(measure())
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


def copy_bandwidth(device: torch.device, smoke: bool = False) -> tuple[float, float]:
    """GB/s of one large device-to-device copy, counting bytes read plus bytes written (from the
    median), and the spread of its timing (see Timing.spread).

    Sizes are far beyond the last-level cache (H100 L2: 50 MB; CPUs: tens of MB), so this is memory
    bandwidth, the ceiling every elementwise path here is judged against."""
    nbytes = 16 << 20 if smoke else (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    budget = Budget(warmup_calls=2, cpu_seconds=1.0, cpu_min_reps=5)
    timing = bench(lambda: dst.copy_(src), device, budget.smoke() if smoke else budget)
    return gbps(elementwise_bytes(src.numel(), 4, reads=1, writes=1), timing.ms), timing.spread
