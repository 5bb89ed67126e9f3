"""Fused BatchNorm-statistics loss: ||mean_c(x) - rm||_2 + ||var_c(x) - rv||_2 over (B,H,W), built for bandwidth.

Bytes, the floor: the forward reads x once; the backward reads x once and writes dx once. Nothing else of x's
size is read or written.

Work is cut into *items*, listed in a table built once per set of shapes (all layers of a call in one table):
    rows   (channels_last, C contiguous): item = (layer, channel block j, rows [a0, a1)); tiles [BLOCK_R, BLOCK_C]
           at x + r*C + c: the row index r = b*H*W + s needs no division, and C-contiguous tiles load 16 bytes
           per thread;
    planes (NCHW, H*W contiguous): item = (layer, channel c, batches [a0, a1)); tiles [BLOCK_R, BLOCK_C] at
           x + b*C*H*W + c*H*W + s, looping over b and s (no division either).
Items are sized by bytes so that the call fills the card (at least PROGRAMS_PER_SM programs per SM for the
one-layer case); every item of a launch shares the layout, dtype and alignment class, so a call is one
launch per class (one for a network of channels_last layers). Layer pointers are read from a table, and
`ALIGNED` launches tell the compiler what the host checked (16-byte aligned bases, C or H*W a multiple of
the vector width), which is what turns the loads into 128-bit vectors.

Forward: each item writes fp32 shifted partial sums (shift s_c = x[0, c, 0, 0]; S1 = sum(x - s), S2 = sum((x - s)^2))
into its own slot; a small finish kernel adds each channel's slots in item order (deterministic: no atomics)
and writes mean = s + S1/n, var = S2/n - (S1/n)^2. A large offset (x = 1e3 + noise) keeps its variance.
Backward: one elementwise pass, dx = g_mean/n + 2 g_var (x - mean)/n, in x's layout, same items.
"""
from __future__ import annotations

import functools
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import glue
from .grid import PROGRAMS_PER_SM, Launch, arch_of, dtype_bytes, pick_config, sm_count

__all__ = ["bn_stat_loss", "bn_stat_losses", "bn_moments", "plan_moments", "plan_moments_backward"]

# tables (int32 rows): items (layer, channel block j | channel c, a0, a1); layers (C, H*W, col0: the layer's first
# column in the concatenated channels); finish groups (column of the first channel, valid channels, first item, end)


@triton.jit
def _bn_item(Ptrs, Proto, Layers, Items, i, ROWS: tl.constexpr, ALIGNED: tl.constexpr, LOG_VEC: tl.constexpr):
    """Item i's fields and its layer's: (x's base pointer, j, a0, a1, C, H*W, col0, layer)."""
    it = Items + i * 4
    layer = tl.load(it)
    x = tl.load(Ptrs + layer).to(Proto.dtype, bitcast=True)
    C = tl.load(Layers + layer * 3)
    HW = tl.load(Layers + layer * 3 + 1)
    if ALIGNED:  # the host checked: a 16-byte aligned base, and C (rows) or H*W (planes) a multiple of the vector
        x = tl.multiple_of(x, 16)
        if ROWS:
            C = (C >> LOG_VEC) << LOG_VEC  # the value is unchanged; the compiler learns it divides
        else:
            HW = (HW >> LOG_VEC) << LOG_VEC
    return x, tl.load(it + 1), tl.load(it + 2), tl.load(it + 3), C, HW, tl.load(Layers + layer * 3 + 2), layer


