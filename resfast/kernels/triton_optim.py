"""Triton optimizer updates: one kernel launch updates every tensor of a (device, dtype) bucket (LARS:
one launch for every tensor's norms, then one for the update; see _lars_norms_kernel).

Layout of a launch (the "work table"):

- ``table``: int64 ``[n_tensors, n_ptrs + 1]``; row i holds the addresses of tensor i's param, grad
  and states, then its element count. Building it costs one ``data_ptr()`` call per tensor on the
  host; it is uploaded once and reused while those addresses and sizes do not change (the usual
  case: parameters and states never move, and the caching allocator hands grads the same blocks).
- ``rows``: int64 ``[n_rows, 2]``; each program takes one row = (tensor index, first element of its
  BLOCK-sized chunk), so a launch covers any number of tensors of any sizes with no per-tensor
  launch and no 4 KB kernel-argument limit.
- ``coef``: float32 ``[n_tensors, K]`` per-tensor coefficients (lr, bias corrections, ...), computed
  each step on the device by a few vectorised torch ops. Hyperparameters therefore reach the kernel as
  data, never as compile-time constants: changing lr (float or tensor) never recompiles, and with
  ``capturable`` nothing here synchronises with the host.

Under torch.compile each launcher runs eagerly (a graph break around it): the work table is built
from tensor addresses on the host, which cannot be traced. The `cpu`/`cuda` backends are registered
ops and trace without a break.

Math is fp32 whatever the storage dtype; each state is rounded once when stored. Offsets are int64.
Division and square root are the IEEE round-to-nearest forms (`tl.div_rn`, `tl.sqrt_rn`), as in
torch's fused CUDA kernels: Triton's `/` and `tl.sqrt` compile to approximate instructions on the GPU
(`div.full.f32`, `sqrt.approx.ftz.f32`, which also flushes denormals) while the CPU interpreter CI runs
computes them exactly, so only the IEEE forms agree on both (tests/test_triton_sm90.py checks the PTX).
Semantics are those of :mod:`resfast.kernels.reference_optim` (same signatures), against which this
module is tested.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from resfast.kernels.fused_optim import FusedCall, FusedUpdates
from resfast.kernels.optim_spec import ADAM_WEIGHT_DECAY, SPECS
from resfast.kernels.triton_common import store_rounded

__all__ = ["adagrad", "adam", "lars", "launch", "rmsprop", "sgd"]

# Elements per program. Provisional (not yet measured on a GPU): large enough to amortise reading a
# row, small enough that a 1-element tensor wastes little.
BLOCK = 1024
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _column(op: str, name: str) -> tl.constexpr:
    return tl.constexpr(SPECS[op].column(name))


# The coefficient tables' row widths and column offsets, from resfast.kernels.optim_spec (constexprs:
# compiled in, never recompiled).
SGD_COLUMNS = tl.constexpr(len(SPECS["sgd"].columns))
SGD_LR, SGD_WEIGHT_DECAY = _column("sgd", "lr"), _column("sgd", "weight_decay")
SGD_MOMENTUM, SGD_ONE_MINUS_DAMPENING = _column("sgd", "momentum"), _column("sgd", "one_minus_dampening")
SGD_FRESH = _column("sgd", "fresh")
RMSPROP_COLUMNS = tl.constexpr(len(SPECS["rmsprop"].columns))
RMSPROP_LR, RMSPROP_ALPHA = _column("rmsprop", "lr"), _column("rmsprop", "alpha")
RMSPROP_ONE_MINUS_ALPHA, RMSPROP_EPS = _column("rmsprop", "one_minus_alpha"), _column("rmsprop", "eps")
RMSPROP_WEIGHT_DECAY, RMSPROP_MOMENTUM = _column("rmsprop", "weight_decay"), _column("rmsprop", "momentum")
ADAGRAD_COLUMNS = tl.constexpr(len(SPECS["adagrad"].columns))
ADAGRAD_CLR, ADAGRAD_WEIGHT_DECAY = _column("adagrad", "clr"), _column("adagrad", "weight_decay")
ADAGRAD_EPS = _column("adagrad", "eps")
ADAM_COLUMNS = tl.constexpr(len(SPECS["adam"].columns))
ADAM_STEP_SIZE, ADAM_SQRT_BC2 = _column("adam", "step_size"), _column("adam", "sqrt_bias_correction2")
ADAM_ONE_MINUS_BETA1, ADAM_BETA2 = _column("adam", "one_minus_beta1"), _column("adam", "beta2")
ADAM_ONE_MINUS_BETA2, ADAM_EPS = _column("adam", "one_minus_beta2"), _column("adam", "eps")
ADAM_WD_TERM = _column("adam", "weight_decay_term")
LARS_COLUMNS = tl.constexpr(len(SPECS["lars"].columns))
LARS_LR, LARS_MOMENTUM = _column("lars", "lr"), _column("lars", "momentum")
LARS_WEIGHT_DECAY, LARS_EPS = _column("lars", "weight_decay"), _column("lars", "eps")
LARS_TRUST_COEFFICIENT = _column("lars", "trust_coefficient")
WD_L2, WD_DECOUPLED = tl.constexpr(ADAM_WEIGHT_DECAY["l2"]), tl.constexpr(ADAM_WEIGHT_DECAY["decoupled"])


# ----------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _chunk(
    rows_ptr, table_ptr, found_inf_ptr, NCOL: tl.constexpr, BLOCK: tl.constexpr, HAS_INF: tl.constexpr
):
    """This program's tensor index, element offsets and mask (false past the end, or on found_inf)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(rows_ptr + 2 * row)
    start = tl.load(rows_ptr + 2 * row + 1)
    numel = tl.load(table_ptr + t * NCOL + (NCOL - 1))
    if HAS_INF:
        # found_inf != 0 empties every tensor: no load or store, so all stay bit-identical.
        numel = numel * (tl.load(found_inf_ptr) == 0).to(tl.int64)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < numel


