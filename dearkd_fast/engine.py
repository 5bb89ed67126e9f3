"""One training step, one training loop and one evaluation loop; the criterion (and its stage) picks the
loss terms."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from . import distributed
from .errors import RunError

__all__ = ["TrainStep", "EpochState", "train_one_epoch", "evaluate", "cosine_schedule", "autocast", "make_optimizer",
           "param_groups", "base_criterion"]


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast on CPU and CUDA when enabled (bf16 unless another dtype is given)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Optimizer groups: no decay for biases, norms, tokens and position embeddings (no_weight_decay())."""
    decay, no_decay = [], []
    for mod in modules:
        skip = mod.no_weight_decay() if hasattr(mod, "no_weight_decay") else set()
        for name, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def base_criterion(smoothing: float = 0.0, *, soft_targets: bool = False) -> nn.Module:
    """The label loss: soft-target CE for Mixup/CutMix targets (which carry the smoothing), else CE with label
    smoothing when asked."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if soft_targets:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


def make_optimizer(groups: list[dict], lr: float, kind: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999) or SGD (Nesterov, `momentum`), each the fused implementation (CUDA and CPU): it
    can skip a step on a device-side flag (found_inf), which is how a non-finite loss is skipped without waiting
    for the device."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)


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
    clipping, optimizer and schedule. fp16 autocast uses a gradient scaler; bf16 needs none. A non-finite
    loss skips the update (a fused optimizer reads the device-side flag; the scaler skips non-finite
    gradients itself); the schedule still advances. Nothing in the step waits for the device: the returned
    loss is a detached device tensor, and `finite` its device-side flag."""

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
        self.finite = torch.isfinite(loss.detach())
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
            if self.optimizer.defaults.get("fused"):
                self.optimizer.found_inf = (~self.finite).float()  # read on the device by the fused kernel
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.found_inf
            else:
                self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


@dataclass
class EpochState:
    """Where an epoch stands, as device tensors (nothing waits for the device to update it): steps done,
    the sample-weighted sums of every loss term over the finite steps, samples in them, steps skipped for a
    non-finite loss, and the longest run of consecutive skipped steps so far. A checkpoint stores it, so a
    run resumed mid-epoch reports the same epoch means as one never interrupted."""

    step: int
    sums: dict
    seen: Tensor
    skipped: Tensor
    bad_run: Tensor
    worst_run: Tensor

    def state_dict(self) -> dict:
        return {"step": self.step, "sums": dict(self.sums), "seen": self.seen, "skipped": self.skipped,
                "bad_run": self.bad_run, "worst_run": self.worst_run}

    @classmethod
    def from_dict(cls, d: dict | None, device: torch.device) -> EpochState:
        """A checkpoint's state on `device`, or (d None) an epoch not yet begun."""
        if not d:
            long = torch.zeros((), dtype=torch.long)
            d = {"step": 0, "sums": {}, "seen": torch.zeros((), dtype=torch.float64), "skipped": long,
                 "bad_run": long, "worst_run": long}
        return cls(d["step"], {k: v.to(device) for k, v in d["sums"].items()},
                   *(d[k].to(device) for k in ("seen", "skipped", "bad_run", "worst_run")))

    def add(self, terms: dict[str, Tensor], n: int, finite: Tensor) -> None:
        """One step's terms (weighted by its n samples) if its loss was finite; else count it skipped."""
        self.step += 1
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, torch.zeros((), device=v.device)) + torch.where(finite, v.float() * n, 0.0)
        self.seen = self.seen + finite.double() * n
        bad = (~finite).long()
        self.skipped = self.skipped + bad
        self.bad_run = (self.bad_run + 1) * bad
        self.worst_run = torch.maximum(self.worst_run, self.bad_run)


def train_one_epoch(step: TrainStep, loader, *, mixup_fn: Callable | None = None, desc: str = "train",
                    progress: bool = True, state: EpochState | None = None, max_bad_steps: int = 0,
                    after_step: Callable[[EpochState], None] | None = None) -> dict[str, float]:
    """One pass over loader with `step` (from `state`, the steps already done, when resuming mid-epoch);
    returns the sample-weighted mean over the finite steps of every term in the criterion's last_terms,
    plus "lr" and "skipped_steps". `after_step(state)` runs after every step (checkpoints, stop requests).
    A RunError stops the run once `max_bad_steps` (> 0) non-finite losses came in a row; that is checked
    where the loop reads the device anyway (every 10 steps with a progress bar, and at the end). Host
    syncs: one every 10 steps for the progress bar (none without it), and one per term at the end."""
    step.model.train()
    if isinstance(step.criterion, nn.Module):
        step.criterion.train()
    state = state if state is not None else EpochState.from_dict(None, next(iter(step.params)).device)
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True, initial=state.step,
               total=state.step + len(loader) if hasattr(loader, "__len__") else None)
    for images, labels in bar:
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)
        loss = step(images, labels)
        state.add(getattr(step.criterion, "last_terms", {"loss": loss}), images.shape[0], step.finite)
        if progress and state.step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
            if not distributed.active():  # under torchrun the ranks stop together, at the epoch end
                _check_bad_run(state.worst_run, state.step, max_bad_steps)
        if after_step is not None:
            after_step(state)
    # every rank's sums: the epoch means are over all ranks' samples (identity in one process)
    sums = {k: distributed.all_sum(v) for k, v in sorted(state.sums.items())}
    seen_t, skipped = distributed.all_sum(state.seen), distributed.all_sum(state.skipped)
    _check_bad_run(distributed.all_max(state.worst_run), state.step, max_bad_steps)
    seen = seen_t.item()
    if seen == 0:
        raise RunError("the training loader yielded no batch with a finite loss (fewer images than one batch?)")
    out = {k: (v / seen).item() for k, v in sums.items()}
    out["lr"] = step.optimizer.param_groups[0]["lr"]
    out["skipped_steps"] = int(skipped.item())
    return out


def _check_bad_run(worst_run: Tensor, at_step: int, max_bad_steps: int) -> None:
    if max_bad_steps <= 0:  # never stop: no need to read the device
        return
    worst = int(worst_run.item())
    if worst >= max_bad_steps:
        raise RunError(f"{worst} steps in a row had a non-finite loss (skipped) by step "
                       f"{at_step} of the epoch; the last checkpoint is intact: lower --lr or use --max-norm, then "
                       "--resume")


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
    # every rank evaluated its own shard: sum the counts (identity in one process)
    totals = distributed.all_sum(torch.stack([correct1, correct5, loss_sum,
                                              torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    correct1, correct5, loss_sum, seen = totals[0], totals[1], totals[2], int(totals[3].item())
    if seen == 0:
        raise RunError("the evaluation loader yielded no sample")
    return {
        "top1": 100.0 * correct1.item() / seen,
        "top5": 100.0 * correct5.item() / seen,
        "loss": loss_sum.item() / seen,
        "num_samples": seen,
    }
