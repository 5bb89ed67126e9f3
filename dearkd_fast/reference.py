"""Plain-PyTorch math of every DearKD loss: the oracle the fast paths are tested against.

Each function states its formula. They accept any floating dtype and accumulate in at least
fp32 (float64 stays float64), so the same code is the float64 reference in the tests.
The formulation is the project's own (docs/method.md), not the paper's exact equations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

__all__ = [
    "feature_align_loss",
    "bn_stat_loss",
    "bn_stat_losses",
    "check_bn_shapes",
    "kd_hard",
    "kd_soft",
    "tv_losses",
    "bpid_loss",
    "check_align_shapes",
]


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 accumulation, or float64 when any input is float64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_align_shapes(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> None:
    """Raise InputError naming the mismatch between tokens [B,N,D], weight [C,D], bias [C], target [B,C,h,w]."""
    if tokens.dim() != 3:
        raise InputError(f"feature_align_loss: tokens must be [B,N,D], got shape {tuple(tokens.shape)}")
    if weight.dim() != 2:
        raise InputError(f"feature_align_loss: weight must be [C,D], got shape {tuple(weight.shape)}")
    if target.dim() != 4:
        raise InputError(f"feature_align_loss: target must be [B,C,h,w], got shape {tuple(target.shape)}")
    B, N, D = tokens.shape
    C = weight.shape[0]
    if weight.shape[1] != D:
        raise InputError(f"feature_align_loss: weight is {tuple(weight.shape)} but tokens have D={D}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise InputError(f"feature_align_loss: bias must be [{C}], got shape {tuple(bias.shape)}")
    tb, tc, th, tw = target.shape
    if tb != B or tc != C or th * tw != N:
        raise InputError(
            f"feature_align_loss: target {tuple(target.shape)} does not fit tokens {tuple(tokens.shape)} "
            f"and weight {tuple(weight.shape)} (need [B={B}, C={C}, h, w] with h*w={N})"
        )


def feature_align_loss(tokens: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """L_align = mean over (b, n, c) of (T W^T + b - F_hw)^2.

    tokens [B,N,D] (any strides), weight [C,D], bias [C] or None, target [B,C,h,w] with h*w = N
    (any memory format; token n is pixel (n // w, n % w)). Returns a 0-dim fp32 (or float64) tensor.
    """
    check_align_shapes(tokens, weight, bias, target)
    acc = _acc_dtype(tokens, weight, bias, target)
    proj = tokens.to(acc) @ weight.to(acc).t()  # [B,N,C]
    if bias is not None:
        proj = proj + bias.to(acc)
    tgt = target.to(acc).flatten(2).transpose(1, 2)  # [B,N,C]
    return (proj - tgt).pow(2).mean()


def check_bn_shapes(x: Tensor, running_mean: Tensor, running_var: Tensor) -> None:
    """Raise InputError unless x is [B,C,H,W] and both running statistics are [C]."""
    if x.dim() != 4:
        raise InputError(f"bn_stat_loss: x must be [B,C,H,W], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if running_mean.shape != (C,) or running_var.shape != (C,):
        raise InputError(
            f"bn_stat_loss: running stats {tuple(running_mean.shape)}/{tuple(running_var.shape)} "
            f"do not fit x with C={C}"
        )


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """||mean_c(x) - running_mean||_2 + ||var_c(x) - running_var||_2, stats over (B,H,W), biased var.

    This is DeepInversion's BatchNorm-statistics feature loss for one layer. x [B,C,H,W].
    """
    check_bn_shapes(x, running_mean, running_var)
    C = x.shape[1]
    acc = _acc_dtype(x, running_mean)
    xa = x.to(acc)
    mean = xa.mean(dim=(0, 2, 3))
    var = (xa - mean.view(1, C, 1, 1)).pow(2).mean(dim=(0, 2, 3))
    return torch.linalg.vector_norm(mean - running_mean.to(acc)) + torch.linalg.vector_norm(
        var - running_var.to(acc)
    )


def bn_stat_losses(xs: list[Tensor], running_means: list[Tensor], running_vars: list[Tensor]) -> Tensor:
    """[L] tensor of bn_stat_loss for each layer l."""
    return torch.stack([bn_stat_loss(x, m, v) for x, m, v in zip(xs, running_means, running_vars)])


def kd_hard(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Hard distillation (DeiT's default): CE(student, argmax_k teacher_k)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=1))


def kd_soft(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Soft distillation: tau^2 * KL(softmax(t/tau) || softmax(s/tau)), averaged over the batch."""
    log_s = F.log_softmax(student_logits.float() / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (tau * tau)


def tv_losses(x: Tensor) -> tuple[Tensor, Tensor]:
    """Total variation of images x [B,C,H,W] over the four neighbour directions (DeepInversion's prior).

    d in {right, down, down-left diagonal, down-right diagonal} neighbour differences;
    TV2 = sum_d ||d||_2,  TV1 = sum_d mean(|d|)  (the public code's scale: its /255 and *255 cancel).
    """
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    tv2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    tv1 = sum(d.abs().mean() for d in diffs)
    return tv2, tv1


def bpid_loss(features: Tensor, logits: Tensor, labels: Tensor, margin: float, lam: float) -> Tensor:
    """Boundary-preserving intra-divergence (our formulation, docs/method.md).

    z_i = features_i / ||features_i||;
    L = - mean_{i != j, y_i = y_j} ||z_i - z_j||_2
        + lam * mean_i relu(m - (logit_i[y_i] - max_{k != y_i} logit_i[k])).
    A batch with no same-class pair has a zero divergence term.
    """
    acc = _acc_dtype(features, logits)
    z = F.normalize(features.to(acc).flatten(1), dim=1)
    same = labels.view(-1, 1) == labels.view(1, -1)
    same.fill_diagonal_(False)
    if same.any():
        diff = z.unsqueeze(1) - z.unsqueeze(0)  # [B,B,F]
        # sqrt of a clamped square: differentiable also where two samples coincide
        dist = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()
        spread = dist[same].mean()
    else:
        spread = z.sum() * 0.0
    lg = logits.to(acc)
    target_logit = lg.gather(1, labels.view(-1, 1)).squeeze(1)
    others = lg.masked_fill(F.one_hot(labels, lg.shape[1]).bool(), float("-inf"))
    gap = target_logit - others.max(dim=1).values
    boundary = F.relu(margin - gap).mean()
    return -spread + lam * boundary
