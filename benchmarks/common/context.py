"""What a path's builder needs to know about the run: the device, whether torch.compile rows run,
which resfast backends can be timed here."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common.paths import Skip
from resfast import backends


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

    def require_backend(self, backend: str, dtype: torch.dtype, op: str = "optimizer") -> None:
        """Raise (a SKIP row) when resfast's `backend` cannot be timed here for `op` (an op of
        resfast.backends.KERNELS), saying why."""
        if backend == "triton" and self.device.type == "cpu" and not self.smoke:
            # The interpreter checks kernels' correctness; its speed means nothing.
            raise Skip("triton on CPU runs only under the interpreter (TRITON_INTERPRET=1): run with --smoke")
        backends.choose(self.device, dtype, backend, implemented=backends.implementing(op), op=op)


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


def resfast_builders(build: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """A resfast-<backend> path per backend, from a builder taking a `backend` keyword."""
    return {
        f"resfast-{b}": functools.partial(build, backend=b) for b in ("cuda", "triton", "cpu", "reference")
    }


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
