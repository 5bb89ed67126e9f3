"""One training step, one training loop and one evaluation loop; the criterion (and its stage) picks the
loss terms."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from .errors import RunError

__all__ = ["TrainStep", "train_one_epoch", "evaluate", "cosine_schedule", "autocast", "make_optimizer"]


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast on CPU and CUDA when enabled (bf16 unless another dtype is given)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def make_optimizer(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: the fused implementation on CUDA, the multi-tensor (foreach) one elsewhere."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=cuda, foreach=not cuda)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.01):
    """Per-step learning-rate factor: linear warm-up to 1, then cosine down to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainStep:
    """One optimisation step: forward + criterion(inputs, outputs, labels) under autocast (compiled as one
    graph with --compile: the student, the DearKD loss and the teacher it runs), backward, optional
    clipping, optimizer and schedule. fp16 autocast uses a gradient scaler; bf16 needs none. Nothing in
    the step waits for the device: the returned loss is a detached device tensor."""

    def __init__(self, model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, scheduler, *,
                 device: torch.device, amp: bool = False, amp_dtype: torch.dtype = torch.bfloat16,
                 max_norm: float | None = None, compile: bool = False, compile_mode: str = "default"):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.device, self.amp, self.amp_dtype, self.max_norm = device, amp, amp_dtype, max_norm
        self.scaler = torch.amp.GradScaler(device.type) if amp and amp_dtype == torch.float16 else None
        mode = None if compile_mode == "default" else compile_mode
        self.forward_loss = torch.compile(self._forward_loss, mode=mode) if compile else self._forward_loss
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _forward_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        with autocast(self.device, self.amp, self.amp_dtype):
            outputs = self.model(images)
            return self.criterion(images, outputs, labels)

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        loss = self.forward_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.max_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.max_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


def train_one_epoch(step: TrainStep, loader, *, mixup_fn: Callable | None = None, desc: str = "train",
                    progress: bool = True) -> dict[str, float]:
    """One pass over loader with `step`; returns the sample-weighted mean of every term in the
    criterion's last_terms (plus "lr"). Host syncs: one every 10 steps for the progress bar (none
    without it), and one per term at the end of the epoch."""
    step.model.train()
    if isinstance(step.criterion, nn.Module):
        step.criterion.train()
    sums: dict[str, Tensor] = {}
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar):
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)
        loss = step(images, labels)
        n = images.shape[0]
        seen += n
        for k, v in getattr(step.criterion, "last_terms", {"loss": loss}).items():
            sums[k] = sums.get(k, 0.0) + v.float() * n
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
    if seen == 0:
        raise RunError("the training loader yielded no batch (fewer images than one batch?)")
    out = {k: (v / seen).item() for k, v in sums.items()}
    if not math.isfinite(out["loss"]):
        raise RunError(f"training loss is {out['loss']} (diverged); lower --lr or use --max-norm")
    out["lr"] = step.optimizer.param_groups[0]["lr"]
    return out


@torch.no_grad()
def evaluate(model: Callable[[Tensor], Tensor], loader, *, device: torch.device, amp: bool = False,
             amp_dtype: torch.dtype = torch.bfloat16, desc: str = "eval", progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of model's logits (eval mode) over every sample once."""
    if isinstance(model, nn.Module):
        model.eval()
    correct1 = correct5 = loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        with autocast(device, amp, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum = loss_sum + nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels.view(-1, 1)
        correct1 = correct1 + hit[:, :1].sum()
        correct5 = correct5 + hit.any(dim=1).sum()
        seen += labels.shape[0]
    if seen == 0:
        raise RunError("the evaluation loader yielded no sample")
    return {
        "top1": 100.0 * correct1.item() / seen,
        "top5": 100.0 * correct5.item() / seen,
        "loss": loss_sum.item() / seen,
        "num_samples": seen,
    }
