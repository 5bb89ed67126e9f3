"""One training loop and one evaluation loop; the criterion (and its stage) picks the loss terms."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from .errors import RunError

__all__ = ["train_one_epoch", "evaluate", "cosine_schedule", "autocast"]


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU and CUDA when enabled."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.01):
    """Per-step learning-rate factor: linear warm-up to 1, then cosine down to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: nn.Module,
    criterion: Callable,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    device: torch.device,
    amp: bool = False,
    mixup_fn: Callable | None = None,
    max_norm: float | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over loader: forward, criterion(inputs, outputs, labels), backward, step.

    Returns the sample-weighted mean of every term in criterion.last_terms (plus "lr").
    """
    model.train()
    if isinstance(criterion, nn.Module):
        criterion.train()
    sums: dict[str, Tensor] = {}
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)
        with autocast(device, amp):
            outputs = model(images)
            loss = criterion(images, outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], max_norm
            )
        optimizer.step()
        scheduler.step()
        n = images.shape[0]
        seen += n
        for k, v in getattr(criterion, "last_terms", {"loss": loss.detach()}).items():
            sums[k] = sums.get(k, 0.0) + v.float() * n
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if seen == 0:
        raise RunError("the training loader yielded no batch (fewer images than one batch?)")
    out = {k: (v / seen).item() for k, v in sums.items()}
    if not math.isfinite(out["loss"]):
        raise RunError(f"training loss is {out['loss']} (diverged); lower --lr or use --max-norm")
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


@torch.no_grad()
def evaluate(model: Callable[[Tensor], Tensor], loader, *, device: torch.device, amp: bool = False,
             desc: str = "eval", progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of model's logits (eval mode) over every sample once."""
    if isinstance(model, nn.Module):
        model.eval()
    correct1 = correct5 = loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        with autocast(device, amp):
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
