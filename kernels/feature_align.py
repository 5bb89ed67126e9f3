"""Fused feature-alignment loss: L = mean over (b, n, c) of (T W^T + b - F_hw)^2, built around the tensor cores.

One pass over the tokens computes the loss and its three gradients while each residual tile is on chip
(the gradient is computed in the forward and scaled in the backward, as the best fused-loss kernels do):

    R = T W^T + b - F        [BLOCK_M, BLOCK_C] tiles, fp32 accumulation of bf16/fp16 tl.dot products
    loss = sum R^2 / (M C);  dT = s R W;  dW = s R^T T;  db = s sum_m R;  s = 2 / (M C)

Grid (D / BLOCK_D, G): program (k, g) walks the row tiles of group g; for each tile and channel chunk it
forms R (a K loop over all of D), adds R W[:, k] into its dT tile (registers) and R^T T[:, k] into its group's
dW partial (kept in global memory, read-modify-written by this program alone, so the order is fixed). The
D / BLOCK_D programs of a group run side by side (axis 0 is the fastest), so each token tile comes from DRAM
once and from L2 for the others. A second, small kernel adds the G partials of dW, db and the loss in
group order: deterministic, no atomics, and no [B, N, C] tensor anywhere.

fp32 tokens (a residual stream under autocast) are read as they are and rounded to the weight's dtype tile
by tile: no whole-tensor cast. fp32 weights (no autocast) multiply in IEEE fp32. Under TRITON_INTERPRET=1 every
dot is upcast to fp32 (the interpreter's bf16 dot is wrong). When no gradient is needed the same kernel
runs with GRADS=False (loss only).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import glue
from .grid import PROGRAMS_PER_SM, Launch, arch_of, next_pow2, pick_config, sm_count

__all__ = ["feature_align_loss", "plan_align", "align_shape_class"]


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32: the interpreter's own cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _align_fused_kernel(T, W, Bias, F, DT, Part, M, N, C, D, tiles_per_group, n_tiles, part_stride,
                        stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
                        stride_fb, stride_fc, stride_fn, stride_dtb, stride_dtn,
                        HAS_BIAS: tl.constexpr, GRADS: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Part[g] = [dW partial (C*D), db partial (C), sum R^2 (1)] of group g; DT rows of g's tiles (unit scale)."""
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    scale = 2.0 / (M.to(tl.float32) * C.to(tl.float32))
    rd = pid_k * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    part = Part + g.to(tl.int64) * part_stride
    loss = 0.0
    t_first = g * tiles_per_group
    t_end = tl.minimum(t_first + tiles_per_group, n_tiles)
    for tile in range(t_first, t_end):
        rm = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        b_idx = rm // N
        n_idx = rm - b_idx * N
        t_row = b_idx.to(tl.int64) * stride_tb + n_idx.to(tl.int64) * stride_tn
        f_row = b_idx.to(tl.int64) * stride_fb + n_idx.to(tl.int64) * stride_fn
        d_t = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if GRADS:
            t_k = tl.load(T + t_row[:, None] + rd[None, :] * stride_td, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            t_k = _round_bf16(t_k.to(tl.float32)) if ROUND_BF16 else t_k.to(W.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            c_ok = rc < C
            ok = m_ok[:, None] & c_ok[None, :]
            r = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < D
                t = tl.load(T + t_row[:, None] + rk[None, :] * stride_td, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(W + rc[None, :] * stride_wc + rk[:, None] * stride_wd, mask=k_ok[:, None] & c_ok[None, :],
                            other=0.0)
                if ROUND_BF16:  # interpreter, fp32 tokens, bf16 weight: round the tokens as the GPU's cast would
                    r += tl.dot(_round_bf16(t.to(tl.float32)), w.to(tl.float32), input_precision="ieee")
                elif UPCAST:
                    r += tl.dot(t.to(W.dtype.element_ty).to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    r += tl.dot(t.to(W.dtype.element_ty), w)
            if HAS_BIAS:
                r += tl.load(Bias + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            f = tl.load(F + f_row[:, None] + rc[None, :] * stride_fc, mask=ok, other=0.0)
            r = tl.where(ok, r - f.to(tl.float32), 0.0)
            if pid_k == 0:
                loss += tl.sum(tl.sum(r * r, axis=1), axis=0)
            if GRADS:
                w_k = tl.load(W + rc[:, None] * stride_wc + rd[None, :] * stride_wd, mask=c_ok[:, None] & d_ok[None, :],
                              other=0.0)
                if UPCAST:
                    d_t += tl.dot(r, w_k.to(tl.float32), input_precision="ieee")
                    d_w = tl.dot(tl.trans(r), t_k.to(tl.float32), input_precision="ieee")
                else:
                    rq = r.to(W.dtype.element_ty)
                    d_t += tl.dot(rq, w_k)
                    d_w = tl.dot(tl.trans(rq), t_k)
                # this group's dW partial: read-modify-write by this program alone (the first tile just writes)
                tl.debug_barrier()
                wp = part + rc.to(tl.int64)[:, None] * D + rd[None, :]
                w_okk = c_ok[:, None] & d_ok[None, :]
                old = tl.load(wp, mask=w_okk & (tile > t_first), other=0.0)
                tl.store(wp, old + d_w * scale, mask=w_okk)
                if pid_k == 0:
                    bp = part + C * D + rc
                    old_b = tl.load(bp, mask=c_ok & (tile > t_first), other=0.0)
                    tl.store(bp, old_b + tl.sum(r, axis=0) * scale, mask=c_ok)
        if GRADS:
            dt_ptr = DT + b_idx.to(tl.int64)[:, None] * stride_dtb + n_idx.to(tl.int64)[:, None] * stride_dtn + rd[None, :]
            tl.store(dt_ptr, (d_t * scale).to(DT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if pid_k == 0:
        tl.store(part + part_stride - 1, loss)


@triton.jit
def _align_reduce_kernel(Part, Out, G, L, part_stride, BLOCK: tl.constexpr):
    """Out[l] = sum over groups g (in order) of Part[g, l]: dW, db and the loss partials in one pass."""
    rl = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rl < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(Part + g * part_stride + rl, mask=ok, other=0.0)  # G * part_stride < 2**31
    tl.store(Out + rl, acc, mask=ok)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def align_shape_class(D: int, C: int) -> str:
    """The config table's shape class: the padded D (the dT tile's width) and whether C fits one chunk."""
    return f"d{min(next_pow2(D), 512)}-c{'small' if C <= 64 else 'large'}"


def _heuristic(D: int, C: int, dtype: torch.dtype) -> dict:
    """64-row tiles (one wgmma M per warpgroup), 128-wide D chunks, 64-wide C chunks; fp32 halves the tiles."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_C=32, BLOCK_K=32, BLOCK_D=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_C=64, BLOCK_K=64, BLOCK_D=min(128, max(16, next_pow2(D))), num_warps=8,
                num_stages=2)


def config_for(D: int, C: int, dtype: torch.dtype, device) -> dict:
    cfg = pick_config("feature_align", dtype, align_shape_class(D, C), arch_of(device), lambda: _heuristic(D, C, dtype))
    if _interpret():  # the interpreter runs a program per numpy call: small tiles keep the tests quick
        cfg = dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], 32), BLOCK_C=min(cfg["BLOCK_C"], 32),
                   BLOCK_K=min(cfg["BLOCK_K"], 32), BLOCK_D=min(cfg["BLOCK_D"], 32))
    return cfg


def plan_align(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, grads: bool):
    """The launches of one fused alignment call and their outputs: (launches, dT or None, reduced [C*D + C + 1]).
    tokens [B, T, D] with T >= N = h*w: the last N rows are the patch tokens (a ViT passes its whole sequence and
    gets a gradient with zeros in the prefix rows, no slice copy)."""
    B, T_len, D = tokens.shape
    C = weight.shape[0]
    h, w = target.shape[2], target.shape[3]
    N = h * w
    prefix = T_len - N
    M = B * N
    if w > 1 and h > 1 and target.stride(2) != w * target.stride(3):
        target = target.contiguous(memory_format=torch.channels_last if target.stride(1) == 1 else torch.contiguous_format)
    stride_fn = target.stride(3) if w > 1 else target.stride(2)
    device = tokens.device
    cfg = config_for(D, C, weight.dtype, device)
    bm, bd = cfg["BLOCK_M"], cfg["BLOCK_D"]
    n_tiles = triton.cdiv(M, bm)
    k_chunks = triton.cdiv(D, bd) if grads else 1  # without gradients only the loss is wanted
    groups = max(1, min(n_tiles, triton.cdiv(PROGRAMS_PER_SM * sm_count(device), k_chunks)))
    per_group = triton.cdiv(n_tiles, groups)
    groups = triton.cdiv(n_tiles, per_group)
    part_stride = C * D + C + 1
    part = torch.empty((groups, part_stride), device=device, dtype=torch.float32)
    dt = None
    if grads:
        dt = torch.empty(tokens.shape, device=device, dtype=tokens.dtype)
        if prefix:
            dt[:, :prefix].zero_()
    t_view = tokens[:, prefix:]
    dt_view = dt[:, prefix:] if dt is not None else part  # unused when grads is False
    out = torch.empty((part_stride,), device=device, dtype=torch.float32)
    meta = dict(M=M, N=N, C=C, D=D, groups=groups, tiles=n_tiles, k_chunks=k_chunks)
    launches = [
        Launch(_align_fused_kernel, (k_chunks, groups),
               (t_view, weight, bias if bias is not None else weight, target, dt_view, part, M, N, C, D,
                per_group, n_tiles, part_stride, *t_view.stride(), *weight.stride(),
                target.stride(0), target.stride(1), stride_fn,
                dt_view.stride(0) if dt is not None else 0, dt_view.stride(1) if dt is not None else 0),
               dict(HAS_BIAS=bias is not None, GRADS=grads, UPCAST=_interpret() or weight.dtype == torch.float32,
                    ROUND_BF16=_interpret() and tokens.dtype == torch.float32 and weight.dtype == torch.bfloat16,
                    BLOCK_M=bm, BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd),
               cfg["num_warps"], cfg["num_stages"], note=f"align one pass, {groups} groups x {k_chunks} D chunks",
               meta=meta),
        Launch(_align_reduce_kernel, (triton.cdiv(part_stride if grads else 1, 1024),),
               (part if grads else part[:, part_stride - 1:], out if grads else out[part_stride - 1:], groups,
                part_stride if grads else 1, part_stride),
               dict(BLOCK=1024), 4, 1, note="align reduction of the group partials"),
    ]
    return launches, dt, out


def _run(tokens, weight, bias, target, grads):
    launches, dt, out = plan_align(tokens, weight, bias, target, grads)
    for launch in launches:
        launch()
    return dt, out


@torch.library.custom_op("dearkd_fast::feature_align_loss", mutates_args=())
def _align_loss(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """The loss alone (no gradient wanted)."""
    C, D = weight.shape
    _, out = _run(tokens, weight, bias, target, grads=False)
    M = tokens.shape[0] * target.shape[2] * target.shape[3]
    return out[C * D + C] / (M * C)


@torch.library.custom_op("dearkd_fast::feature_align_loss_and_grads", mutates_args=())
def _align_loss_and_grads(tokens: Tensor, weight: Tensor, bias: Tensor | None,
                          target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dL/dT, dL/dW, dL/db) in one pass, the gradients at unit upstream gradient: dT in the tokens' dtype,
    dW and db in fp32 (small; cast after the backward scales them)."""
    C, D = weight.shape
    dt, out = _run(tokens, weight, bias, target, grads=True)
    M = tokens.shape[0] * target.shape[2] * target.shape[3]
    return out[C * D + C] / (M * C), dt, out[: C * D].view(C, D), out[C * D: C * D + C].clone()  # outputs may not alias


glue.register_align_fused("dearkd_fast")


def feature_align_loss(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """Fused L_align (fp32 scalar); differentiable in tokens, weight and bias (not in target). tokens may be a
    whole sequence [B, P + N, D] whose last N = h*w rows are the patch tokens."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (tokens, weight, bias))
    if not wants_grad:
        return _align_loss(tokens, weight, bias, target)
    return _align_loss_and_grads(tokens, weight, bias, target)[0]
