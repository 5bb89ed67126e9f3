"""DearKD as a timm training task (`timm.task.TrainingTask`): drop it into a loop written like timm's train.py.

    task = DearKDTask(student, "runs/x/teacher.pt", stage1_epochs=200)
    task.set_epoch(epoch)                       # at each epoch start: stage 1 before stage1_epochs, then stage 2
    result = task(images, labels)               # {"loss", "output", "ce", "kd", "align", ...}
    result["loss"].backward()

Stage 1: (1 - alpha) CE(cls, y) + alpha KD(dist, teacher) + beta * sum_l L_align; stage 2: 0.5 CE(cls, y) +
0.5 CE(dist, y), the teacher not run. The loss is the trainer's (`DearKDLoss`); the alignment projections are
parameters of the student, the task's trainable module, so optimisers, EMA, DDP and checkpoints carry them.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.utils import unwrap_model

from .data import InputSpec
from .errors import InputError
from .losses import DearKDLoss
from .models.teacher import Teacher, create_classifier, load_teacher

__all__ = ["DearKDTask"]


def resolve_teacher(teacher: nn.Module | str, student: nn.Module, pretrained_path: str | None = None,
                    taps: list[str] | None = None) -> Teacher:
    """A frozen Teacher from a module, our teacher.pt, or a timm name (`tv:<name>` for torchvision) with a
    weights file `pretrained_path` (else its published weights from the local cache); inputs normalised as the
    student's are re-normalised for it."""
    if isinstance(teacher, Teacher):
        return teacher
    spec = None
    if isinstance(teacher, str) and teacher.endswith(".pt") and os.path.isfile(teacher):
        model, spec = load_teacher(teacher, num_classes=unwrap_model(student).num_classes)
    elif isinstance(teacher, str):
        model = create_classifier(teacher, unwrap_model(student).num_classes, pretrained=pretrained_path is None,
                                  weights=pretrained_path)
    elif isinstance(teacher, nn.Module):
        model = teacher
    else:
        raise InputError(f"teacher must be a module, a teacher.pt or a model name, got {type(teacher).__name__}")
    inputs = InputSpec.of_cfg(unwrap_model(student).pretrained_cfg)
    return Teacher(model.to(memory_format=torch.channels_last), spec, taps, input_norm=(inputs.mean, inputs.std))


class DearKDTask(TrainingTask):
    """The two-stage DearKD objective as a timm task, with the stage switch by epoch (`set_epoch`).

    `student_model`: a DearKD ViT (timm's `dearkd_*`); `teacher_model`: a module, our teacher.pt, or a timm name
    with `teacher_pretrained_path`; `stage1_epochs`: E1, the first epoch of stage 2; the DearKD settings as the
    trainer's flags (alpha, beta, tau, distillation_type, standardize_target, taps, backend); `criterion`: the
    label loss (default cross-entropy; a SoftTargetCrossEntropy for Mixup / CutMix targets).
    """

    def __init__(self, student_model: nn.Module, teacher_model: nn.Module | str, *, stage1_epochs: int,
                 teacher_pretrained_path: str | None = None, criterion: nn.Module | None = None, alpha: float = 0.5,
                 beta: float = 1.0, tau: float = 1.0, distillation_type: str = "hard", standardize_target: bool = False,
                 taps: list[str] | None = None, backend: str = "auto", device: torch.device | None = None,
                 dtype: torch.dtype | None = None, verbose: bool = True):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        student = unwrap_model(student_model)
        if not hasattr(student, "set_alignment"):
            raise InputError(f"DearKDTask needs a DearKD student (timm's dearkd_* models), got {type(student).__name__}")
        if stage1_epochs < 0:
            raise InputError(f"stage1_epochs must be >= 0, got {stage1_epochs}")
        student.set_distilled_training(True)
        self.teacher = resolve_teacher(teacher_model, student, teacher_pretrained_path, taps).to(self.device)
        if beta > 0 and not student.align_proj:
            student.set_alignment(self.teacher.channels())
        self.trainable_module = student_model.to(self.device)
        self.criterion = DearKDLoss(criterion or nn.CrossEntropyLoss(), self.teacher, distillation_type, alpha, tau,
                                    beta=beta, standardize_target=standardize_target, backend=backend)
        self.stage1_epochs = stage1_epochs
        self.epoch = 0
        self.set_epoch(0)

    @property
    def stage(self) -> int:
        return self.criterion.stage

    def set_epoch(self, epoch: int) -> None:
        """Stage 1 for epochs before stage1_epochs, stage 2 from there on (the teacher is then never run)."""
        self.epoch = epoch
        self.criterion.set_stage(1 if epoch < self.stage1_epochs else 2, self.trainable_module)

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> DearKDTask:
        """The student (its alignment projections included) in DistributedDataParallel; the teacher unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """torch.compile the student (train and eval); the teacher runs eagerly (its taps are forward hooks)."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        return self.trainable_module

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        return {"epoch": self.epoch, "stage1_epochs": self.stage1_epochs}

    def load_task_state(self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None,
                        ema: bool = False) -> None:
        if not state:
            return
        if strict and state.get("stage1_epochs", self.stage1_epochs) != self.stage1_epochs:
            raise InputError(f"the checkpoint's task switches stage at epoch {state['stage1_epochs']}, this task at "
                             f"{self.stage1_epochs}")
        if not ema:
            self.set_epoch(int(state.get("epoch", self.epoch)))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """timm's result dict: `loss` (to backpropagate), `output` (the class-token logits, for metrics) and each
        term of this stage, detached (ce, kd, align; stage 2: ce, ce_dist)."""
        outputs = self.trainable_module(input)
        loss = self.criterion(input, outputs, target)
        terms = {k: v for k, v in self.criterion.last_terms.items() if k != "loss"}
        return {"loss": loss, "output": outputs[0], **terms}
