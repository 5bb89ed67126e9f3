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
from .config import INVERSION
from .errors import InputError, RunError
from .models.student import align_pairing
from .models.teacher import Teacher

__all__ = ["DearKDLoss", "SupervisedLoss", "DeepInversionHook", "DeepInversionLoss", "adi_competition", "penultimate",
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


def _split_outputs(outputs) -> tuple[Tensor, Tensor | None, list, tuple[int, int]]:
    """(cls_logits, dist_logits or None, alignment inputs, patch grid) of a student's output."""
    if isinstance(outputs, Tensor):
        return outputs, None, [], (0, 0)
    if len(outputs) != 2:
        raise InputError(f"DearKDLoss expects the student's (cls_logits, dist_logits), got {len(outputs)} outputs")
    return outputs[0], outputs[1], list(getattr(outputs, "align", ())), tuple(getattr(outputs, "grid_size", (0, 0)))


class DearKDLoss(nn.Module):
    """Callable (inputs, outputs, labels) -> loss, built and called like DeiT's DistillationLoss, with
    set_stage(1 | 2):

        stage 1:  (1 - alpha) CE(cls, y) + alpha KD(dist, teacher) + beta * sum_pairs L_align
        stage 2:  0.5 CE(cls, y) + 0.5 CE(dist, y)          (the teacher is not run)

    `teacher_model`: a Teacher, or any nn.Module (wrapped in a Teacher, its early stages tapped
    automatically: timm's feature_info, else ResNet's layer1/layer2). It is held, not owned: the
    criterion has no parameters and no state. The alignment projections are the student's (see
    DearKDViT.set_alignment); their inputs arrive with the student's distilled output, so a student
    without alignment is distilled through its token alone. distillation_type 'none': labels only (a
    plain output gets CE, a (cls, dist) pair the stage-2 loss). After each call `last_terms` holds the
    detached per-term values.
    """

    def __init__(
        self,
        base_criterion: Callable[[Tensor, Tensor], Tensor],
        teacher_model: nn.Module | None = None,
        distillation_type: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        *,
        beta: float = 1.0,
        taps: list[str] | None = None,
        standardize_target: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if distillation_type not in ("none", "hard", "soft"):
            raise InputError(f"distillation_type must be 'none', 'hard' or 'soft', got '{distillation_type}'")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {alpha}")
        if distillation_type != "none" and teacher_model is None:
            raise InputError(f"distillation_type '{distillation_type}' needs a teacher_model")
        if teacher_model is not None and not isinstance(teacher_model, Teacher):
            teacher_model = Teacher(teacher_model, taps=taps)
        self.base_criterion = base_criterion
        self.__dict__["teacher"] = teacher_model  # held, not a submodule: no parameters, no state_dict entries
        self.distillation_type = distillation_type
        self.alpha, self.tau, self.beta = alpha, tau, beta
        self.standardize_target = standardize_target
        self.backend = backend
        self.stage = 1
        self.last_terms: dict[str, Tensor] = {}

    def set_stage(self, stage: int, model: nn.Module | None = None, beta: float | None = None) -> None:
        """1: CE + KD + alignment (teacher runs); 2: labels only on both heads (teacher never runs).
        Given the student (or its DDP wrapper), also switch on its distilled training output; given beta, the
        alignment weight from now on (a schedule such as --beta-decay)."""
        if stage not in (1, 2):
            raise InputError(f"stage must be 1 or 2, got {stage}")
        self.stage = stage
        if beta is not None:
            self.beta = float(beta)
        if model is not None:
            getattr(model, "module", model).set_distilled_training(True)

    def forward(self, inputs: Tensor, outputs, labels: Tensor) -> Tensor:
        cls_logits, dist_logits, align, grid = _split_outputs(outputs)
        if dist_logits is None:
            if self.distillation_type == "none":
                loss = self.base_criterion(cls_logits, labels)
                self.last_terms = {"loss": loss.detach(), "ce": loss.detach()}
                return loss
            raise InputError("DearKDLoss needs the student's (cls_logits, dist_logits) training output: "
                             "call model.set_distilled_training(True) (or criterion.set_stage(stage, model))")
        if self.stage == 2 or self.distillation_type == "none":
            ce_cls = self.base_criterion(cls_logits, labels)
            ce_dist = self.base_criterion(dist_logits, labels)
            loss = 0.5 * ce_cls + 0.5 * ce_dist
            self.last_terms = {"loss": loss.detach(), "ce": ce_cls.detach(), "ce_dist": ce_dist.detach()}
            return loss
        teacher_logits, feats = self.teacher(inputs)
        ce = self.base_criterion(cls_logits, labels)
        if self.distillation_type == "hard":
            kd = reference.kd_hard(dist_logits, teacher_logits)
        else:
            kd = reference.kd_soft(dist_logits, teacher_logits, self.tau)
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        terms = {"ce": ce.detach(), "kd": kd.detach()}
        if align and self.beta > 0:
            align_loss = self.alignment(align, feats, grid)
            loss = loss + self.beta * align_loss
            terms["align"] = align_loss.detach()
        terms["loss"] = loss.detach()
        self.last_terms = terms
        return loss

    def alignment(self, align: list, feats: list[Tensor], grid: tuple[int, int]) -> Tensor:
        """sum over the student's (tokens, W, b, tap) pairs of ops.feature_align_loss against the teacher's tap."""
        targets: dict[int, Tensor] = {}
        total = None
        for tokens, weight, bias, tap in align:
            if tap >= len(feats):
                raise InputError(f"the student aligns to teacher tap {tap}, the teacher has {len(feats)} taps "
                                 f"({', '.join(self.teacher.taps)})")
            if tap not in targets:  # once per tap, not per pair
                targets[tap] = self.align_target(feats[tap], grid)
            if weight.shape[0] != targets[tap].shape[1]:
                raise InputError(f"the student'tap projection for teacher tap '{self.teacher.taps[tap]}' has "
                                 f"{weight.shape[0]} channels, the tap has {targets[tap].shape[1]}: size "
                                 "set_alignment() from this teacher")
            term = ops.feature_align_loss(tokens, weight, bias, targets[tap], backend=self.backend)
            total = term if total is None else total + term
        return total

    def align_target(self, feat: Tensor, grid: tuple[int, int]) -> Tensor:
        """A teacher map resized to the patch grid (and standardised per channel when asked)."""
        target = resize_to_grid(feat, grid)
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
        if isinstance(head, (tuple, list)):
            head = head[0]
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


def adi_competition(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Adaptive DeepInversion's competition term, as the public code defines it: with P = softmax(s/T),
    Q = softmax(t/T), M = (P + Q) / 2, each clamped to [0.01, 0.99],
    JS = 0.5 KL(M || P) + 0.5 KL(M || Q) (batch mean), the term is 1 - clamp(JS, 0, 1)."""
    p = (student_logits.float() / temperature).softmax(1)
    q = (teacher_logits.float() / temperature).softmax(1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


_PUBLIC = INVERSION[("deepinversion", "224")]  # the public DeepInversion coefficients are the defaults


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
                 bpid_lambda: float = 0.3, adi: float = 0.0, adi_temperature: float = 3.0, student: nn.Module | None = None,
                 backend: str = "auto"):
        super().__init__()
        if adi > 0 and student is None:
            raise InputError("the ADI competition term needs a student")
        self.teacher, self.student = teacher, student
        if student is not None:
            student.eval()
        cfg = getattr(student, "pretrained_cfg", None) or {}
        # a student of one fixed input size (a ViT) sees the images resized to it; any other sees them as they are
        self.student_size = cfg.get("input_size", (0, 0, 0))[-1] if cfg.get("fixed_input_size") else None
        self.r_bn, self.first_bn_mult, self.tv_l2, self.tv_l1, self.l2 = r_bn, first_bn_mult, tv_l2, tv_l1, l2
        self.bpid, self.bpid_margin, self.bpid_lambda, self.adi = bpid, bpid_margin, bpid_lambda, adi
        self.adi_temperature = adi_temperature
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
        norm = torch.linalg.vector_norm(x.float().flatten(1), dim=1).mean()  # per-image L2 norm, batch mean
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
            competition = adi_competition(self.student(xs), logits, self.adi_temperature)
            loss = loss + self.adi * competition
            terms["adi"] = competition
        terms["loss"] = loss
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return loss

    def close(self) -> None:
        for h in self._handles:
            h.remove()
