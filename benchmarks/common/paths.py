"""Evaluating one path of a case: build it, check it against the reference and, only if it agrees,
time it; then its row."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import timing
from resfast.backends import BackendUnavailable


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
    timing: timing.Timing | None = None
    note: str = ""
    warmup_s: float | None = None  # wall time of the check (includes compilation)
    peak_mib: float | None = None  # CUDA: peak memory this path allocated above what was live before


# Exceptions that mean "this path does not exist here" rather than "it broke".
_SKIPS = (Skip, BackendUnavailable, NotImplementedError)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _attempt(build: Callable[[], Trial], device: torch.device, budget: timing.Budget) -> Outcome:
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
        measured = timing.bench(trial.step, device, budget, trial.grad_to_none)
    except _SKIPS as e:
        # BackendUnavailable goes on to list every other backend; the row needs only its own reason.
        return Outcome("SKIP", note=_one_line(e).split(". Other backends")[0])
    except Exception as e:  # one broken path must not stop the suite: its row says what happened
        return Outcome("ERROR", note=f"{type(e).__name__}: {_one_line(e)}")
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return Outcome("ok", measured, trial.describe(), warmup_s, peak)


def evaluate(build: Callable[[], Trial], device: torch.device, budget: timing.Budget) -> Outcome:
    """Build a path, check it against the reference and, only if it agrees, time it."""
    outcome = _attempt(build, device, budget)
    release(device)
    return outcome


def run_paths(
    case: Mapping[str, Any],
    trials: Mapping[str, Callable[[], Trial]],
    device: torch.device,
    budget: timing.Budget,
    nbytes: int | None,
    copy_gbps: float,
) -> Iterator[dict]:
    """One row per path of a case, yielded as each path finishes (so that it can be written at once)."""
    for name, build in trials.items():
        yield outcome_row(case, name, evaluate(build, device, budget), nbytes, copy_gbps)


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
            row["gbps"] = timing.gbps(nbytes, o.timing.ms)
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    return row


def release(device: torch.device) -> None:
    """Free what the last path held, so the next one starts from the same memory."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
