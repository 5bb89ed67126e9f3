"""DearKD's stage-aware loss and, for the data-free path, DeepInversion's objective.

Stage 1:  L1 = (1 - alpha) CE(cls, y) + alpha KD(dist, teacher) + beta * sum_pairs L_align
Stage 2:  L2 = 0.5 CE(cls, y) + 0.5 CE(dist, y)          (the teacher is not run)

L_align for a pair (student block l, teacher stage s) is ops.feature_align_loss of the block's patch
tokens, a learned projection W_l [C_s, D], b_l [C_s], and the teacher map resized to the patch grid.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .config import PRESETS
from .errors import InputError, RunError
from .models.teacher import Teacher

__all__ = ["DearKDLoss", "SupervisedLoss", "DeepInversionHook", "DeepInversionLoss", "js_divergence", "penultimate",
           "resize_to_grid", "align_pairing"]


def resize_to_grid(feat: Tensor, grid: tuple[int, int]) -> Tensor:
    """Teacher map [B,C,H,W] -> [B,C,h,w]: adaptive average pooling when larger, bilinear when smaller."""
    h, w = grid
    H, W = feat.shape[-2:]
    if (H, W) == (h, w):
        return feat
    if H >= h and W >= w:
        return F.adaptive_avg_pool2d(feat, (h, w))
    return F.interpolate(feat, size=(h, w), mode="bilinear", align_corners=False)


def standardize_channels(feat: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel standardisation over (B, h, w): (F - mean_c) / sqrt(var_c + eps)."""
    f = feat.float()
    mean = f.mean(dim=(0, 2, 3), keepdim=True)
    var = f.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (f - mean) * torch.rsqrt(var + eps)


