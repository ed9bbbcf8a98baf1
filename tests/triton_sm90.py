"""Compile every Triton kernel specialisation that resfast's launchers produce for sm_90 (H100/H200),
with no GPU, and report what the generated code is: registers, spills, and the rounding of division
and square root. Run by tests/test_triton_sm90.py in a subprocess (the kernels must be imported as
real JIT functions, not under TRITON_INTERPRET=1):

    python -m tests.triton_sm90 OUT.json

How: every `JITFunction.run` (what `kernel[grid](...)` calls) is replaced by a recorder, and the
launchers are called with CPU tensors for a representative set of calls (every optimizer case of
tests/optim_cases.py in every dtype, with GradScaler, clipping, master weights and stochastic rounding; LARS's
norm pass and update with its options; the BN
passes in both layouts, all dtypes, odd and even spatial sizes, training and eval). Nothing runs.
Each distinct specialisation is then compiled as Triton itself would for an sm_90 device: Triton's
own binder turns the recorded arguments into the signature, constexprs and alignment attributes,
`triton.compile` produces PTX and a cubin (with Triton's own ptxas and options), and the cubin's
resource usage (registers, stack: where spills go) is read with the cuobjdump Triton ships.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)

# PTX instructions that round differently from IEEE (and from the CPU interpreter CI runs).
APPROXIMATE = ("div.full.f32", "div.approx", "sqrt.approx", "rsqrt.approx")


def _record(calls: list[tuple[JITFunction, tuple, dict]]) -> Callable[..., None]:
    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        # Tensors are kept by dtype and alignment only: compilation needs nothing else.
        calls.append((self, args, dict(kwargs)))

    return run


def _optimizer_calls() -> None:
    import resfast.optim
    from tests.optim_cases import CASES, DTYPES, OPTIMIZERS

    def step(name: str, dtype: torch.dtype, kwargs: dict, scaled: bool = False) -> None:
        params = [torch.zeros(n, dtype=dtype) for n in (5, 1030)]
        opt = getattr(resfast.optim, name)(params, backend="triton", **kwargs)
        for p in params:
            p.grad = torch.zeros_like(p)
        if scaled:  # what GradScaler.step sets on an optimizer that unscales inside its kernels
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
        opt.step()

    for name, kwargs in CASES:
        for dtype in DTYPES:
            step(name, dtype, kwargs)
    for name in OPTIMIZERS:
        for dtype in DTYPES:
            step(name, dtype, {}, scaled=True)
            step(name, dtype, {"max_grad_norm": 1.0}, scaled=True)  # the clip factor's operand
        for dtype in (torch.bfloat16, torch.float16):
            step(name, dtype, {"master_weights": True})
        step(name, torch.bfloat16, {"bf16_stochastic_rounding": True})
    # LARS (no torch counterpart, so not in CASES): its options with and without adaptation (the norm
    # pass runs only with it), each dtype, with GradScaler's scale.
    lars_options = (
        {},
        {"weight_decay": 0.1, "nesterov": True},
        {"maximize": True, "momentum": 0.0},
        {"weight_decay": 0.1, "max_grad_norm": 1.0},
    )
    for kwargs in lars_options:
        for dtype in DTYPES:
            for group in ({}, {"lars_adaptation": False}):
                for scaled in (False, True):
                    params = [torch.zeros(n, dtype=dtype) for n in (5, 1030)]
                    groups = [{"params": params, **group}]
                    opt = resfast.optim.LARS(groups, lr=0.1, backend="triton", **kwargs)
                    for p in params:
                        p.grad = torch.zeros_like(p)
                    if scaled:
                        opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
                    opt.step()


# ResNet shapes (small batches: only the launch parameters matter): odd and even spatial sizes, the
# 14x14 and 7x7 stages, few and many channels.
BN_SHAPES = [(2, 3, 5, 5), (2, 64, 8, 8), (2, 256, 14, 14), (2, 512, 7, 7), (4, 64, 1, 1)]


def _bn_calls() -> None:
    from resfast.kernels import triton_bn

    for shape in BN_SHAPES:
        for layout in (torch.contiguous_format, torch.channels_last):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                C = shape[1]
                x, residual, dy = (torch.zeros(shape, dtype=dtype).to(memory_format=layout) for _ in range(3))
                weight, bias = torch.ones(C), torch.zeros(C)
                running_mean, running_var = torch.zeros(C), torch.ones(C)
                mean, var = triton_bn.batch_stats(x, running_mean, running_var, 0.1)
                triton_bn.batch_stats(x, None, None, 0.1)
                for res, w, b in ((residual, weight, bias), (None, None, None)):
                    y = triton_bn.forward(x, res, w, b, mean, var, 1e-5)
                    for training in (True, False):
                        triton_bn.backward(dy, x, y, w, mean, var, 1e-5, training, need_dx=True)
                    triton_bn.backward(dy, x, y, w, mean, var, 1e-5, True, need_dx=False)
                triton_bn.grad_input(dy, x, weight, mean, var, 1e-5, torch.zeros(C), torch.zeros(C), 8)


def _specialise(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[ASTSource, dict, str]:
    """(source, options, cache key) as JITFunction.run builds them for an sm_90 device."""
    backend = make_backend(TARGET)
    # What JITFunction.run adds to the launch's keywords before binding them.
    mode = getattr(triton.knobs.compilation, "instrumentation_mode", "")
    kwargs = {"debug": False, "instrumentation_mode": mode, **kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = f"{fn.__name__}|{specialization}|{sorted(options.__dict__.items())}"
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, key


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes (spills live there) of the cubin Triton built, read by the cuobjdump
    that Triton ships."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert usage, f"unexpected cuobjdump output:\n{out}"
    return {"registers": int(usage.group(1)), "stack": int(usage.group(2)), "local": int(usage.group(3))}


def main(out_path: str) -> None:
    calls: list[tuple[JITFunction, tuple, dict]] = []
    JITFunction.run = _record(calls)  # type: ignore[method-assign]
    # The kernels are imported as real JIT functions (TRITON_INTERPRET unset); only then is the
    # variable set, so that resfast's backend choice admits CPU tensors for the triton backend.
    import resfast.kernels.triton_bn
    import resfast.kernels.triton_optim  # noqa: F401

    os.environ["TRITON_INTERPRET"] = "1"
    _optimizer_calls()
    _bn_calls()

    seen: dict[str, dict] = {}
    for fn, args, kwargs in calls:
        src, options, key = _specialise(fn, args, kwargs)
        if key in seen:
            continue
        constexprs = {fn.arg_names[k[0]]: str(v) for k, v in src.constants.items()}
        pointers = {fn.arg_names[i]: t for i, t in enumerate(src.signature.values()) if t.startswith("*")}
        entry: dict[str, Any] = {
            "kernel": fn.__name__,
            "module": fn.__module__,
            "constexprs": constexprs,
            "pointers": pointers,
            "num_warps": options.get("num_warps"),
        }
        try:
            compiled = triton.compile(src, target=TARGET, options=options)
            ptx = compiled.asm["ptx"]
            entry |= _resource_usage(compiled.asm["cubin"])
            entry["approximate"] = sorted({op for op in APPROXIMATE if op in ptx})
            entry["ftz"] = ".ftz.f32" in ptx
        except Exception as e:  # reported, not raised: the test lists every kernel that fails
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        seen[key] = entry
    with open(out_path, "w") as f:
        json.dump(list(seen.values()), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
