"""What the Triton ops and the native (C++) ops share: the fake (meta) shapes and the autograd rules of
each op pair, and the BN loss's finalisation from per-channel moments. Nothing here needs Triton.

Each backend defines four ops with one schema, in its own namespace (both can be loaded in a process):
    <ns>::bn_moments(Tensor[] xs) -> Tensor[]                       [mean_cat, var_cat], fp32
    <ns>::bn_moments_backward(Tensor[] xs, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor[]
    <ns>::feature_align_loss(Tensor tokens, Tensor weight, Tensor? bias, Tensor target) -> Tensor
    <ns>::feature_align_loss_backward(Tensor grad, tokens, weight, bias, target) -> (dT, dW, db)
with ns "dearkd_fast" (Triton, kernels/bn_stat.py and kernels/feature_align.py) and "dearkd_fast_native"
(C++, kernels/native/). register_bn(ns) and register_align(ns) give the pairs their fake and autograd rules, so
torch.compile(fullgraph=True) traces either backend.
"""
from __future__ import annotations

import functools
from typing import List

import torch
from torch import Tensor

__all__ = ["register_bn", "register_align", "register_align_fused", "bn_stat_losses", "layer_metadata"]


def _layer_of_channel(xs: List[Tensor], device: torch.device) -> Tensor:
    """Layer index of every concatenated channel: static shapes (compile-friendly), three small launches."""
    ends = torch.tensor([x.shape[1] for x in xs]).cumsum(0).to(device)
    return torch.bucketize(torch.arange(sum(x.shape[1] for x in xs), device=device), ends, right=True)


@functools.lru_cache(maxsize=64)
def layer_metadata(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(layer index, element count n) of every concatenated channel for layers of these [B,C,H,W]
    shapes, built once per set of shapes and device: the inversion and training loops repeat the same
    shapes, so no host-to-device copy happens inside them."""
    seg = torch.repeat_interleave(torch.arange(len(shapes)), torch.tensor([s[1] for s in shapes]))
    n = torch.tensor([float(s[0] * s[2] * s[3]) for s in shapes])[seg]
    return seg.to(device), n.to(device)


def metadata(xs: List[Tensor]) -> tuple[Tensor, Tensor]:
    return layer_metadata(tuple(tuple(x.shape) for x in xs), xs[0].device)


def bn_stat_losses(moments, xs: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor]) -> Tensor:
    """Per-layer losses [L] = ||mean_l - rm_l|| + ||var_l - rv_l||, all layers finalised together from
    moments(xs) -> [mean_cat, var_cat] (a backend's bn_moments op)."""
    mean, var = moments(list(xs))
    rm = torch.cat([r.float() for r in running_means])
    rv = torch.cat([r.float() for r in running_vars])
    # eager: the cached segment ids; traced by torch.compile: built in the graph (no cached constant)
    seg = _layer_of_channel(xs, mean.device) if torch.compiler.is_compiling() else metadata(xs)[0]
    sq = torch.stack([(mean - rm).pow(2), (var - rv).pow(2)])  # [2, total_C]
    per_layer = torch.zeros((2, len(xs)), device=mean.device, dtype=torch.float32).index_add_(1, seg, sq)
    # sqrt with a zero gradient at zero (a layer whose statistics already match exactly)
    safe = torch.where(per_layer > 0, per_layer, torch.ones_like(per_layer)).sqrt()
    return torch.where(per_layer > 0, safe, torch.zeros_like(per_layer)).sum(0)


# ---- fake (meta) shapes
def _moments_fake(xs):
    total_c = sum(x.shape[1] for x in xs)
    return [xs[0].new_empty((total_c,), dtype=torch.float32), xs[0].new_empty((total_c,), dtype=torch.float32)]


def _moments_bwd_fake(xs, mean, grad_mean, grad_var):
    return [torch.empty_like(x) for x in xs]


def _align_fake(tokens, weight, bias, target):
    return tokens.new_empty((), dtype=torch.float32)


def _align_bwd_fake(grad, tokens, weight, bias, target):
    C = weight.shape[0]
    return (torch.empty(tokens.shape, device=tokens.device, dtype=tokens.dtype), torch.empty_like(weight),
            weight.new_empty((C,), dtype=bias.dtype if bias is not None else weight.dtype))


def _align_fused_fake(tokens, weight, bias, target):
    C, D = weight.shape
    return (tokens.new_empty((), dtype=torch.float32), torch.empty_like(tokens, memory_format=torch.contiguous_format),
            weight.new_empty((C, D), dtype=torch.float32), weight.new_empty((C,), dtype=torch.float32))


# ---- autograd
def _moments_setup(ctx, inputs, output):
    (xs,) = inputs
    ctx.save_for_backward(*xs, output[0])


def _align_setup(ctx, inputs, output):
    tokens, weight, bias, target = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(tokens, weight, bias if bias is not None else weight, target)


def register_bn(ns: str) -> None:
    """Fake shapes of ns::bn_moments and its backward, and autograd of the first through the second."""
    ops = getattr(torch.ops, ns)

    def backward(ctx, grads):
        *xs, mean = ctx.saved_tensors
        g_mean, g_var = (g if g is not None else torch.zeros_like(mean) for g in grads)
        return (ops.bn_moments_backward(list(xs), mean, g_mean.float(), g_var.float()),)

    torch.library.register_fake(f"{ns}::bn_moments", _moments_fake)
    torch.library.register_fake(f"{ns}::bn_moments_backward", _moments_bwd_fake)
    torch.library.register_autograd(f"{ns}::bn_moments", backward, setup_context=_moments_setup)


def register_align(ns: str) -> None:
    """Fake shapes of ns::feature_align_loss and its backward, and autograd of the first through the second."""
    ops = getattr(torch.ops, ns)

    def backward(ctx, grad):
        tokens, weight, bias, target = ctx.saved_tensors
        dt, dw, db = ops.feature_align_loss_backward(grad, tokens, weight, bias if ctx.has_bias else None, target)
        return dt, dw, (db if ctx.has_bias else None), None

    torch.library.register_fake(f"{ns}::feature_align_loss", _align_fake)
    torch.library.register_fake(f"{ns}::feature_align_loss_backward", _align_bwd_fake)
    torch.library.register_autograd(f"{ns}::feature_align_loss", backward, setup_context=_align_setup)


def _align_fused_setup(ctx, inputs, output):
    tokens, weight, bias, target = inputs
    _, dt, dw, db = output
    ctx.has_bias = bias is not None
    ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
    ctx.mark_non_differentiable(dt, dw, db)
    ctx.save_for_backward(dt, dw, db)


def register_align_fused(ns: str) -> None:
    """Fake shapes of ns::feature_align_loss (the loss alone) and ns::feature_align_loss_and_grads (the loss and
    its gradients at unit upstream gradient, from one pass), and autograd of the second: the backward scales
    the saved gradients by the upstream gradient (dW and db in fp32, then cast to the parameters' dtypes)."""

    def backward(ctx, grad, *_):
        dt, dw, db = ctx.saved_tensors
        g = grad.float()
        w_dtype, b_dtype = ctx.dtypes
        return dt * g, (dw * g).to(w_dtype), ((db * g).to(b_dtype) if ctx.has_bias else None), None

    torch.library.register_fake(f"{ns}::feature_align_loss", _align_fake)
    torch.library.register_fake(f"{ns}::feature_align_loss_and_grads", _align_fused_fake)
    torch.library.register_autograd(f"{ns}::feature_align_loss_and_grads", backward, setup_context=_align_fused_setup)
