"""Shared pieces of the optimizer tests: parameter sets, gradient streams and error measures."""

from __future__ import annotations

import torch
from torch import Tensor

import resfast.optim

# Sizes mixing empty, 1-element, odd and many small tensors with one spanning several kernel chunks.
SHAPES: list[tuple[int, ...]] = [
    (0,),
    (1,),
    (7, 3),
    (5,),
    (3, 1, 3, 3),
    (4100,),
    *[(k % 7 + 1,) for k in range(12)],
]


def make_params(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in SHAPES]


def make_grads(step: int, n: int, seed: int = 1) -> list[Tensor | None]:
    """float64 grads for one step; some params get None on some steps (their step counts diverge)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [
        None if (step + i) % 5 == 0 and i > 0 else torch.randn(SHAPES[i], generator=gen, dtype=torch.float64)
        for i in range(n)
    ]


def build(name: str, impl: str, params: list[Tensor], kwargs: dict, backend: str | None = None):
    """Two param groups (the second with half the lr) of torch's or resfast's optimizer `name`."""
    groups = [{"params": params[::2]}, {"params": params[1::2], "lr": kwargs.get("lr", 1e-2) * 0.5}]
    # foreach=False: torch's single-tensor loop, the readable spec; resfast records the flag as torch does.
    if impl == "torch":
        return getattr(torch.optim, name)(groups, foreach=False, **kwargs)
    return getattr(resfast.optim, name)(groups, foreach=False, backend=backend or "auto", **kwargs)


def run(opt, params: list[Tensor], steps: int, seed: int = 1, first: int = 0) -> None:
    for step in range(first, first + steps):
        for p, g in zip(params, make_grads(step, len(params), seed), strict=True):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()


def state_tensors(opt, params: list[Tensor]) -> list[tuple[str, Tensor]]:
    """(name, tensor) for every param and every state tensor, in a fixed order."""
    out = []
    for i, p in enumerate(params):
        out.append((f"param{i}", p))
        for key, value in sorted(opt.state[p].items()):
            if isinstance(value, Tensor):
                out.append((f"param{i}.{key}", value))
    return out


def max_err(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.double().cpu() - b.double().cpu()).abs()
    # NaN never passes: a NaN anywhere counts as an infinite error.
    return float("inf") if diff.isnan().any() else diff.max().item()


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps
