"""Kernel launches, kernel time and wall time of one optimizer step over ResNet-50's 161 parameter
tensors, per path: what bounds a step on a GPU when the host cannot keep ahead of the kernels.

    python benchmarks/step_launches.py [--device cuda] [--steps 20]

Kernel launches and their summed device time come from torch.profiler (every device kernel and
memcpy/memset of the profiled steps, divided by the step count); wall time is the median of timed
batches of back-to-back steps, each batch ended by a device synchronisation. Every path starts from
the same params and grads; before timing, each path's first step is compared with torch's for-loop
step (float64 reference not needed: the same fp32 update, bounded at 1e-5 of the magnitude). LARS,
which torch lacks, is compared with resfast's reference backend; "Adam+clip" is torch's
clip_grad_norm_ then the step, against resfast's max_grad_norm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resfast.optim
from resfast import backends

OPTIMIZERS = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "RMSprop": {"lr": 1e-3, "momentum": 0.9},
    "Adagrad": {"lr": 1e-2},
    "Adam": {"lr": 1e-3},
    "AdamW": {"lr": 1e-3, "weight_decay": 1e-2},
    "LARS": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "Adam+clip": {"lr": 1e-3},
}
# The rows that clip the grads to this global norm (ResNet-50's random grads have a norm of ~5000).
CLIP = {"Adam+clip": 1.0}


def _class(name: str) -> str:
    return name.split("+")[0]


class ClipThenStep:
    """torch's way to clip: clip_grad_norm_ rewrites the grads, then the optimizer steps."""

    def __init__(
        self, opt: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float, foreach: bool
    ) -> None:
        self.opt, self.params, self.max_norm, self.foreach = opt, params, max_norm, foreach

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=self.foreach)
        self.opt.step()


def torch_path(name: str, **flags) -> Callable:
    """A factory of torch's optimizer `name` (with clip_grad_norm_ first where the row clips)."""

    def make(ps: list[torch.Tensor]):
        opt = getattr(torch.optim, _class(name))(ps, **OPTIMIZERS[name], **flags)
        if name not in CLIP:
            return opt
        return ClipThenStep(opt, ps, CLIP[name], foreach=flags.get("foreach", True))

    return make


def resfast_path(name: str, backend: str) -> Callable:
    clip = {"max_grad_norm": CLIP[name]} if name in CLIP else {}
    return lambda ps: getattr(resfast.optim, _class(name))(ps, backend=backend, **OPTIMIZERS[name], **clip)


# torch paths per optimizer (torch has no fused RMSprop; a path torch refuses on a device is reported as
# unsupported).
TORCH_FLAGS = {"torch-fused": {"fused": True}, "torch-foreach": {"foreach": True}}


def make_params(device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def builders(name: str, device: torch.device) -> dict[str, Callable]:
    paths: dict[str, Callable] = {}
    for path, flags in TORCH_FLAGS.items():
        if name == "LARS" or (name == "RMSprop" and "fused" in flags):  # torch has no such step
            continue
        paths[path] = torch_path(name, **flags)
    for backend in ("cuda", "triton", "cpu"):
        try:
            backends.choose(device, torch.float32, backend)
        except backends.BackendUnavailable:
            continue
        paths[f"resfast-{backend}"] = resfast_path(name, backend)
    return paths


def reference(name: str) -> Callable:
    """What a path's first step is compared with: torch's for-loop step, or LARS's reference backend."""
    if name == "LARS":
        return resfast_path(name, "reference")
    return torch_path(name, foreach=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(opt: torch.optim.Optimizer, device: torch.device, steps: int) -> dict[str, float]:
    for _ in range(3):  # warm-up: states, compiled kernels, the step cache
        opt.step()
    sync(device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        sync(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    events = [
        e
        for e in prof.events()
        if getattr(e, "device_type", None) is not None and kind in str(e.device_type).lower()
    ]
    device_us = sum(e.device_time_total if kind == "cuda" else 0.0 for e in events)
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync(device)
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return {
        "launches": len(events) / steps,
        "kernel_us": device_us / steps,
        "wall_us": statistics.median(samples),
    }


def first_step_error(make: Callable, reference: Callable, device: torch.device) -> float:
    got, want = make_params(device), make_params(device)
    make(got).step()
    reference(want).step()
    scale = max(max(w.detach().abs().max().item() for w in want), 1.0)
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) / scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--optimizer", default=",".join(OPTIMIZERS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.optimizer.split(","):
        for path, make in builders(name, device).items():
            row = {"optimizer": name, "path": path}
            try:
                row["error"] = err = first_step_error(make, reference(name), device)
            except RuntimeError as e:  # a path this torch lacks here (fused Adagrad on CUDA, say)
                row |= {"status": "unsupported", "why": str(e).split("\n")[0][:100]}
                rows.append(row)
                print(row, flush=True)
                continue
            if err > 1e-5 or err != err:
                row["status"] = "WRONG"
            else:
                row |= measure(make(make_params(device)), device, args.steps)
                row["status"] = "ok"
            rows.append(row)
            print(row, flush=True)
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} · torch {torch.__version__}")
    print("| optimizer | path | launches/step | kernel us/step | wall us/step | wall/kernel |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "unsupported":
            print(f"| {r['optimizer']} | {r['path']} | unsupported: {r['why']} | | | |")
            continue
        if r["status"] != "ok":
            print(f"| {r['optimizer']} | {r['path']} | WRONG (error {r['error']:.2g}) | | | |")
            continue
        ratio = r["wall_us"] / r["kernel_us"] if r["kernel_us"] else float("nan")
        print(
            f"| {r['optimizer']} | {r['path']} | {r['launches']:.0f} | {r['kernel_us']:.0f} | "
            f"{r['wall_us']:.0f} | {ratio:.1f} |"
        )
    return 1 if any(r["status"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
