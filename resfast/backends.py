"""Which kernel backends exist on this machine, and which one runs a given (device, dtype).

Backends:

- ``reference``: plain PyTorch, one tensor at a time. The specification; always available.
- ``triton``: Triton kernels, one launch per (device, dtype) bucket. CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before resfast's Triton kernels were imported (slow; for tests).
- ``cuda`` / ``cpu``: the native extension ``resfast._C`` (CUDA C++ / C++), when it was built.

``auto`` picks the fastest available one for the tensors' device and dtype; the environment variable
``RESFAST_BACKEND`` overrides ``auto`` (not an explicit choice). When a requested backend cannot run,
the error says why, and ``info()`` shows the same reasons for every backend, per op.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KERNELS",
    "BackendUnavailable",
    "Info",
    "choose",
    "implementing",
    "info",
    "kernel_module",
    "native_runs",
    "validate",
]

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# The fused kernels compute in fp32 and store in these dtypes; anything else runs on `reference`.
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The backends whose optimizer kernels implement master weights and bf16 stochastic rounding (beyond
# torch); the native ones do not yet.
LOW_PRECISION_BACKENDS = ("triton", "reference")
# The environment variable that overrides `auto`.
ENV_VAR = "RESFAST_BACKEND"


# The kernels of each op family, per backend that implements it: `{op: {backend: loader}}`, the one
# table the optimizers, the fused BN, the training script and `info()` read. A loader imports its
# module on first use with an import statement (torch.compile runs those while it traces; it cannot
# trace importlib), so importing resfast never imports Triton or the native extension.
def _reference_optim() -> ModuleType:
    from resfast.kernels import reference_optim

    return reference_optim


def _triton_optim() -> ModuleType:
    from resfast.kernels import triton_optim

    return triton_optim


def _native_optim() -> ModuleType:
    from resfast.kernels import cext

    return cext


def _reference_bn() -> ModuleType:
    from resfast.kernels import reference_bn

    return reference_bn


def _triton_bn() -> ModuleType:
    from resfast.kernels import triton_bn

    return triton_bn


def _native_bn() -> ModuleType:
    from resfast.kernels import native_bn

    return native_bn


KERNELS: dict[str, dict[str, Callable[[], ModuleType]]] = {
    # Same functions with the same signatures in every module: sgd, rmsprop, adagrad, adam, lars.
    "optimizer": {
        "reference": _reference_optim,
        "triton": _triton_optim,
        "cpu": _native_optim,
        "cuda": _native_optim,
    },
    # batch_stats, forward, backward, grad_input; a module that also has `layer` runs a whole eager
    # layer, autograd included, in one call (resfast.nn.functional.apply_checked takes it when not
    # compiling). One native module for both devices: its ops dispatch on the tensors' device
    # (csrc/cpu/bn.cpp, csrc/cuda/bn.cu).
    "batch_norm_add_relu": {
        "reference": _reference_bn,
        "triton": _triton_bn,
        "cpu": _native_bn,
        "cuda": _native_bn,
    },
}


def implementing(op: str) -> tuple[str, ...]:
    """The backends that have kernels for `op` (a key of KERNELS), in BACKENDS order."""
    return tuple(b for b in BACKENDS[1:] if b in KERNELS[op])


def kernel_module(op: str, backend: str) -> ModuleType:
    """The kernel module of `op` for an available `backend` (see `choose`), imported on first use."""
    return KERNELS[op][backend]()


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run the given tensors here; the message says why."""


def validate(requested: str) -> str:
    """Check a backend name at construction time (before any state exists); for `auto`, check the
    environment variable that overrides it too."""
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        _auto_override()
    return requested


def _auto_override() -> str:
    """What `auto` means here: the backend named by RESFAST_BACKEND, or `auto` when it is unset or empty."""
    value = os.environ.get(ENV_VAR) or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"environment variable {ENV_VAR}={value!r} is not a backend; set it to one of "
            f"{', '.join(BACKENDS)}, or unset it"
        )
    return value


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as e:  # any failure to import means the backend is absent; keep the reason
        return f"triton cannot be imported ({type(e).__name__}: {e}); install it with `pip install triton`"
    return None


