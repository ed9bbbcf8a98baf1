"""Triton helpers shared by resfast's kernels."""

import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, offsets, value, mask):
    """Store fp32 `value` at ptr + offsets in the pointer's dtype, rounded to nearest-even.

    bf16 is rounded by hand on the fp32 bits: a GPU's conversion rounds to nearest-even, but Triton's
    CPU interpreter truncates (even when asked for "rtne"); this makes both exact and identical, for a
    few integer ops per element in memory-bound kernels. NaN passes through unchanged."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)
