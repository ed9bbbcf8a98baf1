"""Triton kernels for ``y = relu(batch_norm(x) + residual)`` and their launchers.

Same functions, arguments and results as `reference_bn` (the specification); see its docstring for
the backward maths. Passes over the activation (E elements of x's dtype):

- training forward: `_stats_partial_kernel` reads x (1 E) -> per-program Welford partials;
  `_stats_finalize_kernel` combines them per channel and updates the running stats;
  `_forward_apply_kernel` reads x and residual, writes y (3 E).
- eval forward: `_forward_apply_kernel` alone, with the running stats.
- backward: `_grad_partial_kernel` reads dy, y, x and writes dz = dy * (y > 0), which *is*
  dresidual (4 E); `_grad_finalize_kernel` turns the per-channel sums into dweight, dbias and the
  coefficients of dx; `_grad_input_kernel` reads dz (and x when training), writes dx (3 E).
  Writing dresidual in the reduction pass lets the second pass read dz instead of dy and y: 7 E
  instead of the 8 E of writing dx and dresidual together at the end.

Layout: every tensor is walked as (N, C, S), S = prod(spatial), through its own element strides, so
NCHW, channels_last, sliced and expanded (stride 0) tensors are read in place and outputs keep x's
memory format. When every tensor of a pass allows it (channels_last, 2-D inputs), the batch is merged
into S, so tiles run across sample boundaries. Only a tensor whose spatial dims cannot be flattened
into one stride (e.g. x[..., ::2]) is copied first. A tile is one sample n, BLOCK_S spatial positions
and BLOCK_C channels; block sizes give the memory-contiguous axis the long side. Offsets are int64.

Block sizes, warps and the number of reduction programs are provisional until measured on a GPU.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from resfast.kernels.triton_common import store_rounded

__all__ = ["backward", "batch_stats", "forward", "grad_input"]


@triton.jit
def _welford_combine(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan et al.'s combination of two (mean, sum of squared deviations M2, count) summaries.

    Used three ways: to fold one value into a lane's summary (mean_b = value, m2_b = 0, count_b = 1,
    or 0 for a masked lane), to reduce a tile's lanes (tl.reduce), and to combine programs' partials.
    Exact in exact arithmetic and free of the cancellation of sum(x^2) - sum(x)^2 / M. Counts are fp32:
    exact to 2^24 values per summary, and a rounded count only perturbs the weights by 2^-24.
    """
    count = count_a + count_b
    # count_b / count, written so that two empty summaries give 0, not 0 / 0 (count_b is then 0).
    # Triton's approximate division (`div.full.f32`, <= 2 ulps, on the GPU) and not tl.div_rn: this
    # runs once per element in the statistics pass, where the IEEE sequence would cost about as many
    # instructions as the rest of the fold and make a bf16 pass compute-bound on an H100/H200. Its
    # error is in the weight of a summand, the size of the fold's own rounding; the statistics stay
    # within the BN tests' 1e-5 (tests/test_triton_sm90.py pins which BN kernels may approximate).
    frac_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * frac_b, m2_a + m2_b + delta * delta * count_a * frac_b, count