@functools.cache
def native_extension() -> tuple[Any, str | None]:
    """(module, None) when resfast._C imports and matches this torch, else (None, why not)."""
    try:
        ext = importlib.import_module("resfast._C")
    except ImportError as e:
        return None, (
            f"the native extension resfast._C is not built ({e}); reinstall with a C++ compiler "
            "(and nvcc for CUDA): pip install --no-build-isolation -e ."
        )
    except Exception as e:  # a broken binary (e.g. built against another torch) must not crash import
        return None, f"resfast._C failed to load ({type(e).__name__}: {e}); rebuild it against this torch"
    built_for = getattr(ext, "TORCH_VERSION", None)
    if built_for != torch.__version__.split("+")[0]:  # "2.14.1" vs "2.14.1+cu130": same release
        return None, (
            f"resfast._C was built for torch {built_for} but torch {torch.__version__} is installed; "
            "rebuild it: pip install --no-build-isolation -e ."
        )
    return ext, None


@functools.cache
def native_runs(device_type: str) -> bool:
    """Whether resfast._C loaded with kernels for tensors of this device type ("cpu" or "cuda")."""
    return (
        device_type in ("cpu", "cuda")
        and _why_not(device_type, torch.device(device_type), torch.float32) is None
    )


def _why_not(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `backend` can run tensors of this device and dtype, else the reason it cannot."""
    if backend == "reference":
        return None
    if dtype not in FAST_DTYPES:
        return f"{backend} kernels support float32, bfloat16 and float16, not {dtype}"
    if backend == "triton":
        if (err := _triton_import_error()) is not None:
            return err
        if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
            return None
        return f"triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"
    ext, err = native_extension()
    if err is not None:
        return err
    if backend == "cpu":
        return None if device.type == "cpu" else f"the cpu backend runs CPU tensors, not {device.type}"
    if backend == "cuda":
        if not getattr(ext, "HAS_CUDA", False):
            return (
                f"resfast._C was built without CUDA kernels ({getattr(ext, 'CUDA_SKIP_REASON', 'no nvcc')})"
            )
        return None if device.type == "cuda" else f"the cuda backend runs CUDA tensors, not {device.type}"
    raise AssertionError(backend)


# `auto`'s order of preference per device type: the first one that can run wins.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Ops whose order differs. The fused BN on a GPU prefers Triton to the CUDA C++ driver: neither has
# been timed on a GPU yet, the Triton kernels are the ones whose tests have run on a GPU's compiler
# (tests/test_triton_sm90.py), and the CUDA driver's logic has run only on the host. `cuda` is an
# explicit choice until benchmarks/bench_bn.py has compared the two on a GPU.
_AUTO_ORDER_BY_OP = {"batch_norm_add_relu": {"cuda": ("triton", "cuda", "reference")}}


def _status(
    backend: str, device: torch.device, dtype: torch.dtype, implemented: tuple[str, ...], op: str
) -> str:
    if backend not in implemented:
        return f"no {op} kernels"
    return _why_not(backend, device, dtype) or "available"


@functools.cache
def _choose(
    device: torch.device, dtype: torch.dtype, requested: str, implemented: tuple[str, ...], op: str
) -> str:
    if requested == "auto":
        order = _AUTO_ORDER_BY_OP.get(op, _AUTO_ORDER).get(device.type) or _AUTO_ORDER.get(device.type)
        for candidate in order or ("reference",):
            if candidate in implemented and _why_not(candidate, device, dtype) is None:
                return candidate
        raise AssertionError("reference is always available")
    why = f"it has no {op} kernels" if requested not in implemented else _why_not(requested, device, dtype)
    if why is not None:
        others = "; ".join(
            f"{b}: {_status(b, device, dtype, implemented, op)}" for b in BACKENDS[1:] if b != requested
        )
        raise BackendUnavailable(
            f"backend {requested!r} cannot run {dtype} tensors on {device}: {why}. Other backends: {others}"
        )
    return requested


def _constant_under_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compiler.assume_constant_result` without its import of torch._dynamo (which imports
    Triton) when resfast is imported: that decorator only sets this attribute (tests check it still
    does)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# torch.compile evaluates the choice when it traces, rather than tracing the host-side machinery
# behind it (environment, imports, caches); a compiled function keeps the backend it was traced with.
@_constant_under_compile
def choose(
    device: torch.device | str,
    dtype: torch.dtype,
    requested: str = "auto",
    *,
    implemented: tuple[str, ...] = BACKENDS[1:],
    op: str = "optimizer",
) -> str:
    """The backend that runs `op` on tensors of `device` and `dtype` for a user's `requested` backend.

    `implemented` lists the backends that have kernels for the op: `auto` skips the others, and asking
    for one of them explicitly raises BackendUnavailable saying so."""
    if requested == "auto":
        requested = _auto_override()
    return _choose(torch.device(device), dtype, requested, implemented, op)


class Info(dict[str, str]):
    """What :func:`info` found, as a dict (topic -> finding) whose repr is a table."""

    def __repr__(self) -> str:
        width = max(map(len, self), default=0)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in self.items())


def _describe_extension() -> str:
    ext, why = native_extension()
    if ext is None:
        return f"not loaded: {why}"
    cuda = "built" if ext.HAS_CUDA else f"not built ({getattr(ext, 'CUDA_SKIP_REASON', 'no nvcc')})"
    isa = ext.cpu_kernel_isa()  # the instruction set torch itself runs (ATEN_CPU_CAPABILITY selects it)
    return f"loaded; CPU kernels for {isa}; CUDA kernels {cuda}"


def info() -> Info:
    """What each backend can run here (on the CPU, and on CUDA if a GPU is present) for each op, why
    not otherwise, and what `auto` picks. Printed, it is a table: ``print(resfast.backends.info())``."""
    ops = {
        "optimizers": implementing("optimizer"),
        "batch_norm_add_relu": implementing("batch_norm_add_relu"),
    }
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    report = Info()
    report["native extension (resfast._C)"] = _describe_extension()
    for backend in BACKENDS[1:]:
        reasons = [(d, _why_not(backend, d, torch.float32)) for d in devices]
        ok = [d.type for d, why in reasons if why is None]
        if not ok:
            report[backend] = "unavailable: " + "; ".join(f"{d.type}: {why}" for d, why in reasons)
            continue
        with_kernels = [op for op, implemented in ops.items() if backend in implemented]
        without = [op for op in ops if op not in with_kernels]
        report[backend] = f"available on {', '.join(ok)}: {', '.join(with_kernels)}" + (
            f" (no {', '.join(without)} kernels)" if without else ""
        )
    override = os.environ.get(ENV_VAR)
    if override:
        report[ENV_VAR] = f"{override!r} (replaces auto)"
    # What auto picks, per kind of work: the optimizers' dtypes, their low-precision modes, the BN.
    kinds = {
        "optimizers": (torch.float32, ops["optimizers"], "optimizer"),
        "float64/complex": (torch.float64, ops["optimizers"], "optimizer"),
        "master_weights/bf16_stochastic_rounding": (torch.bfloat16, LOW_PRECISION_BACKENDS, "optimizer"),
        "batch_norm_add_relu": (torch.float32, ops["batch_norm_add_relu"], "batch_norm_add_relu"),
    }
    for device in devices:
        picks = []
        for kind, (dtype, implemented, op) in kinds.items():
            try:
                picks.append(f"{kind}: {choose(device, dtype, 'auto', implemented=implemented, op=op)}")
            except (ValueError, BackendUnavailable) as e:  # RESFAST_BACKEND names a backend unfit here
                picks.append(f"{kind}: none ({e})")
        report[f"auto on {device.type}"] = "; ".join(picks)
    return report
