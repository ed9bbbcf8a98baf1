"""Shared pieces of the optimizer tests: parameter sets, gradient streams and error measures."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import resfast.optim
from tests.optim_cases import backend_params

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
            p.grad = None if g is None else g.to(p.device, p.dtype)
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


def fast_backend_bound(want: Tensor, scale: float | None = None) -> float:
    """How far a fast backend may be from the reference backend on `want` (a reference tensor).

    Both compute in fp32, so they differ only by fp32 rounding (FMA contraction, operation order): a few
    fp32 ulps; low-precision tensors also by the one rounding of each stored value, hence 2 ulps of the
    dtype. Relative to `scale`, the magnitude of what the value was computed from: by default the
    tensor's own; over a trajectory, the largest it reached (a momentum buffer whose sign flips is a
    small difference of large terms, with their rounding error). At least 1, as states near zero carry
    absolute error."""
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 0.0
    units = 4 * ulp(torch.float32) if want.dtype == torch.float32 else 2 * ulp(want.dtype)
    return units * max(scale, 1.0)


# Memory layouts a param, grad or state may arrive in. Views of a bigger buffer keep SENTINEL in the
# buffer's other elements, so a write outside the view shows (no update produces exactly this value).
LAYOUTS = ("contiguous", "transposed", "channels_last", "offset", "sliced")
SENTINEL = 96.0


def layouts_for(shape: tuple[int, ...]) -> list[str]:
    """The layouts that exist for a shape (transposing needs 2 dims, channels_last 4, slicing 1)."""
    need = {"transposed": 2, "channels_last": 4, "sliced": 1}
    return [layout for layout in LAYOUTS if len(shape) >= need.get(layout, 0)]


def laid_out(values: Tensor, layout: str) -> tuple[Tensor, Tensor | None]:
    """(a tensor equal to `values` in `layout`, the buffer it views or None when it owns its memory).

    transposed: dense, dims 0 and 1 permuted; channels_last: dense, NHWC; offset: contiguous, starting
    at element 1 of its buffer (misaligned for any vector width); sliced: every other element of the
    last dim, starting at element 1 (neither contiguous nor dense)."""
    if layout == "contiguous":
        return values.clone(), None
    # Always a copy: .contiguous() would hand back `values` itself where it already has the layout.
    if layout == "transposed":
        return values.transpose(0, 1).clone(memory_format=torch.contiguous_format).transpose(0, 1), None
    if layout == "channels_last":
        return values.clone(memory_format=torch.channels_last), None
    if layout == "offset":
        base = torch.full((values.numel() + 2,), SENTINEL, dtype=values.dtype, device=values.device)
        view = base[1 : 1 + values.numel()].view(values.shape)
    elif layout == "sliced":
        wide = (*values.shape[:-1], 2 * values.shape[-1] + 1)
        base = torch.full(wide, SENTINEL, dtype=values.dtype, device=values.device)
        view = base[..., 1::2]
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    view.copy_(values)
    return view, base


def untouched_outside(view: Tensor, base: Tensor | None) -> bool:
    """True if no element of `base` outside `view` was written (see SENTINEL)."""
    return base is None or int((base == SENTINEL).sum()) == base.numel() - view.numel()


def device_backend_params() -> list:
    """(device, backend) for every backend on the CPU and on CUDA; skips say why (no GPU, not built)."""
    out = []
    for device in ("cpu", "cuda"):
        no_gpu = device == "cuda" and not torch.cuda.is_available()
        for param in backend_params(device):
            marks = [*param.marks, *([pytest.mark.skip(reason="needs a CUDA device")] if no_gpu else [])]
            out.append(pytest.param(device, param.values[0], marks=marks, id=f"{device}-{param.id}"))
    return out
