"""A short workload for compute-sanitizer memcheck on a GPU machine (`benchmarks/gpu_check.sh`, step
`sanitize`): every optimizer case on the `cuda` and `triton` backends over odd sizes, an empty tensor,
misaligned views and ResNet-50's 161 tensors, a GradScaler step with an inf, LARS (norm pass and update)
and max_grad_norm's clipping, and the BN (CUDA C++ driver and Triton) on a few
shapes, forward and backward. The sanitizer finds out-of-bounds and misaligned accesses; this
script also compares every result with the reference backend, so that a kernel that reads the wrong
memory without leaving its buffers fails here too.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m tests.gpu_sanitize [SECONDS]

Under memcheck every kernel runs many times slower: with SECONDS, no new case starts after that
long, and what was left unchecked is printed (a time-boxed step then still says what it covered).
"""

from __future__ import annotations

import itertools
import sys
import time

import torch
import torchvision

import resfast.optim
from resfast.nn.functional import batch_norm_add_relu
from tests.optim_cases import CASES, OPTIMIZERS, case_id

DEVICE = torch.device("cuda")
BACKENDS = ("cuda", "triton")
ODD_SIZES = [(0,), (1,), (3,), (7, 3), (1023,), (4097,), (65537,)]
# fp32: the fused kernels and the reference round differently only by FMA contraction and operation
# order, a few ulp per step; bf16 params are rounded once per step, so 2 bf16 ulp of the magnitude.
DEADLINE = float("inf")  # time.monotonic() after which no new case starts (main's SECONDS)
skipped: list[str] = []
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def odd_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """Odd sizes plus views at 1 and 3 elements into one buffer (not 16-byte aligned)."""
    params = [torch.randn(s, device=DEVICE).to(dtype) for s in ODD_SIZES]
    buffer = torch.randn(2 * 4099 + 8, device=DEVICE).to(dtype)
    return [*params, buffer[1:4100], buffer[4103 : 4103 + 4099]]


def resnet50_params(dtype: torch.dtype) -> list[torch.Tensor]:
    return [p.detach().to(DEVICE, dtype) for p in torchvision.models.resnet50().parameters()]


def run_steps(name: str, kwargs: dict, backend: str, params: list[torch.Tensor]) -> list[torch.Tensor]:
    params = [p.clone() for p in params]
    if name == "LARS":  # mixed groups: the norm pass runs for the adapted half only
        groups = [{"params": params[::2]}, {"params": params[1::2], "lars_adaptation": False}]
        opt = resfast.optim.LARS(groups, backend=backend, **kwargs)
    else:
        opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=DEVICE).to(p.dtype)
        opt.step()
    return params


def worst_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if w.numel():
            err = (g.double() - w.double()).abs().max().item() / max(w.double().abs().max().item(), 1.0)
            worst = max(worst, err if err == err else float("inf"))  # NaN never passes
    return worst


def compare_backends(cases: list[tuple[str, dict]], initial: list[torch.Tensor], label: str) -> list[str]:
    failures = []
    tol = TOLERANCE[initial[0].dtype]
    for name, kwargs in cases:
        if time.monotonic() > DEADLINE:
            skipped.append(f"{case_id((name, kwargs))} {label}")
            continue
        want = run_steps(name, kwargs, "reference", initial)
        for backend in BACKENDS:
            err = worst_error(run_steps(name, kwargs, backend, initial), want)
            if err > tol:
                failures.append(f"{case_id((name, kwargs))} {backend} {label}: error {err:.3g}")
    return failures


def check_optimizers() -> list[str]:
    failures = []
    for dtype in TOLERANCE:
        failures += compare_backends(CASES, odd_params(dtype), f"{dtype} odd sizes")
    # ResNet-50's 161 tensors (25.6M elements: slow under memcheck): each optimizer's first case, fp32.
    first_cases = [next(case for case in CASES if case[0] == name) for name in OPTIMIZERS]
    return failures + compare_backends(first_cases, resnet50_params(torch.float32), "fp32 resnet50")


# LARS with and without weight decay / Nesterov; clipping (3.0 clips these grads, norm ~ 260) on an
# update of each kind of maths.
LARS_CASES = [
    ("LARS", {"lr": 0.5, "weight_decay": 0.01, "nesterov": True}),
    ("LARS", {"lr": 0.5, "momentum": 0.0, "trust_coefficient": 0.02}),
]
CLIP_CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "max_grad_norm": 3.0}),
    ("Adam", {"amsgrad": True, "max_grad_norm": 3.0}),
    ("LARS", {"lr": 0.5, "weight_decay": 0.01, "max_grad_norm": 3.0}),
]