@triton.jit
def _ptr(table_ptr, t, col: tl.constexpr, NCOL: tl.constexpr, DTYPE: tl.constexpr):
    """Address in column `col` of tensor t's table row, as a pointer to DTYPE."""
    return tl.load(table_ptr + t * NCOL + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _grad(
    g_ptr, offs, mask, grad_scale_ptr, grad_clip_ptr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """The fp32 gradient, unscaled (and written back unscaled, as torch's fused kernels do), then
    clipped (not written back)."""
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
        store_rounded(g_ptr, offs, g, mask)
    if HAS_CLIP:
        g = g * tl.load(grad_clip_ptr)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp, both of its forms: they round differently and disagree on infinities (with start =
    inf, start + w * (end - start) is NaN while end - (end - start) * (1 - w) is inf)."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask).to(tl.float32)


@triton.jit
def _store_param(
    p_ptr, table_ptr, t, offs, value, mask, seed,
    NCOL: tl.constexpr, DTYPE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
):  # fmt: skip
    """Store the updated param `value` (fp32).

    MASTER: p_ptr is the fp32 master copy; the param itself (table column NCOL - 2) gets the value
    rounded to nearest-even. SR (bf16 only): the param gets the value rounded stochastically: 16
    random bits added below bf16's last bit, then truncated, so the expected stored value is the
    exact one. Otherwise the param is rounded to nearest-even."""
    if MASTER:
        tl.store(p_ptr + offs, value, mask=mask)
        store_rounded(_ptr(table_ptr, t, NCOL - 2, NCOL, DTYPE), offs, value, mask)
    elif SR:
        # One stream per (step seed, tensor); offsets past 2^31 wrap, which only correlates the noise.
        noise = tl.randint(seed + t, offs.to(tl.int32)) & 0xFFFF
        bits = (value.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
        value = tl.where(tl.abs(value) < float("inf"), bits.to(tl.float32, bitcast=True), value)
        tl.store(p_ptr + offs, value.to(DTYPE), mask=mask)  # exact: the low 16 bits are zero
    else:
        store_rounded(p_ptr, offs, value, mask)


# ----------------------------------------------------------------------------------------------------
# Kernels. Common arguments:
#   rows_ptr       int64 [n_rows, 2]: (tensor index, first element) of each program's chunk
#   table_ptr      int64 [n_tensors, NCOL]: addresses of param, grad, states..., then numel
#   coef_ptr       float32 [n_tensors, K]: per-tensor coefficients, columns as in resfast.kernels.optim_spec
#   grad_scale_ptr float32 [1]: GradScaler's scale (read only if HAS_SCALE)
#   grad_clip_ptr  float32 [1]: the clip factor every unscaled grad is multiplied by (read only if HAS_CLIP)
#   found_inf_ptr  float32 [1]: nonzero means skip the whole update (read only if HAS_INF)
#   seed           int: the step's random seed for stochastic rounding (read only if SR)
#   DTYPE          storage dtype of every tensor in the launch; math is fp32
#   MASTER         column 0 is an fp32 master copy of the param, which is the last address column
#   SR             round the bf16 param stochastically (see _store_param)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _sgd_kernel(
    rows_ptr, table_ptr, coef_ptr, grad_scale_ptr, grad_clip_ptr, found_inf_ptr, seed,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_INF: tl.constexpr, DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    MASTER: tl.constexpr, SR: tl.constexpr,
):  # fmt: skip
    # table columns: param, grad[, momentum_buffer], numel
    # coefficients: SPECS["sgd"].columns (SGD_* offsets); fresh = 1.0: the buffer starts as the grad
    NCOL: tl.constexpr = (4 if HAS_MOMENTUM else 3) + MASTER
    t, offs, mask = _chunk(rows_ptr, table_ptr, found_inf_ptr, NCOL, BLOCK, HAS_INF)
    p_ptr = _ptr(table_ptr, t, 0, NCOL, tl.float32 if MASTER else DTYPE)
    c = coef_ptr + t * SGD_COLUMNS
    p = _load(p_ptr, offs, mask)
    g_ptr = _ptr(table_ptr, t, 1, NCOL, DTYPE)
    g = _grad(g_ptr, offs, mask, grad_scale_ptr, grad_clip_ptr, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if HAS_WD:
        g = g + p * tl.load(c + SGD_WEIGHT_DECAY)
    if HAS_MOMENTUM:
        momentum = tl.load(c + SGD_MOMENTUM)
        b_ptr = _ptr(table_ptr, t, 2, NCOL, DTYPE)
        # A fresh buffer (all zeros) starts as the gradient itself, undampened, as in torch.
        carried = _load(b_ptr, offs, mask) * momentum + g * tl.load(c + SGD_ONE_MINUS_DAMPENING)
        b = tl.where(tl.load(c + SGD_FRESH) != 0, g, carried)
        store_rounded(b_ptr, offs, b, mask)
        if NESTEROV:
            g = g + b * momentum
        else:
            g = b
    _store_param(p_ptr, table_ptr, t, offs, p - g * tl.load(c + SGD_LR), mask, seed, NCOL, DTYPE, MASTER, SR)


@triton.jit
def _rmsprop_kernel(
    rows_ptr, table_ptr, coef_ptr, grad_scale_ptr, grad_clip_ptr, found_inf_ptr, seed,
    HAS_WD: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_INF: tl.constexpr, DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    MASTER: tl.constexpr, SR: tl.constexpr,
):  # fmt: skip
    # table columns: param, grad, square_avg[, grad_avg][, momentum_buffer], numel
    # coefficients: SPECS["rmsprop"].columns (RMSPROP_* offsets)
    NCOL: tl.constexpr = 4 + CENTERED + HAS_MOMENTUM + MASTER
    t, offs, mask = _chunk(rows_ptr, table_ptr, found_inf_ptr, NCOL, BLOCK, HAS_INF)
    c = coef_ptr + t * RMSPROP_COLUMNS
    p_ptr = _ptr(table_ptr, t, 0, NCOL, tl.float32 if MASTER else DTYPE)
    p = _load(p_ptr, offs, mask)
    g_ptr = _ptr(table_ptr, t, 1, NCOL, DTYPE)
    g = _grad(g_ptr, offs, mask, grad_scale_ptr, grad_clip_ptr, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if HAS_WD:
        g = g + p * tl.load(c + RMSPROP_WEIGHT_DECAY)
    one_minus_alpha = tl.load(c + RMSPROP_ONE_MINUS_ALPHA)
    sq_ptr = _ptr(table_ptr, t, 2, NCOL, DTYPE)
    sq = _load(sq_ptr, offs, mask) * tl.load(c + RMSPROP_ALPHA) + g * g * one_minus_alpha
    store_rounded(sq_ptr, offs, sq, mask)
    if CENTERED:
        ga_ptr = _ptr(table_ptr, t, 3, NCOL, DTYPE)
        ga = _lerp(_load(ga_ptr, offs, mask), g, one_minus_alpha)
        store_rounded(ga_ptr, offs, ga, mask)
        avg = tl.sqrt_rn(sq - ga * ga) + tl.load(c + RMSPROP_EPS)
    else:
        avg = tl.sqrt_rn(sq) + tl.load(c + RMSPROP_EPS)
    if HAS_MOMENTUM:
        b_ptr = _ptr(table_ptr, t, 3 + CENTERED, NCOL, DTYPE)
        b = _load(b_ptr, offs, mask) * tl.load(c + RMSPROP_MOMENTUM) + tl.div_rn(g, avg)
        store_rounded(b_ptr, offs, b, mask)
        update = b
    else:
        update = tl.div_rn(g, avg)
    _store_param(
        p_ptr, table_ptr, t, offs, p - update * tl.load(c + RMSPROP_LR), mask, seed, NCOL, DTYPE, MASTER, SR
    )


@triton.jit
def _adagrad_kernel(
    rows_ptr, table_ptr, coef_ptr, grad_scale_ptr, grad_clip_ptr, found_inf_ptr, seed,
    HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_INF: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
):  # fmt: skip
    # table columns: param, grad, sum, numel
    # coefficients: SPECS["adagrad"].columns (ADAGRAD_* offsets)
    NCOL: tl.constexpr = 4 + MASTER
    t, offs, mask = _chunk(rows_ptr, table_ptr, found_inf_ptr, NCOL, BLOCK, HAS_INF)
    c = coef_ptr + t * ADAGRAD_COLUMNS
    p_ptr = _ptr(table_ptr, t, 0, NCOL, tl.float32 if MASTER else DTYPE)
    p = _load(p_ptr, offs, mask)
    g_ptr = _ptr(table_ptr, t, 1, NCOL, DTYPE)
    g = _grad(g_ptr, offs, mask, grad_scale_ptr, grad_clip_ptr, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if HAS_WD:
        g = g + p * tl.load(c + ADAGRAD_WEIGHT_DECAY)
    s_ptr = _ptr(table_ptr, t, 2, NCOL, DTYPE)
    s = _load(s_ptr, offs, mask) + g * g
    store_rounded(s_ptr, offs, s, mask)
    _store_param(
        p_ptr,
        table_ptr,
        t,
        offs,
        p - tl.div_rn(g, tl.sqrt_rn(s) + tl.load(c + ADAGRAD_EPS)) * tl.load(c + ADAGRAD_CLR),
        mask,
        seed,
        NCOL,
        DTYPE,
        MASTER,
        SR,
    )


@triton.jit
def _adam_kernel(
    rows_ptr, table_ptr, coef_ptr, grad_scale_ptr, grad_clip_ptr, found_inf_ptr, seed,
    WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_INF: tl.constexpr, DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    MASTER: tl.constexpr, SR: tl.constexpr,
):  # fmt: skip
    # WD_MODE: ADAM_WEIGHT_DECAY's none, l2 (added to the grad: Adam) or decoupled (AdamW)
    # table columns: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq], numel
    # coefficients: SPECS["adam"].columns (ADAM_* offsets)
    NCOL: tl.constexpr = (6 if AMSGRAD else 5) + MASTER
    t, offs, mask = _chunk(rows_ptr, table_ptr, found_inf_ptr, NCOL, BLOCK, HAS_INF)
    c = coef_ptr + t * ADAM_COLUMNS
    p_ptr = _ptr(table_ptr, t, 0, NCOL, tl.float32 if MASTER else DTYPE)
    p = _load(p_ptr, offs, mask)
    g_ptr = _ptr(table_ptr, t, 1, NCOL, DTYPE)
    g = _grad(g_ptr, offs, mask, grad_scale_ptr, grad_clip_ptr, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    if WD_MODE == WD_L2:
        g = g + p * tl.load(c + ADAM_WD_TERM)
    if WD_MODE == WD_DECOUPLED:
        p = p * tl.load(c + ADAM_WD_TERM)
    m_ptr = _ptr(table_ptr, t, 2, NCOL, DTYPE)
    v_ptr = _ptr(table_ptr, t, 3, NCOL, DTYPE)
    m = _lerp(_load(m_ptr, offs, mask), g, tl.load(c + ADAM_ONE_MINUS_BETA1))
    v = _load(v_ptr, offs, mask) * tl.load(c + ADAM_BETA2) + g * g * tl.load(c + ADAM_ONE_MINUS_BETA2)
    store_rounded(m_ptr, offs, m, mask)
    store_rounded(v_ptr, offs, v, mask)
    if AMSGRAD:
        vmax_ptr = _ptr(table_ptr, t, 4, NCOL, DTYPE)
        v = tl.maximum(_load(vmax_ptr, offs, mask), v, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
        store_rounded(vmax_ptr, offs, v, mask)
    denom = tl.div_rn(tl.sqrt_rn(v), tl.load(c + ADAM_SQRT_BC2)) + tl.load(c + ADAM_EPS)
    _store_param(
        p_ptr,
        table_ptr,
        t,
        offs,
        p - tl.div_rn(m, denom) * tl.load(c + ADAM_STEP_SIZE),
        mask,
        seed,
        NCOL,
        DTYPE,
        MASTER,
        SR,
    )


# LARS needs each tensor's ‖w‖ and ‖g‖ before any element is updated, so a step is two launches:
#
# 1. _lars_norms_kernel: the bucket is cut into spans of NORM_SPAN elements (a tensor's last span may be
#    shorter; an empty tensor has none), one program per span. Each program sums w² and g² (g unscaled)
#    over its span in fp32 and writes the two partial sums to its own row of `parts` (no atomics).
# 2. _lars_kernel: every update program of tensor t sums t's partial rows itself, in a fixed order, and
#    derives t's trust ratio. All programs of a tensor read the same rows in the same order, so they
#    agree bit for bit, and the result does not depend on scheduling (deterministic from run to run).
#
# Why spans rather than the update's BLOCK-sized chunks: each of the update's programs re-reads all of
# its tensor's partial rows, so they must be few: with NORM_SPAN = 32 * BLOCK, ResNet-50's largest
# tensor (2.4M elements) has 72 rows, 576 bytes read by each 1024-element program from L2, against the
# ~12 KB it moves anyway. A third launch that reduces the rows once per tensor would avoid that re-read
# but costs one more launch per bucket, and the step of a small bucket is launch-bound. Both sizes are
# provisional (not yet measured on a GPU), as BLOCK is.
# Overflow: sums of squares are fp32, so a tensor whose norm exceeds ~1.8e19 overflows to inf, where a
# float64 reference would not (trust then becomes 0 or NaN); parameters and gradients never come near.
NORM_ITERS = 32  # BLOCK-sized steps per norm program
NORM_SPAN = BLOCK * NORM_ITERS
PARTS_BLOCK = 64  # partial rows the update kernel sums per iteration (ResNet-50: at most 2 iterations)


@triton.jit
def _lars_norms_kernel(
    spans_ptr, table_ptr, grad_scale_ptr, parts_ptr,
    NCOL: tl.constexpr, HAS_SCALE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):  # fmt: skip
    # spans_ptr      int64 [n_spans, 2]: (tensor index, first element) of each program's span
    # table_ptr      the update's work table (columns param, grad, momentum_buffer, numel)
    # grad_scale_ptr float32 [1]: GradScaler's scale; the norm is the unscaled grad's (read only if HAS_SCALE)
    # parts_ptr      float32 [n_spans, 2]: out, (sum of w², sum of g²) over this program's span
    # ITERS          BLOCK-sized steps per span (NORM_ITERS)
    span = tl.program_id(0).to(tl.int64)
    t = tl.load(spans_ptr + 2 * span)
    start = tl.load(spans_ptr + 2 * span + 1)
    numel = tl.load(table_ptr + t * NCOL + (NCOL - 1))
    p_ptr = _ptr(table_ptr, t, 0, NCOL, DTYPE)
    g_ptr = _ptr(table_ptr, t, 1, NCOL, DTYPE)
    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    g_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < numel
        # other=0: a masked lane's value is undefined otherwise, and every lane enters the sums.
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(grad_scale_ptr))  # as the update kernel unscales it
        w_sq += w * w
        g_sq += g * g
    tl.store(parts_ptr + 2 * span, tl.sum(w_sq, axis=0))
    tl.store(parts_ptr + 2 * span + 1, tl.sum(g_sq, axis=0))


@triton.jit
def _lars_kernel(
    rows_ptr, table_ptr, coef_ptr, grad_scale_ptr, grad_clip_ptr, found_inf_ptr, seed,
    parts_ptr, first_part_ptr,
    HAS_WD: tl.constexpr, LARS_ADAPTATION: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_INF: tl.constexpr, DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    MASTER: tl.constexpr, SR: tl.constexpr, PARTS_BLOCK: tl.constexpr,
):  # fmt: skip
    # parts_ptr      float32 [n_spans, 2]: _lars_norms_kernel's partial sums (read only if LARS_ADAPTATION)
    # first_part_ptr int64 [n_tensors + 1]: tensor t's partial rows are first_part[t] .. first_part[t+1]
    # table columns: param, grad, momentum_buffer, numel
    # coefficients: SPECS["lars"].columns (LARS_* offsets)
    NCOL: tl.constexpr = 4 + MASTER
    t, offs, mask = _chunk(rows_ptr, table_ptr, found_inf_ptr, NCOL, BLOCK, HAS_INF)
    c = coef_ptr + t * LARS_COLUMNS
    p_ptr = _ptr(table_ptr, t, 0, NCOL, tl.float32 if MASTER else DTYPE)
    p = _load(p_ptr, offs, mask)
    g_ptr = _ptr(table_ptr, t, 1, NCOL, DTYPE)
    g = _grad(g_ptr, offs, mask, grad_scale_ptr, grad_clip_ptr, HAS_SCALE, HAS_CLIP, MAXIMIZE)
    weight_decay = tl.load(c + LARS_WEIGHT_DECAY)
    scaled_lr = tl.load(c + LARS_LR)
    if LARS_ADAPTATION:
        first = tl.load(first_part_ptr + t)
        count = tl.load(first_part_ptr + t + 1) - first
        w_sq = tl.zeros([PARTS_BLOCK], dtype=tl.float32)
        g_sq = tl.zeros([PARTS_BLOCK], dtype=tl.float32)
        for k in range(0, count, PARTS_BLOCK):
            idx = first + k + tl.arange(0, PARTS_BLOCK).to(tl.int64)
            in_range = k + tl.arange(0, PARTS_BLOCK) < count
            w_sq += tl.load(parts_ptr + 2 * idx, mask=in_range, other=0.0)
            g_sq += tl.load(parts_ptr + 2 * idx + 1, mask=in_range, other=0.0)
        w_norm = tl.sqrt_rn(tl.sum(w_sq, axis=0))
        g_norm = tl.sqrt_rn(tl.sum(g_sq, axis=0))
        if HAS_CLIP:  # the norm pass summed the unclipped grad: |clip * g| = clip * |g|
            g_norm = g_norm * tl.load(grad_clip_ptr)
        # A zero tensor or a zero grad keeps the plain lr (trust 1), as the rule says; its denominator
        # (0 when eps and the decay are) is replaced first, so no program divides by zero.
        adapt = (w_norm > 0) & (g_norm > 0)
        denom = tl.where(adapt, g_norm + weight_decay * w_norm + tl.load(c + LARS_EPS), 1.0)
        ratio = tl.div_rn(tl.load(c + LARS_TRUST_COEFFICIENT) * w_norm, denom)
        scaled_lr = scaled_lr * tl.where(adapt, ratio, 1.0)
    if HAS_WD:
        g = g + p * weight_decay
    step = g * scaled_lr
    momentum = tl.load(c + LARS_MOMENTUM)
    b_ptr = _ptr(table_ptr, t, 2, NCOL, DTYPE)
    b = _load(b_ptr, offs, mask) * momentum + step
    store_rounded(b_ptr, offs, b, mask)
    if NESTEROV:
        update = b * momentum + step
    else:
        update = b
    _store_param(p_ptr, table_ptr, t, offs, p - update, mask, seed, NCOL, DTYPE, MASTER, SR)


# ----------------------------------------------------------------------------------------------------
# Host side: work tables, coefficients, launch
# ----------------------------------------------------------------------------------------------------

_TABLES: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_MAX_TABLES = 64  # a few per param group and dtype; old entries are dropped first


def _cached(key: tuple, build: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """_TABLES[key], built on first use; the least recently used entries are dropped first."""
    cached = _TABLES.get(key)
    if cached is not None:
        _TABLES.move_to_end(key)
        return cached
    entry = _TABLES[key] = build()
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return entry


def _work_table(tensor_lists: Sequence[Sequence[Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, table) on `device` for tensor_lists = [params, grads, states...], cached by addresses."""
    numels = tuple(t.numel() for t in tensor_lists[0])
    addresses = tuple(tuple(t.data_ptr() for t in tensors) for tensors in tensor_lists)

    def build() -> tuple[Tensor, Tensor]:
        table = torch.tensor(
            [[*column, n] for *column, n in zip(*addresses, numels, strict=True)], dtype=torch.int64
        )
        return _rows(numels).to(device), table.to(device)

    return _cached((device, numels, addresses), build)


def _kept_work_table(
    call: FusedCall, tensor_lists: Sequence[Sequence[Tensor]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """_work_table, for a call the step cache keeps (call.kept) looked up by its grads' addresses alone:
    the cache has checked that its params and states are the same tensors at the same addresses, so
    only new grads can move. Saves ~800 data_ptr() calls and a hash of them per Adam step on ResNet-50."""
    if call.kept is None:
        return _work_table(tensor_lists, device)
    grads = tuple(map(Tensor.data_ptr, call.grads))
    kept = call.kept.get("triton")
    if kept is None or kept[0] != grads:
        kept = call.kept["triton"] = (grads, _work_table(tensor_lists, device))
    return kept[1]


def _rows(numels: Sequence[int]) -> Tensor:
    """int64 [n_rows, 2]: (tensor index, first element) of each BLOCK-sized chunk, in int64 throughout."""
    return _chunks(numels, BLOCK)[0]


def _chunks(numels: Sequence[int], block: int) -> tuple[Tensor, Tensor]:
    """int64 [n_rows, 2]: (tensor index, first element) of each `block`-sized chunk; and int64
    [n_tensors + 1]: the first row of each tensor, then the number of rows."""
    chunks = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    first_row = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(chunks, 0)])
    start = (torch.arange(len(tensor_index)) - first_row[tensor_index]) * block
    return torch.stack([tensor_index, start], dim=1), first_row


def _lars_norms(call: FusedCall, table: Tensor, scale: Tensor) -> dict[str, Tensor | int]:
    """Launch LARS's norm pass (see _lars_norms_kernel); the update kernel's extra arguments."""
    params = call.params
    device, numels = params[0].device, tuple(p.numel() for p in params)

    def build() -> tuple[Tensor, Tensor]:
        spans, first_part = _chunks(numels, NORM_SPAN)
        return spans.to(device), first_part.to(device)

    spans, first_part = _cached(("lars-spans", NORM_SPAN, device, numels), build)
    parts = torch.empty(spans.shape[0], 2, dtype=torch.float32, device=device)
    if spans.shape[0]:
        _lars_norms_kernel[(spans.shape[0],)](
            spans, table, scale, parts,
            NCOL=table.shape[1], HAS_SCALE=call.grad_scale is not None, DTYPE=_TL_DTYPES[params[0].dtype],
            BLOCK=BLOCK, ITERS=NORM_ITERS,
        )  # fmt: skip
    return {"parts_ptr": parts, "first_part_ptr": first_part, "PARTS_BLOCK": PARTS_BLOCK}


# The kernel of each update.
_KERNELS = {
    "sgd": _sgd_kernel,
    "rmsprop": _rmsprop_kernel,
    "adagrad": _adagrad_kernel,
    "adam": _adam_kernel,
    "lars": _lars_kernel,
}


@torch.compiler.disable  # host-side work table: see the module docstring
def launch(call: FusedCall) -> None:
    """resfast.kernels.fused_optim's Launch: one kernel launch for every tensor. The spec's options
    and the presence of each optional state are the kernel's constexpr flags (upper-cased)."""
    spec, params, grad_scale, found_inf = call.spec, call.params, call.grad_scale, call.found_inf
    master_params, stochastic_seed, coef = call.master_params, call.stochastic_seed, call.coef
    device, dtype = params[0].device, params[0].dtype
    present = {s.flag.upper(): t is not None for s, t in zip(spec.states, call.states, strict=True) if s.flag}
    flags = {name.upper(): value for name, value in call.options.items()} | present
    tensor_lists = [params, call.grads, *(t for t in call.states if t is not None)]
    if master_params is not None:  # the master is what the kernel updates; the param is written last
        tensor_lists = [master_params, *tensor_lists[1:], params]
    rows, table = _kept_work_table(call, tensor_lists, device)
    if rows.shape[0] == 0:
        return
    # Unused pointer arguments still need a tensor; `coef` is never read through them.
    scale = grad_scale.to(device=device, dtype=torch.float32) if grad_scale is not None else coef
    inf = found_inf.to(device=device, dtype=torch.float32) if found_inf is not None else coef
    clip = call.grad_clip if call.grad_clip is not None else coef  # fp32, on the device (the optimizer's)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        operands: dict[str, Tensor | int] = {}
        if spec.op == "lars":
            if master_params is not None or stochastic_seed is not None:
                # LARS's norm pass reads the param itself; the optimizer offers neither mode.
                raise NotImplementedError("LARS has no master-weight or stochastic-rounding update")
            if call.options["lars_adaptation"]:
                operands = _lars_norms(call, table, scale)
            else:  # no norms to read: the update alone, one launch (`coef` fills the unused pointers)
                operands = {"parts_ptr": coef, "first_part_ptr": coef, "PARTS_BLOCK": PARTS_BLOCK}
        _KERNELS[spec.op][(rows.shape[0],)](
            rows, table, coef, scale, clip, inf, stochastic_seed or 0,
            HAS_SCALE=grad_scale is not None, HAS_CLIP=call.grad_clip is not None,
            HAS_INF=found_inf is not None, DTYPE=_TL_DTYPES[dtype],
            BLOCK=BLOCK, MASTER=master_params is not None, SR=stochastic_seed is not None, **flags,
            **operands,
        )  # fmt: skip


# The updates, with resfast.kernels.reference_optim's signatures.
_updates = FusedUpdates(launch)
sgd, rmsprop, adagrad, adam = _updates.sgd, _updates.rmsprop, _updates.adagrad, _updates.adam
lars = _updates.lars