@triton.jit
def _bn_moments_kernel(XPtrs, Proto, Layers, Items, Part, Shift, item0,
                       ROWS: tl.constexpr, ALIGNED: tl.constexpr, LOG_VEC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SLOT: tl.constexpr):
    """Part[i] = (S1, S2) of item i over its rows (or batches); items that start a channel's range store its shift."""
    i = item0 + tl.program_id(0)
    x, j, a0, a1, C, HW, col0, layer = _bn_item(XPtrs, Proto, Layers, Items, i, ROWS, ALIGNED, LOG_VEC)
    lane = tl.arange(0, BLOCK_C)
    if ROWS:
        rc = j * BLOCK_C + lane
        c_ok = rc < C
        # row 0 (x[0, c, 0, 0]) read as a tile of the loop's shape, so it loads as 16-byte vectors too
        first = tl.arange(0, BLOCK_R)[:, None] == 0
        shift = tl.sum(tl.load(x + tl.arange(0, BLOCK_R)[:, None] * 0 + rc[None, :], mask=first & c_ok[None, :],
                               other=0.0).to(tl.float32), axis=0)
        acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for r0 in range(a0, a1, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            ok = (rr < a1)[:, None] & c_ok[None, :]
            v = tl.load(x + rr.to(tl.int64)[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, v - shift[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        out = Part + i.to(tl.int64) * (2 * SLOT) + lane  # BLOCK_C <= SLOT
        tl.store(out, tl.sum(acc1, axis=0))
        tl.store(out + SLOT, tl.sum(acc2, axis=0))
        if a0 == 0:
            tl.store(Shift + col0 + rc, shift, mask=c_ok)
    else:
        plane = x + j.to(tl.int64) * HW  # channel j of batch 0
        chw = C.to(tl.int64) * HW
        head = tl.load(plane + lane, mask=lane < HW, other=0.0).to(tl.float32)  # a vector load of the plane's start
        shift = tl.sum(tl.where(lane == 0, head, 0.0), axis=0)  # x[0, c, 0, 0]
        acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for b0 in range(a0, a1, BLOCK_R):
            bb = b0 + tl.arange(0, BLOCK_R)
            b_ok = bb < a1
            rows = plane + bb.to(tl.int64) * chw
            for s0 in range(0, HW, BLOCK_C):
                ss = s0 + lane
                ok = b_ok[:, None] & (ss < HW)[None, :]
                v = tl.load(rows[:, None] + ss[None, :], mask=ok, other=0.0).to(tl.float32)
                d = tl.where(ok, v - shift, 0.0)
                acc1 += d
                acc2 += d * d
        out = Part + i.to(tl.int64) * (2 * SLOT)  # one channel per item: lane 0 of the slot
        tl.store(out, tl.sum(tl.sum(acc1, axis=1), axis=0))
        tl.store(out + SLOT, tl.sum(tl.sum(acc2, axis=1), axis=0))
        if a0 == 0:
            tl.store(Shift + col0 + j, shift)


@triton.jit
def _bn_finish_kernel(Groups, Part, Shift, Count, Mean, Var,
                      SLOT: tl.constexpr, BLOCK_I: tl.constexpr):
    """Per group (a layer's channel block or channel): its items' partials added in item order, then
    mean = shift + S1/n and var = S2/n - (S1/n)^2 (clamped at 0)."""
    g = tl.program_id(0)
    gp = Groups + g * 4
    col = tl.load(gp)
    width = tl.load(gp + 1)
    i0 = tl.load(gp + 2)
    i1 = tl.load(gp + 3)
    lane = tl.arange(0, SLOT)
    l_ok = lane < width
    s1 = tl.zeros((BLOCK_I, SLOT), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_I, SLOT), dtype=tl.float32)
    for k0 in range(i0, i1, BLOCK_I):
        ii = k0 + tl.arange(0, BLOCK_I)
        ok = (ii < i1)[:, None] & l_ok[None, :]
        base = Part + ii.to(tl.int64)[:, None] * (2 * SLOT) + lane[None, :]
        s1 += tl.load(base, mask=ok, other=0.0)
        s2 += tl.load(base + SLOT, mask=ok, other=0.0)
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    n = tl.load(Count + col + lane, mask=l_ok, other=1.0)
    d_mean = t1 / n
    tl.store(Mean + col + lane, tl.load(Shift + col + lane, mask=l_ok, other=0.0) + d_mean, mask=l_ok)
    tl.store(Var + col + lane, tl.maximum(t2 / n - d_mean * d_mean, 0.0), mask=l_ok)


@triton.jit
def _bn_backward_kernel(XPtrs, DXPtrs, Proto, Layers, Items, Mean, GMean, GVar, Count, item0,
                        ROWS: tl.constexpr, ALIGNED: tl.constexpr, LOG_VEC: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = a_c + b_c x with b_c = 2 g_var_c / n and a_c = g_mean_c / n - b_c mean_c: one pass, x's layout."""
    i = item0 + tl.program_id(0)
    x, j, a0, a1, C, HW, col0, layer = _bn_item(XPtrs, Proto, Layers, Items, i, ROWS, ALIGNED, LOG_VEC)
    dx = tl.load(DXPtrs + layer).to(Proto.dtype, bitcast=True)
    if ALIGNED:
        dx = tl.multiple_of(dx, 16)
    lane = tl.arange(0, BLOCK_C)
    if ROWS:
        rc = j * BLOCK_C + lane
        c_ok = rc < C
        inv_n = 1.0 / tl.load(Count + col0 + rc, mask=c_ok, other=1.0)
        coef_b = 2.0 * tl.load(GVar + col0 + rc, mask=c_ok, other=0.0) * inv_n
        mean = tl.load(Mean + col0 + rc, mask=c_ok, other=0.0)
        coef_a = tl.load(GMean + col0 + rc, mask=c_ok, other=0.0) * inv_n - coef_b * mean
        for r0 in range(a0, a1, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            ok = (rr < a1)[:, None] & c_ok[None, :]
            off = rr.to(tl.int64)[:, None] * C + rc[None, :]
            v = tl.load(x + off, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx + off, (coef_a[None, :] + coef_b[None, :] * v).to(Proto.dtype.element_ty), mask=ok)
    else:
        inv_n = 1.0 / tl.load(Count + col0 + j)
        coef_b = 2.0 * tl.load(GVar + col0 + j) * inv_n
        coef_a = tl.load(GMean + col0 + j) * inv_n - coef_b * tl.load(Mean + col0 + j)
        start = j.to(tl.int64) * HW
        chw = C.to(tl.int64) * HW
        for b0 in range(a0, a1, BLOCK_R):
            bb = b0 + tl.arange(0, BLOCK_R)
            b_ok = bb < a1
            rows = start + bb.to(tl.int64) * chw
            for s0 in range(0, HW, BLOCK_C):
                ss = s0 + lane
                ok = b_ok[:, None] & (ss < HW)[None, :]
                off = rows[:, None] + ss[None, :]
                v = tl.load(x + off, mask=ok, other=0.0).to(tl.float32)
                tl.store(dx + off, (coef_a + coef_b * v).to(Proto.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- planning (host side, no device work)
def dense(x: Tensor) -> Tensor:
    """x itself when it is dense NCHW or channels_last, else a dense copy (a batch slice, say)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)


def is_rows(x: Tensor) -> bool:
    """Channels contiguous (channels_last, or a 1x1 map): the rows path; else the planes path."""
    B, C, H, W = x.shape
    return H * W == 1 or (C > 1 and x.stride(1) == 1 and not x.is_contiguous())


def shape_class(x: Tensor) -> str:
    """The config table's shape class of one layer."""
    if is_rows(x):
        return "rows"
    return "planes-small" if x.shape[2] * x.shape[3] <= 64 else "planes"


def _heuristic(cls: str, dtype: torch.dtype) -> dict:
    """Tiles of about 8 KB in flight per program (bf16), 16-byte vectors along the contiguous axis."""
    if cls == "rows":
        return dict(BLOCK_R=64, BLOCK_C=64, num_warps=4, num_stages=1)
    if cls == "planes-small":
        return dict(BLOCK_R=16, BLOCK_C=64, num_warps=4, num_stages=1)
    return dict(BLOCK_R=2, BLOCK_C=1024, num_warps=4, num_stages=1)


def config_for(cls: str, dtype: torch.dtype, device) -> dict:
    return pick_config("bn_stat", dtype, cls, arch_of(device), lambda: _heuristic(cls, dtype))


def _aligned(x: Tensor, rows: bool) -> bool:
    vec = 16 // x.element_size()
    inner = x.shape[1] if rows else x.shape[2] * x.shape[3]
    return x.data_ptr() % 16 == 0 and inner % vec == 0


def _layer_specs(xs: List[Tensor]) -> tuple:
    """(shape, rows?, dtype, aligned?, config items) of every layer: the key of its tables."""
    specs = []
    for x in xs:
        rows = is_rows(x)
        cfg = config_for(shape_class(x), x.dtype, x.device)
        specs.append((tuple(x.shape), rows, x.dtype, _aligned(x, rows), tuple(sorted(cfg.items()))))
    return tuple(specs)


@functools.lru_cache(maxsize=64)
def _tables(specs: tuple, device: torch.device, sms: int):
    """Item, layer, finish-group and count tables for these layers, built once per set of layers and device
    (the training and inversion loops repeat them). Items are cut so that the whole call has about
    2 * PROGRAMS_PER_SM items per SM (so the last wave is short); each class of items (layout, dtype,
    alignment, config) is one launch. Returns (classes [(key, first item, item count)], items, layers,
    groups, slot, group count)."""
    total = sum(s[0] * s[1] * s[2] * s[3] for s, *_ in specs)
    per_item = max(1, -(-total // (2 * PROGRAMS_PER_SM * sms)))  # elements per item
    slot = max([dict(c)["BLOCK_C"] for _, rows, _, _, c in specs if rows] or [1])
    by_class: dict = {}
    layer_rows, groups, col = [], [], 0
    for li, (shape, rows, dtype, aligned, cfg_items) in enumerate(specs):
        cfg = dict(cfg_items)
        B, C, H, W = shape
        HW = H * W
        layer_rows.append((C, HW, col))
        key = (rows, dtype, aligned, cfg_items)
        items = by_class.setdefault(key, [])
        br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
        if rows:  # channel blocks of bc channels, rows split into ranges of whole tiles
            R = B * HW
            per = max(br, -(-per_item // (min(bc, C) * br)) * br)
            for j in range(-(-C // bc)):
                first = len(items)
                items.extend((li, j, a0, min(R, a0 + per)) for a0 in range(0, R, per))
                groups.append((col + j * bc, min(bc, C - j * bc), key, first, len(items) - first))
        else:  # one channel per item, batches split into ranges of whole tiles
            per = max(1, -(-per_item // HW))
            per = -(-per // br) * br if per > br else per
            for c in range(C):
                first = len(items)
                items.extend((li, c, a0, min(B, a0 + per)) for a0 in range(0, B, per))
                groups.append((col + c, 1, key, first, len(items) - first))
        col += C
    classes, flat, offset = [], [], {}
    for key, items in by_class.items():
        offset[key] = len(flat)
        classes.append((key, len(flat), len(items)))
        flat.extend(items)
    group_rows = [(c, w, offset[k] + f, offset[k] + f + n) for c, w, k, f, n in groups]

    def dev(rows):
        return torch.tensor(rows, dtype=torch.int32).to(device)

    return classes, dev(flat), dev(layer_rows), dev(group_rows), slot, len(group_rows)


def _tables_for(xs: List[Tensor]):
    """The cached tables of these layers and their per-channel element counts n (glue's cached metadata)."""
    return (*_tables(_layer_specs(xs), xs[0].device, sm_count(xs[0].device)), glue.metadata(xs)[1])


def _pointer_table(xs: List[Tensor], device: torch.device) -> Tensor:
    """The layers' base addresses (int64), copied to the device each call (the tensors change, the plan does not)."""
    ptrs = torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64)
    if device.type == "cuda":
        return ptrs.pin_memory().to(device, non_blocking=True)
    return ptrs.to(device)


def _class_constexprs(key) -> tuple[dict, int, int]:
    rows, dtype, aligned, cfg_items = key
    cfg = dict(cfg_items)
    vec = 16 // dtype_bytes(dtype)
    c = dict(ROWS=rows, ALIGNED=aligned, LOG_VEC=vec.bit_length() - 1, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
    return c, cfg["num_warps"], cfg["num_stages"]


def plan_moments(xs: List[Tensor]) -> tuple[list[Launch], Tensor, Tensor]:
    """The launches of bn_moments(xs) (xs dense) and their (mean, var) outputs."""
    device = xs[0].device
    order, items, layers, groups, slot, n_groups, counts = _tables_for(xs)
    total_c = sum(x.shape[1] for x in xs)
    n_items = items.shape[0]
    part = torch.empty((n_items, 2, slot), device=device, dtype=torch.float32)
    shift = torch.empty((total_c,), device=device, dtype=torch.float32)
    mean = torch.empty((total_c,), device=device, dtype=torch.float32)
    var = torch.empty((total_c,), device=device, dtype=torch.float32)
    ptrs = _pointer_table(xs, device)
    launches = []
    for key, first, count in order:
        proto = next(x for x in xs if x.dtype == key[1])
        c, warps, stages = _class_constexprs(key)
        launches.append(Launch(_bn_moments_kernel, (count,), (ptrs, proto, layers, items, part, shift, first),
                               dict(c, SLOT=slot), warps, stages,
                               note=f"bn moments, {'rows' if key[0] else 'planes'}, {count} items"))
    launches.append(Launch(_bn_finish_kernel, (n_groups,), (groups, part, shift, counts, mean, var),
                           dict(SLOT=slot, BLOCK_I=16), 4, 1, note=f"bn finish, {n_groups} channel groups"))
    return launches, mean, var


def plan_moments_backward(xs: List[Tensor], dxs: List[Tensor], mean: Tensor, grad_mean: Tensor,
                          grad_var: Tensor) -> list[Launch]:
    """The launches of the backward (xs dense, dxs empty tensors with xs' strides)."""
    device = xs[0].device
    order, items, layers, groups, slot, n_groups, counts = _tables_for(xs)
    ptrs, dptrs = _pointer_table(xs, device), _pointer_table(dxs, device)
    launches = []
    for key, first, count in order:
        proto = next(x for x in xs if x.dtype == key[1])
        c, warps, stages = _class_constexprs(key)
        launches.append(Launch(_bn_backward_kernel, (count,),
                               (ptrs, dptrs, proto, layers, items, mean, grad_mean, grad_var, counts, first),
                               c, warps, stages, note=f"bn backward, {'rows' if key[0] else 'planes'}, {count} items"))
    return launches


@torch.library.custom_op("dearkd_fast::bn_moments", mutates_args=())
def bn_moments(xs: List[Tensor]) -> List[Tensor]:
    """[mean_cat, var_cat]: per-channel biased moments of every x in xs, channels concatenated (fp32)."""
    launches, mean, var = plan_moments([dense(x) for x in xs])
    for launch in launches:
        launch()
    return [mean, var]


@torch.library.custom_op("dearkd_fast::bn_moments_backward", mutates_args=())
def _moments_bwd(xs: List[Tensor], mean: Tensor, grad_mean: Tensor, grad_var: Tensor) -> List[Tensor]:
    xs = [dense(x) for x in xs]
    dxs = [torch.empty_like(x) for x in xs]  # dense x: the same strides
    for launch in plan_moments_backward(xs, dxs, mean.contiguous(), grad_mean.contiguous(), grad_var.contiguous()):
        launch()
    return dxs


glue.register_bn("dearkd_fast")


def bn_stat_losses(xs: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor]) -> Tensor:
    """Per-layer losses [L] = ||mean_l - rm_l|| + ||var_l - rv_l||, all layers finalised together."""
    return glue.bn_stat_losses(bn_moments, xs, running_means, running_vars)


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """Fused DeepInversion BN-statistics loss of one layer (fp32 scalar); differentiable in x."""
    return bn_stat_losses([x], [running_mean], [running_var])[0]