def check_lars_and_clipping() -> list[str]:
    failures = []
    for dtype in TOLERANCE:
        failures += compare_backends(LARS_CASES + CLIP_CASES, odd_params(dtype), f"{dtype} odd sizes")
    return failures


def check_grad_scaler_inf() -> list[str]:
    """A step whose grads hold an inf is skipped: params and state stay bit-identical."""
    failures = []
    for name in ("SGD", "RMSprop", "Adagrad", "Adam", "AdamW"):
        for backend in BACKENDS:
            params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in ((4097,), (3, 5), (1,))]
            opt = getattr(resfast.optim, name)(params, backend=backend)
            scaler = torch.amp.GradScaler(DEVICE.type)
            for poisoned in (False, True):
                opt.zero_grad()
                scaler.scale(sum((p * p).sum() for p in params)).backward()
                if poisoned:
                    params[0].grad[17] = float("inf")
                before = [p.detach().clone() for p in params]
                scaler.step(opt)
                scaler.update()
                if poisoned and any(not torch.equal(b, p) for b, p in zip(before, params, strict=True)):
                    failures.append(f"{name} {backend}: a step with an inf grad changed the params")
    return failures


def bn_outputs(
    shape: tuple[int, ...], layout: torch.memory_format, dtype: torch.dtype, residual: bool, backend: str
) -> list[torch.Tensor]:
    """A training step's outputs, running stats and grads, then the eval output, on fresh inputs
    drawn from one seed (the same for every backend)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)

    def draw(size: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=DEVICE)

    x = draw(shape).to(dtype, memory_format=layout).requires_grad_()
    r = draw(shape).to(dtype, memory_format=layout).requires_grad_() if residual else None
    w = draw(shape[1:2]).abs().requires_grad_()
    b = draw(shape[1:2]).requires_grad_()
    rm, rv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
    y = batch_norm_add_relu(x, r, rm, rv, w, b, training=True, backend=backend)
    y.backward(draw(shape).to(dtype))
    ev = batch_norm_add_relu(x.detach(), None, rm, rv, w, b, training=False, backend=backend)
    return [y.detach(), ev, rm, rv, x.grad, w.grad, b.grad] + ([r.grad] if r is not None else [])


def check_bn() -> list[str]:
    failures = []
    shapes = [(4, 8, 6, 6), (3, 5, 7, 5), (32, 64, 8, 8), (2, 16, 33, 17)]
    layouts = (torch.contiguous_format, torch.channels_last)
    for shape, layout, dtype, residual in itertools.product(
        shapes, layouts, (torch.float32, torch.bfloat16), (True, False)
    ):
        if time.monotonic() > DEADLINE:
            skipped.append(f"BN {shape} {layout} {dtype} residual={residual}")
            continue
        want = bn_outputs(shape, layout, dtype, residual, "reference")
        for backend in BACKENDS:  # the CUDA C++ driver and the Triton kernels
            err = worst_error(bn_outputs(shape, layout, dtype, residual, backend), want)
            # bf16 outputs are rounded once (2**-8 relative); fp32 statistics and reductions in
            # another order: 1e-4 of the magnitude.
            if err > (2**-6 if dtype == torch.bfloat16 else 1e-4):
                failures.append(f"BN {backend} {shape} {layout} {dtype} residual={residual}: error {err:.3g}")
    return failures


def main(seconds: float | None = None) -> int:
    global DEADLINE
    start = time.monotonic()
    if seconds is not None:
        DEADLINE = start + seconds
    failures = []
    for check in (check_optimizers, check_lars_and_clipping, check_grad_scaler_inf, check_bn):
        found = check()
        verdict = "ok" if not found else f"{len(found)} failures"
        print(f"{check.__name__}: {verdict} at {time.monotonic() - start:.0f} s", flush=True)
        failures += found
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()  # a kernel's late error surfaces here, not after exit
    for line in failures:
        print("FAIL", line)
    if skipped:
        print(f"not checked (past the {seconds:.0f} s budget): {len(skipped)} cases, from {skipped[0]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else None))