@triton.jit
def _tile(tile, c_block, S, C, num_s_blocks, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sample n, spatial positions s, channels c (all int64) of a tile, and its in-bounds mask."""
    n = (tile // num_s_blocks).to(tl.int64)
    s = (tile % num_s_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = c_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, s, c, (s < S)[:, None] & (c < C)[None, :]


@triton.jit
def _offsets(n, s, c, stride_n, stride_s, stride_c):
    """Element offsets of a (BLOCK_S, BLOCK_C) tile in a tensor with the given strides."""
    return n * stride_n + s[:, None] * stride_s + c[None, :] * stride_c


@triton.jit
def _load_channels(ptr, c, C, other):
    """fp32 values of a per-channel (C,) tensor at channels c; `other` outside [0, C)."""
    return tl.load(ptr + c, mask=c < C, other=other).to(tl.float32)


@triton.jit
def _invstd(var, eps):
    """1 / sqrt(var + eps) rounded as IEEE division and square root, as torch's BN computes it: tl.rsqrt
    is `rsqrt.approx.ftz` on the GPU (~2 ulps), an error every output would inherit and that the
    BN tests' bound (2x torch's own error, a few fp32 roundings when torch is exact) leaves no room
    for at small channel counts. Per channel, so its cost is nil."""
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _channel_scale(mean_ptr, var_ptr, weight_ptr, c, C, eps, HAS_WEIGHT: tl.constexpr):
    """fp32 (mean, weight / sqrt(var + eps)) of channels c, so that bn(x) = (x - mean) * scale + bias."""
    scale = _invstd(_load_channels(var_ptr, c, C, 1.0), eps)
    if HAS_WEIGHT:
        scale *= _load_channels(weight_ptr, c, C, 0.0)
    return _load_channels(mean_ptr, c, C, 0.0), scale


@triton.jit
def _stats_partial_kernel(
    x_ptr,  # input, any float dtype, read through its strides
    partial_ptr,  # out: fp32 (3, splits, C): mean, M2 and count of each program's values per channel
    S,  # spatial positions per sample (the batch merged in when N = 1)
    C,  # channels
    num_s_blocks,  # cdiv(S, BLOCK_S): tiles per sample
    num_tiles,  # N * num_s_blocks: tiles per channel block
    tiles_per_split,  # consecutive tiles reduced by one program
    stride_xn,  # x's stride along the batch, in elements
    stride_xs,  # x's stride along the flattened spatial dims
    stride_xc,  # x's stride along the channels
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    # Grid (channel blocks, splits). Each lane keeps its own Welford summary across the program's
    # tiles (no cross-thread traffic in the loop); the lanes are combined once at the end.
    c_block = tl.program_id(0)
    split = tl.program_id(1)
    mean = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    count = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        n, s, c, mask = _tile(tile, c_block, S, C, num_s_blocks, BLOCK_S, BLOCK_C)
        x = tl.load(x_ptr + _offsets(n, s, c, stride_xn, stride_xs, stride_xc), mask=mask, other=0.0)
        mean, m2, count = _welford_combine(mean, m2, count, x.to(tl.float32), 0.0, mask.to(tl.float32))
    mean, m2, count = tl.reduce((mean, m2, count), 0, _welford_combine)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    out = partial_ptr + split * C + c
    plane = tl.num_programs(1) * C
    tl.store(out, mean, mask=c < C)
    tl.store(out + plane, m2, mask=c < C)
    tl.store(out + 2 * plane, count, mask=c < C)


@triton.jit
def _stats_finalize_kernel(
    partial_ptr,  # fp32 (3, splits, C) from _stats_partial_kernel
    mean_ptr,  # out: fp32 (C,) batch mean
    var_ptr,  # out: fp32 (C,) biased batch variance, which x is normalised with
    running_mean_ptr,  # in/out: (C,) running mean, any float dtype (used if HAS_RUNNING)
    running_var_ptr,  # in/out: (C,) running variance, updated with the unbiased batch variance
    momentum,  # weight of this batch in the running averages
    splits,  # programs per channel block in the partial pass
    C,  # channels
    HAS_RUNNING: tl.constexpr,  # whether to update the running statistics
    BLOCK_C: tl.constexpr,  # channels per program
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = tl.zeros([BLOCK_C], tl.float32)
    for split in range(splits):
        part = partial_ptr + split * C
        mean, m2, count = _welford_combine(
            mean,
            m2,
            count,
            _load_channels(part, c, C, 0.0),
            _load_channels(part + splits * C, c, C, 0.0),
            _load_channels(part + 2 * splits * C, c, C, 0.0),
        )
    # Padding channels have count 0; the maximum keeps them finite (their stores are masked).
    tl.store(mean_ptr + c, mean, mask=c < C)
    # IEEE division (per channel, free): the variance feeds every output.
    tl.store(var_ptr + c, tl.div_rn(m2, tl.maximum(count, 1.0)), mask=c < C)
    if HAS_RUNNING:
        # The caller rejects training with one value per channel, so count - 1 >= 1 on real channels.
        unbiased_var = tl.div_rn(m2, tl.maximum(count - 1.0, 1.0))
        running_mean = _load_channels(running_mean_ptr, c, C, 0.0)
        running_var = _load_channels(running_var_ptr, c, C, 0.0)
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * unbiased_var
        store_rounded(running_mean_ptr, c, new_mean, c < C)
        store_rounded(running_var_ptr, c, new_var, c < C)


@triton.jit
def _forward_apply_kernel(
    x_ptr,  # input
    residual_ptr,  # residual, x's shape and dtype (used if HAS_RESIDUAL)
    y_ptr,  # out: relu((x - mean) * scale + bias + residual), x's dtype
    mean_ptr,  # (C,) mean to normalise with: the batch's (training) or the running one (eval)
    var_ptr,  # (C,) variance to normalise with, likewise
    weight_ptr,  # (C,) weight (used if HAS_WEIGHT)
    bias_ptr,  # (C,) bias (used if HAS_BIAS)
    eps,  # added to the variance
    S,  # spatial positions per sample
    C,  # channels
    num_s_blocks,  # cdiv(S, BLOCK_S)
    num_c_blocks,  # cdiv(C, BLOCK_C)
    stride_xn,  # x's strides (batch, spatial, channel), in elements
    stride_xs,
    stride_xc,
    stride_rn,  # residual's strides
    stride_rs,
    stride_rc,
    stride_yn,  # y's strides
    stride_ys,
    stride_yc,
    HAS_RESIDUAL: tl.constexpr,  # whether a residual is added
    HAS_WEIGHT: tl.constexpr,  # whether a weight scales the normalised x
    HAS_BIAS: tl.constexpr,  # whether a bias is added
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    # One tile per program; 1-D grid, channel blocks fastest, so neighbouring programs of a
    # channels_last tensor read neighbouring memory.
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    n, s, c, mask = _tile(pid // num_c_blocks, c_block, S, C, num_s_blocks, BLOCK_S, BLOCK_C)
    mean, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, c, C, eps, HAS_WEIGHT)
    x = tl.load(x_ptr + _offsets(n, s, c, stride_xn, stride_xs, stride_xc), mask=mask, other=0.0)
    # (x - mean) * scale rather than x * scale + shift: no cancellation when |mean| >> std.
    z = (x.to(tl.float32) - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        z += _load_channels(bias_ptr, c, C, 0.0)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + _offsets(n, s, c, stride_rn, stride_rs, stride_rc), mask=mask, other=0.0)
        z += r.to(tl.float32)
    # ReLU written so that NaN stays NaN, as torch.relu does (max(NaN, 0) is 0 on GPUs).
    y = tl.where(z < 0.0, 0.0, z)
    store_rounded(y_ptr, _offsets(n, s, c, stride_yn, stride_ys, stride_yc), y, mask)


# Backward maths, per channel over its M values, with xhat = (x - mean) * invstd and
# invstd = 1 / sqrt(var + eps):
#   z = weight * xhat + bias + residual, y = relu(z)
#   => dz = dy * (y > 0), dresidual = dz, dbias = sum(dz), dweight = sum(dz * xhat), dxhat = weight * dz.
# Training: mean = sum(x) / M and var = sum((x - mean)^2) / M depend on x, with
#   d mean / d x_i = 1 / M,  d var / d x_i = 2 (x_i - mean) / M,  d invstd / d x_i = -invstd^2 xhat_i / M,
#   so  d xhat_j / d x_i = invstd * (delta_ij - 1 / M - xhat_j * xhat_i / M)  and
#   dx_i = sum_j dxhat_j * d xhat_j / d x_i
#        = weight * invstd * (dz_i - sum(dz) / M - xhat_i * sum(dz * xhat) / M).
# Eval: mean and var are the running stats, constants: dx = weight * invstd * dz.
# Hence one pass reduces sum(dz) and sum(dz * (x - mean)) = sum(dz * xhat) / invstd (and writes dz),
# and, once both are known, a second pass writes dx.
@triton.jit
def _grad_partial_kernel(
    dy_ptr,  # gradient of the output
    y_ptr,  # saved output; y > 0 is ReLU's mask
    x_ptr,  # saved input
    dz_ptr,  # out: dz = dy * (y > 0), which is also the residual's gradient; x's dtype
    mean_ptr,  # (C,) mean x was normalised with
    partial_ptr,  # out: fp32 (2, splits, C): each program's sum(dz) and sum(dz * (x - mean))
    S,  # spatial positions per sample
    C,  # channels
    num_s_blocks,  # cdiv(S, BLOCK_S)
    num_tiles,  # N * num_s_blocks: tiles per channel block
    tiles_per_split,  # consecutive tiles reduced by one program
    stride_dyn,  # dy's strides (batch, spatial, channel), in elements; 0 for an expanded dy
    stride_dys,
    stride_dyc,
    stride_yn,  # y's strides
    stride_ys,
    stride_yc,
    stride_xn,  # x's strides
    stride_xs,
    stride_xc,
    stride_dzn,  # dz's strides
    stride_dzs,
    stride_dzc,
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    # Backward pass 1 (maths above). sum(dz * (x - mean)) rather than sum(dz * x) - mean * sum(dz)
    # avoids cancellation. Grid (channel blocks, splits) as in the statistics pass; per-lane fp32
    # sums, combined once at the end.
    c_block = tl.program_id(0)
    split = tl.program_id(1)
    channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = _load_channels(mean_ptr, channels, C, 0.0)[None, :]
    sum_dz = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    sum_dz_xc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        n, s, c, mask = _tile(tile, c_block, S, C, num_s_blocks, BLOCK_S, BLOCK_C)
        dy = tl.load(dy_ptr + _offsets(n, s, c, stride_dyn, stride_dys, stride_dyc), mask=mask, other=0.0)
        y = tl.load(y_ptr + _offsets(n, s, c, stride_yn, stride_ys, stride_yc), mask=mask, other=0.0)
        dz = tl.where(y > 0.0, dy.to(tl.float32), 0.0)
        store_rounded(dz_ptr, _offsets(n, s, c, stride_dzn, stride_dzs, stride_dzc), dz, mask)
        x = tl.load(x_ptr + _offsets(n, s, c, stride_xn, stride_xs, stride_xc), mask=mask, other=0.0)
        sum_dz += dz
        sum_dz_xc += dz * (x.to(tl.float32) - mean)
    out = partial_ptr + split * C + channels
    tl.store(out, tl.sum(sum_dz, 0), mask=channels < C)
    tl.store(out + tl.num_programs(1) * C, tl.sum(sum_dz_xc, 0), mask=channels < C)


@triton.jit
def _grad_finalize_kernel(
    partial_ptr,  # fp32 (2, splits, C) from _grad_partial_kernel
    var_ptr,  # (C,) variance x was normalised with
    weight_ptr,  # (C,) weight (used if HAS_WEIGHT)
    dweight_ptr,  # out: fp32 (C,) sum(dz * xhat)
    dbias_ptr,  # out: fp32 (C,) sum(dz)
    coef_ptr,  # out: fp32 (3, C): alpha, beta, gamma with dx = alpha*dz + beta*(x - mean) + gamma
    eps,  # added to the variance
    inv_count,  # 1 / M, M = values per channel
    splits,  # programs per channel block in the partial pass
    C,  # channels
    TRAINING: tl.constexpr,  # batch statistics (mean and var depend on x) or running ones
    HAS_WEIGHT: tl.constexpr,  # whether a weight scales the normalised x
    BLOCK_C: tl.constexpr,  # channels per program
):
    # With scale = weight * invstd, training's dx (derived above _grad_partial_kernel)
    #   dx = scale * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)
    # is alpha * dz + beta * (x - mean) + gamma with
    #   alpha = scale, beta = -scale * invstd * sum(dz * xhat) / M, gamma = -scale * sum(dz) / M;
    # in eval, mean and var are constants: dx = scale * dz (beta = gamma = 0).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    sum_dz = tl.zeros([BLOCK_C], tl.float32)
    sum_dz_xc = tl.zeros([BLOCK_C], tl.float32)
    for split in range(splits):
        sum_dz += _load_channels(partial_ptr + split * C, c, C, 0.0)
        sum_dz_xc += _load_channels(partial_ptr + (splits + split) * C, c, C, 0.0)
    invstd = _invstd(_load_channels(var_ptr, c, C, 1.0), eps)
    scale = invstd
    if HAS_WEIGHT:
        scale *= _load_channels(weight_ptr, c, C, 0.0)
    sum_dz_xhat = sum_dz_xc * invstd
    tl.store(dweight_ptr + c, sum_dz_xhat, mask=c < C)
    tl.store(dbias_ptr + c, sum_dz, mask=c < C)
    beta = tl.zeros([BLOCK_C], tl.float32)
    gamma = tl.zeros([BLOCK_C], tl.float32)
    if TRAINING:
        beta = -scale * invstd * sum_dz_xhat * inv_count
        gamma = -scale * sum_dz * inv_count
    tl.store(coef_ptr + c, scale, mask=c < C)
    tl.store(coef_ptr + C + c, beta, mask=c < C)
    tl.store(coef_ptr + 2 * C + c, gamma, mask=c < C)


@triton.jit
def _grad_input_kernel(
    dz_ptr,  # dz from _grad_partial_kernel
    x_ptr,  # saved input (read if TRAINING)
    dx_ptr,  # out: gradient of x, x's dtype
    mean_ptr,  # (C,) mean x was normalised with (read if TRAINING)
    coef_ptr,  # fp32 (3, C): alpha, beta, gamma from _grad_finalize_kernel
    S,  # spatial positions per sample
    C,  # channels
    num_s_blocks,  # cdiv(S, BLOCK_S)
    num_c_blocks,  # cdiv(C, BLOCK_C)
    stride_dzn,  # dz's strides (batch, spatial, channel), in elements
    stride_dzs,
    stride_dzc,
    stride_xn,  # x's strides
    stride_xs,
    stride_xc,
    stride_dxn,  # dx's strides
    stride_dxs,
    stride_dxc,
    TRAINING: tl.constexpr,  # dx depends on x through the batch statistics
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    # Backward pass 2: dx = alpha * dz + beta * (x - mean) + gamma (see _grad_finalize_kernel).
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    n, s, c, mask = _tile(pid // num_c_blocks, c_block, S, C, num_s_blocks, BLOCK_S, BLOCK_C)
    dz = tl.load(dz_ptr + _offsets(n, s, c, stride_dzn, stride_dzs, stride_dzc), mask=mask, other=0.0)
    dx = dz.to(tl.float32) * _load_channels(coef_ptr, c, C, 0.0)[None, :]
    if TRAINING:
        x = tl.load(x_ptr + _offsets(n, s, c, stride_xn, stride_xs, stride_xc), mask=mask, other=0.0)
        x_centred = x.to(tl.float32) - _load_channels(mean_ptr, c, C, 0.0)[None, :]
        dx += x_centred * _load_channels(coef_ptr + C, c, C, 0.0)[None, :]
        dx += _load_channels(coef_ptr + 2 * C, c, C, 0.0)[None, :]
    store_rounded(dx_ptr, _offsets(n, s, c, stride_dxn, stride_dxs, stride_dxc), dx, mask)


# ---- launchers -------------------------------------------------------------------------------

# Elements per tile, the longest side along the contiguous axis, and channels per program of the
# per-channel kernels. Provisional until measured on a GPU.
_TILE = 4096
_MAX_BLOCK_S = 1024
_MAX_BLOCK_C = 128
# Channels per tile when channels are strided (NCHW): each channel of a tile is its own row of
# 64-bit addresses, and a 64 x 64 tile (CIFAR's 8x8 stage) spilled registers in the forward pass
# when compiled for sm_90 (tests/test_triton_sm90.py); 32 keeps 8 elements per thread.
_MAX_BLOCK_C_STRIDED = 32
_FINALIZE_BLOCK_C = 128

Strides = tuple[int, int, int]


def _flat_strides(t: Tensor) -> Strides | None:
    """(batch, spatial, channel) element strides of t seen as (N, C, S); None if its spatial dims
    cannot be flattened into one stride. Size-1 dims are ignored: their stride is arbitrary."""
    spatial = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:], strict=True) if size != 1]
    for (_, outer), (inner_size, inner) in itertools.pairwise(spatial):
        if outer != inner_size * inner:
            return None
    return t.stride(0), spatial[-1][1] if spatial else 1, t.stride(1)


def _walkable(t: Tensor) -> Tensor:
    """t itself when the kernels can walk its strides, else a contiguous copy (rare: e.g. x[..., ::2])."""
    return t if _flat_strides(t) is not None else t.contiguous()


def _output_like(x: Tensor) -> tuple[Tensor, Tensor]:
    """(out, target): out is `torch.empty_like(x)`, the layout the ops promise; target is what the
    kernels write, out itself or, when out's spatial dims cannot be flattened into one stride (a
    dense x with permuted spatial dims, e.g. x.transpose(2, 3)), a contiguous tensor that
    `_copy_back` copies into out afterwards."""
    out = torch.empty_like(x)
    if _flat_strides(out) is not None:
        return out, out
    return out, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _copy_back(out: Tensor, target: Tensor) -> Tensor:
    return out if target is out else out.copy_(target)


@dataclass(frozen=True)
class _Plan:
    """How the kernels of one pass walk its tensors (all of x's shape) as (N, C, S) tiles."""

    C: int
    S: int
    count: int  # values per channel, N * S
    num_s_blocks: int
    num_c_blocks: int
    num_tiles: int  # tiles per channel block
    block_s: int
    block_c: int
    num_warps: int
    strides: tuple[Strides, ...]  # per tensor, in the order given; (0, 0, 0) for an absent one

    def strides_of(self, *indices: int) -> list[int]:
        return [stride for i in indices for stride in self.strides[i]]


def _merge_batch(N: int, S: int, strides: list[Strides | None]) -> tuple[int, int, list[Strides | None]]:
    """Fold the batch into S when every tensor steps from one sample to the next by S spatial steps."""
    merged: list[Strides | None] = []
    for st in strides:
        if st is None or N == 1:
            merged.append(st)
            continue
        stride_n, stride_s, stride_c = st
        if S == 1:
            stride_s = stride_n
        elif stride_n != S * stride_s:
            return N, S, strides
        merged.append((0, stride_s, stride_c))
    return 1, N * S, merged


def _block_sizes(C: int, S: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C): the memory-contiguous axis gets the long side of the tile."""
    if channels_contiguous:
        block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
        return min(triton.next_power_of_2(S), _TILE // block_c), block_c
    block_s = min(triton.next_power_of_2(S), _MAX_BLOCK_S)
    return block_s, min(triton.next_power_of_2(C), _TILE // block_s, _MAX_BLOCK_C_STRIDED)


def _plan(tensors: Sequence[Tensor | None]) -> _Plan:
    """Plan a pass over tensors of the first one's shape (each walkable, or None)."""
    x = tensors[0]
    assert x is not None and x.numel() > 0, "empty inputs are handled by the caller"
    N, C = x.shape[0], x.shape[1]
    count = x.numel() // C
    flat = [None if t is None else _flat_strides(t) for t in tensors]
    # An unwalkable tensor would otherwise be indexed with (0, 0, 0) strides, like an absent one.
    assert all(st is not None for t, st in zip(tensors, flat, strict=True) if t is not None), "not walkable"
    N, S, strides = _merge_batch(N, count // N, flat)
    _, stride_s, stride_c = strides[0]
    block_s, block_c = _block_sizes(C, S, S == 1 or abs(stride_c) < abs(stride_s))
    num_s_blocks = triton.cdiv(S, block_s)
    return _Plan(
        C=C,
        S=S,
        count=count,
        num_s_blocks=num_s_blocks,
        num_c_blocks=triton.cdiv(C, block_c),
        num_tiles=N * num_s_blocks,
        block_s=block_s,
        block_c=block_c,
        num_warps=max(1, min(8, block_s * block_c // 256)),
        strides=tuple((0, 0, 0) if st is None else st for st in strides),
    )


@functools.cache
def _programs_to_fill(device: torch.device) -> int:
    """Reduction programs wanted in flight: a few per SM on a GPU; a few in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _splits(plan: _Plan, device: torch.device) -> tuple[int, int]:
    """(tiles_per_split, splits) of a reduction pass: consecutive tiles per program, no empty one."""
    wanted = max(1, _programs_to_fill(device) // plan.num_c_blocks)
    tiles_per_split = triton.cdiv(plan.num_tiles, min(wanted, plan.num_tiles))
    return tiles_per_split, triton.cdiv(plan.num_tiles, tiles_per_split)


def _check_unit_stride(*per_channel: Tensor | None) -> None:
    """The kernels index per-channel tensors as ptr + c; running stats must be updated in place."""
    for t in per_channel:
        if t is not None and t.numel() > 1 and t.stride(0) != 1:
            raise ValueError(
                f"the triton backend needs per-channel tensors with stride 1, got stride {t.stride(0)}"
            )


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """A read-only per-channel tensor as the kernels index it (ptr + c); a copy only if strided."""
    return None if t is None else t.contiguous()


def batch_stats(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor]:
    """fp32 (mean, biased var) of x per channel, as `reference_bn.batch_stats`; updates the running
    stats in place when given."""
    _check_unit_stride(running_mean, running_var)
    x = _walkable(x)
    plan = _plan([x])
    tiles_per_split, splits = _splits(plan, x.device)
    partial = torch.empty(3, splits, plan.C, dtype=torch.float32, device=x.device)
    _stats_partial_kernel[(plan.num_c_blocks, splits)](
        x,
        partial,
        plan.S,
        plan.C,
        plan.num_s_blocks,
        plan.num_tiles,
        tiles_per_split,
        *plan.strides_of(0),
        BLOCK_S=plan.block_s,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    mean = torch.empty(plan.C, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    _stats_finalize_kernel[(triton.cdiv(plan.C, _FINALIZE_BLOCK_C),)](
        partial,
        mean,
        var,
        running_mean,
        running_var,
        float(momentum),
        splits,
        plan.C,
        HAS_RUNNING=running_mean is not None and running_var is not None,
        BLOCK_C=_FINALIZE_BLOCK_C,
    )
    return mean, var


def forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
) -> Tensor:
    """y, as `reference_bn.forward` (x's dtype, `torch.empty_like(x)`'s layout)."""
    weight, bias, mean, var = map(_unit_stride, (weight, bias, mean, var))
    out, y = _output_like(x)
    x = _walkable(x)
    residual = None if residual is None else _walkable(residual)
    plan = _plan([x, residual, y])
    _forward_apply_kernel[(plan.num_tiles * plan.num_c_blocks,)](
        x,
        residual,
        y,
        mean,
        var,
        weight,
        bias,
        float(eps),
        plan.S,
        plan.C,
        plan.num_s_blocks,
        plan.num_c_blocks,
        *plan.strides_of(0, 1, 2),
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_S=plan.block_s,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    return _copy_back(out, y)


def backward(
    dy: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    training: bool,
    need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """(dx or None, dresidual, dweight, dbias), as `reference_bn.backward`; dweight, dbias fp32."""
    # The saved weight and statistics may be strided views (the kernels index them as ptr + c).
    weight, mean, var = map(_unit_stride, (weight, mean, var))
    dz_out, dz = _output_like(x)
    dx_out, dx = _output_like(x) if need_dx else (None, None)
    dy, x, y = _walkable(dy), _walkable(x), _walkable(y)
    plan = _plan([x, dy, y, dz, dx])
    tiles_per_split, splits = _splits(plan, x.device)
    partial = torch.empty(2, splits, plan.C, dtype=torch.float32, device=x.device)
    _grad_partial_kernel[(plan.num_c_blocks, splits)](
        dy,
        y,
        x,
        dz,
        mean,
        partial,
        plan.S,
        plan.C,
        plan.num_s_blocks,
        plan.num_tiles,
        tiles_per_split,
        *plan.strides_of(1, 2, 0, 3),
        BLOCK_S=plan.block_s,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    dweight = torch.empty(plan.C, dtype=torch.float32, device=x.device)
    dbias = torch.empty_like(dweight)
    coef = torch.empty(3, plan.C, dtype=torch.float32, device=x.device)
    _grad_finalize_kernel[(triton.cdiv(plan.C, _FINALIZE_BLOCK_C),)](
        partial,
        var,
        weight,
        dweight,
        dbias,
        coef,
        float(eps),
        1.0 / plan.count,
        splits,
        plan.C,
        TRAINING=training,
        HAS_WEIGHT=weight is not None,
        BLOCK_C=_FINALIZE_BLOCK_C,
    )
    if dx is not None:
        _launch_grad_input(plan, plan.strides_of(3, 0, 4), dz, x, dx, mean, coef, training)
        dx = _copy_back(dx_out, dx)
    return dx, _copy_back(dz_out, dz), dweight, dbias


def grad_input(
    dz: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    count: int | Tensor,
) -> Tensor:
    """Training's dx from given per-channel sums over `count` values, as `reference_bn.grad_input`."""
    dx_out, dx = _output_like(x)
    dz, x = _walkable(dz), _walkable(x)
    plan = _plan([x, dz, dx])
    # alpha, beta, gamma as _grad_finalize_kernel computes them, from the given sums and count.
    invstd = torch.rsqrt(var.float() + eps)
    scale = invstd if weight is None else invstd * weight.float()
    coef = torch.stack([scale, -scale * invstd * sum_dz_xhat / count, -scale * sum_dz / count])
    _launch_grad_input(plan, plan.strides_of(1, 0, 2), dz, x, dx, mean.contiguous(), coef, True)
    return _copy_back(dx_out, dx)


def _launch_grad_input(
    plan: _Plan,
    strides: list[int],
    dz: Tensor,
    x: Tensor,
    dx: Tensor,
    mean: Tensor,
    coef: Tensor,
    training: bool,
) -> None:
    """dx = alpha * dz + beta * (x - mean) + gamma; strides of dz, x and dx, in that order."""
    _grad_input_kernel[(plan.num_tiles * plan.num_c_blocks,)](
        dz,
        x,
        dx,
        mean,
        coef,
        plan.S,
        plan.C,
        plan.num_s_blocks,
        plan.num_c_blocks,
        *strides,
        TRAINING=training,
        BLOCK_S=plan.block_s,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
