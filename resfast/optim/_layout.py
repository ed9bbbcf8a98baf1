"""Which tensors a flat kernel can update, and as what.

The fused kernels treat a param, its grad and its states as flat memory spans updated element by
element: that is right when the param is dense and every other tensor shares its dtype, device, shape
and strides (``fast_layout``). Anything else runs on the reference backend: slower, never wrong. The
native extension states the same rule in C++ (``csrc/optim_ops.h``: ``layouts_fit``, ``grads_fit``);
tests/test_cext_cpu.py pins their agreement.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from resfast import backends

__all__ = ["PLAIN_TENSOR_TYPES", "dense", "fast_layout", "grads_fit", "kernel_view", "layouts_fit"]


def kernel_view(t: Tensor) -> Tensor:
    """The plain tensor a kernel updates in place for t.

    A DTensor (FSDP2's sharded params, their grads and the states created like them) is its local
    shard: params, grads and states are sharded alike, so the elementwise update of the shards is the
    update of the whole. Complex tensors update as their real views, as torch.optim does."""
    # A DTensor exists only once torch.distributed.tensor is imported: no import needed to check.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(t, dtensor.DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


# Tensors that kernel_view returns unchanged unless complex: the step skips the call for them (it
# costs a few hundred ns per tensor, per step). Subclasses such as DTensor go through it.
PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def dense(t: Tensor) -> bool:
    """True if t's elements fill its memory span exactly (any dim order: contiguous, channels_last...)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fast_layout(param: Tensor, others: list[Tensor]) -> bool:
    """Can a flat kernel update these tensors elementwise as one memory span each?

    It can when the param is dense and every grad/state has the param's shape, dtype, device and
    strides, so element k of one span is element k of the others. Anything else (transposed or sliced
    views, a grad with other strides, a state of another dtype) runs on the reference backend: slower,
    never wrong. The shape matters even where the strides agree: a kernel given a state with fewer
    elements than its param would read and write past that state's end."""
    if param.numel() > 1 and not dense(param):
        return False
    shape, dtype, device, stride = param.shape, param.dtype, param.device, param.stride()
    return all(
        t.shape == shape
        and t.dtype == dtype
        and t.device == device
        and (t.stride() == stride or t.numel() <= 1)
        for t in others
    )


def layouts_fit(rows: list[list[Tensor]]) -> list[bool]:
    """fast_layout of each row (a param, then its grad and states), natively where resfast._C is loaded:
    this runs for every tensor at every step, and costs ~0.4 us per tensor in Python."""
    # While compiling, dynamo traces the Python rule (it cannot trace a pybind call or an import).
    ext = None if torch.compiler.is_compiling() else backends.native_extension()[0]
    if ext is None:
        return [fast_layout(row[0], row[1:]) for row in rows]
    return ext.layouts_fit(rows)


def grads_fit(params: list[Tensor], grads: list[Tensor], addresses: list[int], layout: bool) -> bool:
    """Does a kept kernel call fit this step: is every param still at its address, and every grad strided
    and, where `layout` (the fast kernels), laid out as its param (dtype, device, shape, strides)?"""
    ext = backends.native_extension()[0]
    if ext is not None:
        return ext.grads_fit(params, grads, addresses, layout)
    return all(
        p.data_ptr() == address and g.layout == torch.strided
        and (not layout or (g.dtype == p.dtype and g.device == p.device and g.shape == p.shape
                            and (g.stride() == p.stride() or p.numel() <= 1)))
        for p, g, address in zip(params, grads, addresses, strict=True)
    )  # fmt: skip
