"""Fused BatchNorm-statistics loss: ||mean_c(x) - rm||_2 + ||var_c(x) - rv||_2 over (B,H,W).

The kernel computes per-channel moments in one pass over x, as shifted sums
(s = x[0, c, 0, 0], read by the kernel itself; S1 = sum(x - s), S2 = sum((x - s)^2);
mean = s + S1/n, var = S2/n - (S1/n)^2)
so a large offset (x = 1e3 + noise) keeps its variance in fp32. x is read through its strides as
rows (b, h, w) x channels, so NCHW and channels_last both run without a copy.
The backward is one pass writing dx = g_mean/n + g_var * 2 (x - mean)/n.

Many layers (a teacher has dozens of BN layers) go through `bn_stat_losses`: one moments launch
per layer writes into one shared partial buffer; the finalise (moments from the partial sums) and the
segmented norm then run once over all layers' channels, about 25 launches in all, instead of about
ten small launches per layer.
"""
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InputError
from . import glue
from .grid import row_split

__all__ = ["bn_stat_loss", "bn_stat_losses", "bn_moments"]


@triton.jit
def _moments_kernel(X, Shift, Part, R, C, HW, col0, total_c, stride_b, stride_c, stride_s,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Part[pid_r, 0/1, col0 + c] = sum over this program's rows of (x - shift_c) and its square,
    with shift_c = x[0, c, 0, 0] (written to Shift[col0 + c] by the first row of programs)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.num_programs(0)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    shift = tl.load(X + rc * stride_c, mask=c_ok, other=0.0).to(tl.float32)
    if pid_r == 0:
        tl.store(Shift + col0 + rc, shift, mask=c_ok)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(pid_r * BLOCK_R, R, split * BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        off = (rr // HW).to(tl.int64) * stride_b + (rr % HW).to(tl.int64) * stride_s
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(X + off[:, None] + rc[None, :] * stride_c, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - shift[None, :], 0.0)
        s1 += tl.sum(d, axis=0)
        s2 += tl.sum(d * d, axis=0)
    out = Part + pid_r.to(tl.int64) * 2 * total_c + col0
    tl.store(out + rc, s1, mask=c_ok)
    tl.store(out + total_c + rc, s2, mask=c_ok)


@triton.jit
def _moments_bwd_kernel(X, DX, Mean, GMean, GVar, R, C, HW, inv_n, stride_b, stride_c, stride_s,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = g_mean_c / n + g_var_c * 2 (x - mean_c) / n, written in x's layout."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rr < R)[:, None] & c_ok[None, :]
    mean = tl.load(Mean + rc, mask=c_ok, other=0.0)
    gm = tl.load(GMean + rc, mask=c_ok, other=0.0) * inv_n
    gv = tl.load(GVar + rc, mask=c_ok, other=0.0) * (2.0 * inv_n)
    off = (rr // HW).to(tl.int64)[:, None] * stride_b + (rr % HW).to(tl.int64)[:, None] * stride_s + rc[None, :] * stride_c
    x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    dx = gm[None, :] + gv[None, :] * (x - mean[None, :])
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(x: Tensor) -> tuple[int, int]:
    """Tile (rows, channels): long along whichever of the two is contiguous in memory."""
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels_last: channels contiguous
        bc = min(128, triton.next_power_of_2(x.shape[1]))
        return max(16, 4096 // bc), bc
    return 512, 8


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(batch, channel, spatial) strides of x viewed as [B, C, H*W]; H and W must be mergeable."""
    B, C, H, W = x.shape
    if H > 1 and W > 1 and x.stride(2) != W * x.stride(3):
        raise InputError("bn_stat_loss: x must be contiguous or channels_last")
    return x.stride(0), x.stride(1), x.stride(3) if W > 1 else x.stride(2)


@torch.library.custom_op("dearkd_fast::bn_moments", mutates_args=())
def bn_moments(xs: List[Tensor]) -> List[Tensor]:
    """[mean_cat, var_cat]: per-channel biased moments of every x in xs, channels concatenated (fp32)."""
    device = xs[0].device
    total_c = sum(x.shape[1] for x in xs)
    plans, split = [], 1
    for x in xs:
        br, bc = _blocks(x)
        rows = x.shape[0] * x.shape[2] * x.shape[3]
        s = row_split(rows, br, triton.cdiv(x.shape[1], bc), device)
        plans.append((br, bc, rows, s))
        split = max(split, s)
    part = torch.zeros((split, 2, total_c), device=device, dtype=torch.float32)
    shift = torch.empty((total_c,), device=device, dtype=torch.float32)
    col0 = 0
    for x, (br, bc, rows, s) in zip(xs, plans):
        C = x.shape[1]
        _moments_kernel[(s, triton.cdiv(C, bc))](x, shift, part, rows, C, x.shape[2] * x.shape[3], col0, total_c,
                                                  *_strides(x), BLOCK_R=br, BLOCK_C=bc)
        col0 += C
    n = glue.metadata(xs)[1]
    sums = part.sum(0)
    d_mean = sums[0] / n
    mean = shift + d_mean
    var = (sums[1] / n - d_mean * d_mean).clamp_min(0.0)
    return [mean, var]


@torch.library.custom_op("dearkd_fast::bn_moments_backward", mutates_args=())
def _moments_bwd(xs: List[Tensor], mean: Tensor, grad_mean: Tensor, grad_var: Tensor) -> List[Tensor]:
    dxs, col0 = [], 0
    for x in xs:
        dx = torch.empty_like(x)  # same memory format, same strides when x is dense
        if dx.stride() != x.stride():  # x has gaps (a batch slice, say): read a dense copy, one set of strides
            x = x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
            dx = torch.empty_like(x)
        C = x.shape[1]
        rows = x.shape[0] * x.shape[2] * x.shape[3]
        br, bc = _blocks(x)
        sl = slice(col0, col0 + C)
        _moments_bwd_kernel[(triton.cdiv(rows, br), triton.cdiv(C, bc))](
            x, dx, mean[sl].contiguous(), grad_mean[sl].contiguous(), grad_var[sl].contiguous(), rows, C,
            x.shape[2] * x.shape[3], 1.0 / rows, *_strides(x), BLOCK_R=br, BLOCK_C=bc)
        dxs.append(dx)
        col0 += C
    return dxs


glue.register_bn("dearkd_fast")


def bn_stat_losses(xs: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor]) -> Tensor:
    """Per-layer losses [L] = ||mean_l - rm_l|| + ||var_l - rv_l||, all layers finalised together."""
    return glue.bn_stat_losses(bn_moments, xs, running_means, running_vars)


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """Fused DeepInversion BN-statistics loss of one layer (fp32 scalar); differentiable in x."""
    return bn_stat_losses([x], [running_mean], [running_var])[0]
