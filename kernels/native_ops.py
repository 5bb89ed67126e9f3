"""The native (C++) CPU ops, loaded from the library that `python -m dearkd_fast.native` builds.

torch.ops.dearkd_fast_native.{bn_moments, bn_moments_backward, feature_align_loss,
feature_align_loss_backward}: the Triton ops' schemas (kernels/glue.py), CPU kernels in kernels/native/*.cpp,
fake shapes and autograd from kernels/glue.py, so the ops trace under torch.compile(fullgraph=True).
Importing this module loads the library; dearkd_fast.ops imports it only when native.library_path() exists.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import native
from ..errors import BackendError
from . import glue

__all__ = ["feature_align_loss", "bn_stat_losses", "bn_moments"]

try:
    torch.ops.load_library(str(native.library_path()))
except (OSError, RuntimeError) as e:  # a library built against something this process does not have
    raise BackendError(f"the native library {native.library_path()} does not load ({str(e).splitlines()[0]}); "
                       f"rebuild it: python -m {native.PROG} --force") from None
glue.register_bn("dearkd_fast_native")
glue.register_align("dearkd_fast_native")
_ops = torch.ops.dearkd_fast_native


def bn_moments(xs: List[Tensor]) -> List[Tensor]:
    """[mean_cat, var_cat]: per-channel biased moments of every x in xs, channels concatenated (fp32)."""
    return _ops.bn_moments(list(xs))


def bn_stat_losses(xs: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor]) -> Tensor:
    """Per-layer losses [L] = ||mean_l - rm_l|| + ||var_l - rv_l||, all layers finalised together."""
    return glue.bn_stat_losses(_ops.bn_moments, xs, running_means, running_vars)


def feature_align_loss(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """L_align (fp32 scalar) by the native op; differentiable in tokens, weight and bias (not in target)."""
    return _ops.feature_align_loss(tokens, weight, bias, target)
