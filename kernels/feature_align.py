"""Fused feature-alignment loss: L = mean over (b, n, c) of (T W^T + b - F_hw)^2.

Rows m = b * N + n of the tokens T [B,N,D] (any strides) are projected tile by tile with tl.dot
and compared with the target F [B,C,h,w] read through its own strides (NCHW or channels_last, no
permute copy). Neither the forward nor the backward ever holds the [B,N,C] projection in memory:

    forward   grid (M/BM, C/BC): R = T W^T + b - F per tile, sum(R^2) -> one partial per program
    backward  dT = s * R W     grid (M/BM, D/BD), loop over C tiles, R recomputed;
              db = s * sum_m R  (same kernel, first D tile)
              dW = s * R^T T   grid (C/BC, D/BD, SPLIT), loop over M tiles, R recomputed;
    with s = grad * 2 / (B N C). Partials are summed on the host in a fixed order (deterministic).

Accumulation is fp32. Training feeds bf16/fp16 tokens and weights (ops.feature_align_loss casts them to
the autocast dtype): on the GPU those dots use the tensor cores. fp32 inputs (outside autocast) are
multiplied as IEEE fp32 (input_precision="ieee", not TF32): a caller who passes fp32 asked for fp32
accuracy, and the tests hold fp32 to fp32 tolerances. Under TRITON_INTERPRET=1 every dot is upcast to
fp32 (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import glue
from .grid import row_split

__all__ = ["feature_align_loss"]

BLOCK_M, BLOCK_C, BLOCK_K, BLOCK_D = 64, 64, 32, 128


@triton.jit
def _residual_tile(T, W, Bias, F, rm, rc, M, N, C, D, grid_w,
                   stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
                   stride_fb, stride_fc, stride_fh, stride_fw,
                   HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """R[rm, rc] = T[rm] . W[rc] + b[rc] - F[rm, rc] in fp32; zero outside (M, C)."""
    m_ok = rm < M
    c_ok = rc < C
    b_idx = rm // N
    n_idx = rm % N
    t_row = b_idx.to(tl.int64) * stride_tb + n_idx.to(tl.int64) * stride_tn
    acc = tl.zeros((rm.shape[0], rc.shape[0]), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < D
        t = tl.load(T + t_row[:, None] + rk[None, :] * stride_td, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rc[None, :] * stride_wc + rk[:, None] * stride_wd, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(t.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(t, w.to(t.dtype))
    if HAS_BIAS:
        acc += tl.load(Bias + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    f_off = b_idx.to(tl.int64) * stride_fb + (n_idx // grid_w) * stride_fh + (n_idx % grid_w) * stride_fw
    f = tl.load(F + f_off[:, None] + rc[None, :] * stride_fc, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    return tl.where(m_ok[:, None] & c_ok[None, :], acc - f.to(tl.float32), 0.0)


@triton.jit
def _align_fwd_kernel(T, W, Bias, F, Part, M, N, C, D, grid_w,
                      stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
                      stride_fb, stride_fc, stride_fh, stride_fw,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r = _residual_tile(T, W, Bias, F, rm, rc, M, N, C, D, grid_w, stride_tb, stride_tn, stride_td,
                       stride_wc, stride_wd, stride_fb, stride_fc, stride_fh, stride_fw, HAS_BIAS, UPCAST, BLOCK_K)
    tl.store(Part + pid_m * tl.num_programs(1) + pid_c, tl.sum(tl.sum(r * r, axis=1), axis=0))


@triton.jit
def _align_bwd_dt_kernel(T, W, Bias, F, Scale, DT, DbPart, M, N, C, D, grid_w,
                         stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
                         stride_fb, stride_fc, stride_fh, stride_fw,
                         HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    scale = tl.load(Scale)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        r = _residual_tile(T, W, Bias, F, rm, rc, M, N, C, D, grid_w, stride_tb, stride_tn, stride_td,
                           stride_wc, stride_wd, stride_fb, stride_fc, stride_fh, stride_fw, HAS_BIAS, UPCAST, BLOCK_K)
        w = tl.load(W + rc[:, None] * stride_wc + rd[None, :] * stride_wd, mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(r, w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(r.to(T.dtype.element_ty), w.to(T.dtype.element_ty))
        if pid_d == 0:
            tl.store(DbPart + pid_m * C + rc, tl.sum(r, axis=0) * scale, mask=c_ok)
    rm_ok = rm < M
    tl.store(DT + rm.to(tl.int64)[:, None] * D + rd[None, :], (acc * scale).to(DT.dtype.element_ty),
             mask=rm_ok[:, None] & d_ok[None, :])


@triton.jit
def _align_bwd_dw_kernel(T, W, Bias, F, Scale, DWPart, M, N, C, D, grid_w,
                         stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
                         stride_fb, stride_fc, stride_fh, stride_fw,
                         HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    split = tl.num_programs(2)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = rc < C
    d_ok = rd < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for mt in range(pid_s, tl.cdiv(M, BLOCK_M), split):
        rm = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        r = _residual_tile(T, W, Bias, F, rm, rc, M, N, C, D, grid_w, stride_tb, stride_tn, stride_td,
                           stride_wc, stride_wd, stride_fb, stride_fc, stride_fh, stride_fw, HAS_BIAS, UPCAST, BLOCK_K)
        t_row = (rm // N).to(tl.int64) * stride_tb + (rm % N).to(tl.int64) * stride_tn
        t = tl.load(T + t_row[:, None] + rd[None, :] * stride_td, mask=(rm < M)[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(tl.trans(r), t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(r.to(T.dtype.element_ty)), t)
    scale = tl.load(Scale)
    out = DWPart + pid_s.to(tl.int64) * C * D
    tl.store(out + rc[:, None] * D + rd[None, :], acc * scale, mask=c_ok[:, None] & d_ok[None, :])


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _common_args(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor):
    B, N, D = tokens.shape
    C = weight.shape[0]
    args = (tokens, weight, bias if bias is not None else weight, target)
    dims = (B * N, N, C, D, target.shape[3])
    strides = (*tokens.stride(), *weight.stride(), *target.stride())
    flags = dict(HAS_BIAS=bias is not None, UPCAST=_interpret() or tokens.dtype == torch.float32)
    return args, dims, strides, flags


def _dw_split(M: int, C: int, D: int, device: torch.device) -> int:
    """Programs along M for dW (each writes a partial [C, D] sum)."""
    return row_split(M, BLOCK_M, triton.cdiv(C, BLOCK_C) * triton.cdiv(D, BLOCK_D), device)


@torch.library.custom_op("dearkd_fast::feature_align_loss", mutates_args=())
def _align_fwd(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    args, (M, N, C, D, gw), strides, flags = _common_args(tokens, weight, bias, target)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))
    part = torch.empty(grid, device=tokens.device, dtype=torch.float32)
    _align_fwd_kernel[grid](*args, part, M, N, C, D, gw, *strides, **flags,
                            BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    return part.sum() / (M * C)


@torch.library.custom_op("dearkd_fast::feature_align_loss_backward", mutates_args=())
def _align_bwd(grad: Tensor, tokens: Tensor, weight: Tensor, bias: Tensor | None,
               target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    args, (M, N, C, D, gw), strides, flags = _common_args(tokens, weight, bias, target)
    scale = (grad.float() * (2.0 / (M * C))).reshape(1)
    dt = torch.empty(tokens.shape, device=tokens.device, dtype=tokens.dtype)
    db_part = torch.empty((triton.cdiv(M, BLOCK_M), C), device=tokens.device, dtype=torch.float32)
    blocks = dict(BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    _align_bwd_dt_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(D, BLOCK_D))](
        *args, scale, dt, db_part, M, N, C, D, gw, *strides, **flags, **blocks)
    split = _dw_split(M, C, D, tokens.device)
    dw_part = torch.empty((split, C, D), device=tokens.device, dtype=torch.float32)
    _align_bwd_dw_kernel[(triton.cdiv(C, BLOCK_C), triton.cdiv(D, BLOCK_D), split)](
        *args, scale, dw_part, M, N, C, D, gw, *strides, **flags, **blocks)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype if bias is not None else weight.dtype)
    return dt, dw, db


glue.register_align("dearkd_fast")


def feature_align_loss(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """Fused L_align (fp32 scalar); differentiable in tokens, weight and bias (not in target)."""
    return _align_fwd(tokens, weight, bias, target)