def align_pairing(num_blocks: int, num_taps: int) -> list[int]:
    """Teacher tap for each of the first `num_blocks` student blocks: split evenly, in order."""
    return [i * num_taps // num_blocks for i in range(num_blocks)]


def _split_outputs(outputs) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    if isinstance(outputs, Tensor):
        return outputs, None, []
    if len(outputs) == 2:
        return outputs[0], outputs[1], []
    return outputs[0], outputs[1], list(outputs[2])


class DearKDLoss(nn.Module):
    """Callable (inputs, outputs, labels) -> loss, like DeiT's DistillationLoss, with set_stage(1 | 2).

    outputs is the student's training output (cls_logits, dist_logits, tokens). The alignment
    projections are parameters of this module: give `criterion.parameters()` to the optimizer.
    After each call `last_terms` holds the detached per-term values.
    """

    def __init__(
        self,
        base_criterion: Callable[[Tensor, Tensor], Tensor],
        teacher: Teacher | None,
        *,
        distillation_type: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        beta: float = 1.0,
        embed_dim: int | None = None,
        grid_size: tuple[int, int] | None = None,
        num_align: int = 0,
        standardize_target: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if distillation_type not in ("hard", "soft"):
            raise InputError(f"distillation_type must be 'hard' or 'soft', got '{distillation_type}'")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {alpha}")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha, self.tau, self.beta = alpha, tau, beta
        self.grid_size = grid_size
        self.standardize_target = standardize_target
        self.backend = backend
        self.pairing: list[int] = []
        self.projections = nn.ModuleList()
        if num_align > 0 and beta > 0:
            if teacher is None or embed_dim is None or grid_size is None:
                raise InputError("feature alignment needs a teacher, embed_dim and grid_size")
            channels = teacher.channels()
            self.pairing = align_pairing(num_align, len(channels))
            self.projections.extend(nn.Linear(embed_dim, channels[s]) for s in self.pairing)
        self.stage = 1
        self.last_terms: dict[str, Tensor] = {}

    def set_stage(self, stage: int) -> None:
        """1: CE + KD + alignment (teacher runs); 2: labels only on both heads (teacher never runs)."""
        if stage not in (1, 2):
            raise InputError(f"stage must be 1 or 2, got {stage}")
        self.stage = stage

    def forward(self, inputs: Tensor, outputs, labels: Tensor) -> Tensor:
        cls_logits, dist_logits, tokens = _split_outputs(outputs)
        if dist_logits is None:
            raise InputError("DearKDLoss needs the student's (cls_logits, dist_logits[, tokens]) training output")
        if self.stage == 2:
            ce_cls = self.base_criterion(cls_logits, labels)
            ce_dist = self.base_criterion(dist_logits, labels)
            loss = 0.5 * ce_cls + 0.5 * ce_dist
            self.last_terms = {"loss": loss.detach(), "ce": ce_cls.detach(), "ce_dist": ce_dist.detach()}
            return loss
        if self.teacher is None:
            raise InputError("stage 1 needs a teacher")
        teacher_logits, feats = self.teacher(inputs)
        ce = self.base_criterion(cls_logits, labels)
        if self.distillation_type == "hard":
            kd = reference.kd_hard(dist_logits, teacher_logits)
        else:
            kd = reference.kd_soft(dist_logits, teacher_logits, self.tau)
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        terms = {"ce": ce.detach(), "kd": kd.detach()}
        if self.projections:
            if len(tokens) < len(self.projections):
                raise InputError(
                    f"alignment needs patch tokens of {len(self.projections)} blocks, the student returned {len(tokens)}"
                )
            targets = {s: self.align_target(feats[s]) for s in set(self.pairing)}  # once per tap, not per pair
            align = sum(
                ops.feature_align_loss(tok, proj.weight, proj.bias, targets[s], backend=self.backend)
                for tok, proj, s in zip(tokens, self.projections, self.pairing)
            )
            loss = loss + self.beta * align
            terms["align"] = align.detach()
        terms["loss"] = loss.detach()
        self.last_terms = terms
        return loss

    def align_target(self, feat: Tensor) -> Tensor:
        """A teacher map resized to the patch grid (and standardised per channel when asked)."""
        target = resize_to_grid(feat, self.grid_size)
        return standardize_channels(target) if self.standardize_target else target


class SupervisedLoss(nn.Module):
    """(inputs, outputs, labels) -> base(outputs, labels): the teacher's (and any plain model's) loss."""

    def __init__(self, base_criterion: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.base_criterion = base_criterion
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, inputs: Tensor, outputs: Tensor, labels: Tensor) -> Tensor:
        loss = self.base_criterion(outputs, labels)
        self.last_terms = {"loss": loss.detach()}
        return loss


class DeepInversionHook:
    """Drop-in for the public DeepInversion BatchNorm feature hook, computed through ops.bn_stat_loss.

    Register on a BatchNorm2d; after each forward, `.r_feature` holds
    ||mean_c(x) - running_mean||_2 + ||var_c(x) - running_var||_2 of the layer's input x
    (stats over (B,H,W), biased variance). `.close()` removes the hook.
    """

    def __init__(self, module: nn.Module, backend: str = "auto"):
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
            raise InputError(f"DeepInversionHook needs a BatchNorm layer with running statistics, got {type(module).__name__}")
        self.module = module
        self.backend = backend
        self.r_feature: Tensor | None = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.r_feature = ops.bn_stat_loss(inputs[0], module.running_mean, module.running_var, backend=self.backend)

    def close(self) -> None:
        self.hook.remove()


def _classifier(model: nn.Module) -> nn.Module:
    """The final linear layer (its input is the penultimate feature): timm get_classifier(), else fc/head."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    for name in ("fc", "head", "classifier"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Sequential):
            m = m[-1]
        if isinstance(m, nn.Linear):
            return m
    raise InputError(f"cannot find the classifier of {type(model).__name__} for penultimate features")


def penultimate(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, penultimate features) of one forward: the classifier's input, caught by a hook."""
    feats: list[Tensor] = []
    handle = _classifier(model).register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, feats[-1]


def js_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between softmax(p) and softmax(q), batch mean (natural log)."""
    p, q = p_logits.float().softmax(1), q_logits.float().softmax(1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    return 0.5 * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean"))


_PUBLIC = PRESETS["224"].inversion  # the public DeepInversion coefficients are the defaults


class DeepInversionLoss(nn.Module):
    """DeepInversion's objective with the boundary-preserving intra-divergence term (our formulation):

        CE(T(x~), y) + r_bn * sum_l w_l L_bn_l(x~) + tv_l2 TV2(x~) + tv_l1 TV1(x~) + l2 ||x~||_2
          + bpid * L_BPID + adi * (1 - JS(T(x~), S(x~)))

    with w_1 = first_bn_mult and w_l = 1 after it. The BN terms of every BatchNorm2d of the teacher
    are computed together through ops.bn_stat_losses from the layers' inputs. `last_terms` holds
    each term after a call.
    """

    def __init__(self, teacher: nn.Module, *, r_bn: float = _PUBLIC.r_bn, first_bn_mult: float = _PUBLIC.first_bn_mult,
                 tv_l2: float = _PUBLIC.tv_l2, tv_l1: float = _PUBLIC.tv_l1, l2: float = _PUBLIC.l2, bpid: float = 0.0,
                 bpid_margin: float = 1.0,
                 bpid_lambda: float = 0.3, adi: float = 0.0, student: nn.Module | None = None, backend: str = "auto"):
        super().__init__()
        if adi > 0 and student is None:
            raise InputError("the ADI competition term needs a student")
        self.teacher, self.student = teacher, student
        if student is not None:
            student.eval()
        cfg = getattr(student, "pretrained_cfg", None) or {}
        self.student_size = cfg.get("input_size", (0, 0, 0))[-1] or None  # ViTs take one input size only
        self.r_bn, self.first_bn_mult, self.tv_l2, self.tv_l1, self.l2 = r_bn, first_bn_mult, tv_l2, tv_l1, l2
        self.bpid, self.bpid_margin, self.bpid_lambda, self.adi = bpid, bpid_margin, bpid_lambda, adi
        self.backend = backend
        self.bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.bns:
            raise InputError("DeepInversion needs a teacher with BatchNorm2d layers")
        self._inputs: list[Tensor] = []
        self._handles = [bn.register_forward_pre_hook(lambda m, a: self._inputs.append(a[0])) for bn in self.bns]
        self._features: Tensor | None = None
        self._handles.append(_classifier(teacher).register_forward_pre_hook(self._grab_features))
        self.last_terms: dict[str, Tensor] = {}

    def _grab_features(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._features = args[0]

    def forward(self, x: Tensor, targets: Tensor) -> Tensor:
        self._inputs = []
        logits = self.teacher(x)
        xs = self._inputs
        self._inputs = []
        if len(xs) != len(self.bns):
            raise RunError(f"expected {len(self.bns)} BatchNorm inputs, saw {len(xs)} (compiled away?)")
        bn_losses = ops.bn_stat_losses(xs, [b.running_mean for b in self.bns], [b.running_var for b in self.bns],
                                       backend=self.backend)
        bn = self.first_bn_mult * bn_losses[0] + bn_losses[1:].sum()
        ce = F.cross_entropy(logits.float(), targets)
        tv2, tv1 = reference.tv_losses(x.float())
        norm = torch.linalg.vector_norm(x.float())
        loss = ce + self.r_bn * bn + self.tv_l2 * tv2 + self.tv_l1 * tv1 + self.l2 * norm
        terms = {"ce": ce, "bn": bn, "tv_l2": tv2, "tv_l1": tv1, "l2": norm}
        if self.bpid > 0:
            bpid = reference.bpid_loss(self._features, logits, targets, self.bpid_margin, self.bpid_lambda)
            loss = loss + self.bpid * bpid
            terms["bpid"] = bpid
        if self.adi > 0:
            xs = x
            if self.student_size and x.shape[-1] != self.student_size:  # e.g. the half-resolution phase
                xs = F.interpolate(x, size=(self.student_size, self.student_size), mode="bilinear", align_corners=False)
            competition = 1.0 - js_divergence(logits, self.student(xs)).clamp(0.0, 1.0)
            loss = loss + self.adi * competition
            terms["adi"] = competition
        terms["loss"] = loss
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return loss

    def close(self) -> None:
        for h in self._handles:
            h.remove()
