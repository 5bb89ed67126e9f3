"""THE dispatch point between the fused kernels and the plain-PyTorch reference.

backend: "auto" (default) | "triton" | "native" | "torch". "auto" reads the environment variable
DEARKD_BACKEND, and otherwise picks "triton" for CUDA tensors when Triton imports, "native" for CPU
tensors of float32/bfloat16/float16 when the native library is built (python -m dearkd_fast.native),
else "torch". A forced choice that cannot run on the given tensors raises BackendError; nothing falls
back silently.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from . import config, reference
from .errors import BackendError, InputError

__all__ = ["feature_align_loss", "bn_stat_loss", "bn_stat_losses", "available_backends", "resolve_backend", "BackendError",
           "BACKENDS"]

BACKENDS = config.BACKENDS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON


NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result  # traced code takes the answer at trace time (no file lookup in a graph)
def _native_importable() -> bool:
    """The native library for these sources, this torch and this CPU is built (or already loaded)."""
    from . import native  # not at import time: `python -m dearkd_fast.native` runs that module as __main__

    return "dearkd_fast.kernels.native_ops" in sys.modules or native.library_path().is_file()


def available_backends() -> list[str]:
    """Backends usable on this machine: "torch" always; "triton" with CUDA or under TRITON_INTERPRET=1;
    "native" (CPU tensors) when its library is built."""
    names = ["torch"]
    if _triton_importable() and (torch.cuda.is_available() or _interpreting()):
        names.insert(0, "triton")
    if _native_importable():
        names.append("native")
    return names


def resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend for tensor x, or BackendError naming why the choice is impossible."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("DEARKD_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise BackendError(f"DEARKD_BACKEND='{backend}' is not one of {', '.join(BACKENDS)}")
        if backend == "auto":
            if x.is_cuda:
                return "triton" if _triton_importable() else "torch"
            return "native" if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and _native_importable() else "torch"
    if backend == "triton":
        if not _triton_importable():
            raise BackendError("backend 'triton' asked for, but triton is not installed")
        if not x.is_cuda and not _interpreting():
            raise BackendError(
                f"backend 'triton' needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to run it on the CPU"
            )
    if backend == "native":
        if not _native_importable():
            from . import native

            raise BackendError(f"backend 'native' asked for, but {native.unavailable_reason()}")
        if x.device.type != "cpu":
            raise BackendError(f"backend 'native' runs on CPU tensors (got {x.device})")
        if x.dtype not in NATIVE_DTYPES:
            raise BackendError(f"backend 'native' takes float32, bfloat16 or float16 (got {x.dtype})")
    return backend


def _autocast_operands(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, the projection operands in the autocast dtype (as autocast would feed a matmul),
    cast here at the op boundary so every backend sees what training produces; the teacher map is left
    as the teacher produced it. Accumulation stays fp32 in every backend. Casting is differentiable."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _with_prefix(tokens: Tensor) -> Tensor:
    """x when tokens is x[:, P:] of a [B, P + N, D] sequence x (a ViT's patch tokens after its prefix tokens),
    else tokens. The native op takes the whole sequence, reads its last N rows and writes the gradient in x's
    shape (zeros for the prefix): no zero-filled copy of the slice in the backward."""
    base = tokens._base
    if (base is None or base.dim() != 3 or torch.compiler.is_compiling() or base.shape[0] != tokens.shape[0]
            or base.shape[2] != tokens.shape[2] or base.stride() != tokens.stride()):
        return tokens
    prefix = base.shape[1] - tokens.shape[1]
    if prefix <= 0 or tokens.storage_offset() - base.storage_offset() != prefix * base.stride(1):
        return tokens
    return base


def feature_align_loss(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, *, backend: str = "auto") -> Tensor:
    """mean over (B, N, C) of (tokens @ weight^T + bias - target_hw)^2; fp32 scalar. See reference.py.
    Under autocast, tokens, weight and bias are cast to the autocast dtype first (target as given)."""
    reference.check_align_shapes(tokens, weight, bias, target)
    chosen = resolve_backend(backend, tokens)
    if chosen in ("native", "triton"):
        # both fused ops run their products in the weight's dtype and round each token tile to it as they load it:
        # the same numbers as casting the tokens first, without a whole-tensor copy (and its backward); both take
        # a ViT's whole sequence for its patch-token slice and write the gradient in the sequence's shape
        weight, bias = _autocast_operands(weight, bias)
        if chosen == "native":
            from .kernels import native_ops as fused
        else:
            from .kernels import feature_align as fused
        return fused.feature_align_loss(_with_prefix(tokens), weight, bias, target)
    tokens, weight, bias = _autocast_operands(tokens, weight, bias)
    return reference.feature_align_loss(tokens, weight, bias, target)


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor, *, backend: str = "auto") -> Tensor:
    """||mean_c(x) - running_mean||_2 + ||var_c(x) - running_var||_2 over (B,H,W); fp32 scalar. See reference.py."""
    return bn_stat_losses([x], [running_mean], [running_var], backend=backend)[0]


def bn_stat_losses(xs: list[Tensor], running_means: list[Tensor], running_vars: list[Tensor], *,
                   backend: str = "auto") -> Tensor:
    """bn_stat_loss of many layers at once: an [L] fp32 tensor. The fused paths compute every layer's
    moments in one op and finalise all layers together (kernels/glue.py)."""
    if not (len(xs) == len(running_means) == len(running_vars)) or not xs:
        raise InputError("bn_stat_losses: give one running mean and variance per input, and at least one input")
    for x, m, v in zip(xs, running_means, running_vars):
        reference.check_bn_shapes(x, m, v)
    chosen = resolve_backend(backend, xs[0])
    if chosen == "triton":
        from .kernels import bn_stat

        return bn_stat.bn_stat_losses(xs, running_means, running_vars)
    if chosen == "native":
        from .kernels import native_ops

        return native_ops.bn_stat_losses(xs, running_means, running_vars)
    return reference.bn_stat_losses(xs, running_means, running_vars)
