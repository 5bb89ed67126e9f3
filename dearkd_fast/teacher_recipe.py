"""How the teacher is trained (--teacher-recipe): `standard` (the chosen optimiser, warm-up + cosine, the run's own
augmentation) or `fast`, the techniques of the fastest published CIFAR-10 runs (Page's ResNet-9 in 24 epochs,
Jordan's airbench in 10) applied to `cifar_widenet` on the resident loader:

- the 2x2 stem conv holds the patch-whitening filters of the training images, frozen: W = V^T / sqrt(lambda + 5e-4)
  for the eigen-pairs (lambda, V) of the 2x2x3 patch second-moment matrix, and -W beside it;
- every other 3x3 conv starts as the identity on its first in-channels filters (dirac);
- BatchNorm weights stay 1 and their running statistics move with momentum 0.4; BN biases learn at 64x the rate
  (and 1/64 the decay);
- Nesterov SGD, momentum 0.85; the rate rises linearly from 0.2x to 1x over 23 % of the steps, then falls to 0.07x;
- logits are scaled by 1/9 while training (folded into `fc` at the end: the saved teacher is a plain net);
- lookahead: every 5 steps the weights and a slow copy of them meet at w_slow <- w_slow + (1 - d)(w - w_slow),
  d = 0.95^5 (t/T)^3, and the last step hands over the slow copy;
- BatchNorm's running statistics are then measured afresh for the final weights ("precise BN": the plain average
  over 10240 augmented training images), since those of training belong to the fast weights, not the slow copy;
- translate by up to 2 px with reflected borders, and flips that alternate per image from epoch to epoch.

Each recipe is a `TeacherRecipe`: what train.train_teacher's epoch loop needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from . import engine
from .data.resident import ResidentLoader
from .errors import InputError

__all__ = ["TeacherRecipe", "standard_recipe", "fast_recipe", "whitening_filters"]

FAST_MOMENTUM, FAST_BN_MOMENTUM, FAST_BIAS_SCALE, FAST_LOGIT_SCALE = 0.85, 0.4, 64.0, 1 / 9
FAST_WARMUP, FAST_START, FAST_END, FAST_LOOKAHEAD_EVERY = 0.23, 0.2, 0.07, 5
FAST_BN_IMAGES = 10240


@dataclass
class TeacherRecipe:
    """The loader, optimiser, schedule and loss scale of a teacher's training; `after_step(step)` runs after each of
    the `total_steps` steps and `finish()` once after the last."""
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    logit_scale: float = 1.0
    after_step: Callable[[int], None] | None = None
    finish: Callable[[], None] | None = None


def standard_recipe(model: nn.Module, loader, *, opt: str, lr: float, weight_decay: float, epochs: int,
                    warmup_steps: int) -> TeacherRecipe:
    """--teacher-opt at --teacher-lr, linear warm-up then cosine, the run's own training loader."""
    optimizer = engine.make_optimizer(engine.param_groups([model], weight_decay), lr, opt)
    total = epochs * len(loader)
    return TeacherRecipe(loader, optimizer, engine.cosine_schedule(optimizer, warmup_steps, total), total)


def whitening_filters(images: Tensor, k: int, eps: float = 5e-4) -> Tensor:
    """[2*C*k*k, C, k, k] conv filters that whiten the k x k patches of normalised images [N, C, H, W]: the
    eigenvectors of the patches' second-moment matrix scaled by 1/sqrt(eigenvalue + eps), then their negations."""
    C = images.shape[1]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, C * k * k)
    values, vectors = torch.linalg.eigh((patches.T @ patches).double() / patches.shape[0])
    w = (vectors / (values + eps).sqrt()).T.flip(0).reshape(C * k * k, C, k, k)  # largest eigenvalue first
    return torch.cat([w, -w]).float()


def fast_recipe(model: nn.Module, loader, *, lr: float, weight_decay: float, epochs: int,
                whiten_images: int = 5000, bn_images: int = FAST_BN_IMAGES, amp: bool = False,
                amp_dtype: torch.dtype = torch.bfloat16) -> TeacherRecipe:
    """The fast CIFAR recipe (module docstring) on `model` (prepared in place: stem whitened and frozen, convs
    identity-initialised, BN weights frozen) over the resident `loader`; `amp` / `amp_dtype` as in training (the
    final BN statistics are measured under them)."""
    if not isinstance(loader, ResidentLoader):
        raise InputError("--teacher-recipe fast needs the resident loader (--loader resident: a data set whose "
                         "decoded pixels fit in memory)")
    stem = getattr(model, "conv1", None)
    if not isinstance(stem, nn.Conv2d) or stem.in_channels != 3 or stem.out_channels != 2 * 3 * stem.kernel_size[0] ** 2:
        raise InputError("--teacher-recipe fast needs a teacher whose stem conv1 maps 3 channels to 2*3*k*k "
                         "(cifar_widenet)")
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear) or fc.bias is not None:
        raise InputError("--teacher-recipe fast needs a linear head `fc` without bias (cifar_widenet)")
    with torch.no_grad():
        sample = loader.images[:whiten_images].to(stem.weight.device)
        stem.weight.copy_(whitening_filters(loader._normalise(sample), stem.kernel_size[0]))
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m is not stem and m.kernel_size == (3, 3):
                nn.init.dirac_(m.weight[:m.in_channels])
    stem.weight.requires_grad_(False)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.weight.requires_grad_(False)
        m.momentum = FAST_BN_MOMENTUM
    biases = [m.bias for m in norms]
    ids = {id(p) for p in biases}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0},
              {"params": biases, "lr": lr * FAST_BIAS_SCALE, "weight_decay": weight_decay / FAST_BIAS_SCALE}]
    optimizer = engine.make_optimizer([g for g in groups if g["params"]], lr, "sgd", momentum=FAST_MOMENTUM)
    train = loader.with_augmentation(pad=2, reflect=True, alternate_flip=True)
    total = epochs * len(train)
    warm = max(1, int(FAST_WARMUP * total))

    def factor(step: int) -> float:
        if step < warm:
            return FAST_START + (1 - FAST_START) * step / warm
        return 1 + (FAST_END - 1) * (step - warm) / max(1, total - warm)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    params = [p for p in model.parameters() if p.requires_grad]
    slow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def after_step(step: int) -> None:
        if step % FAST_LOOKAHEAD_EVERY == 0 or step == total:
            d = 1.0 if step == total else 0.95 ** 5 * (step / total) ** 3
            for s, p in zip(slow, params):
                s.lerp_(p, 1 - d)
                p.copy_(s)

    @torch.no_grad()
    def finish() -> None:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
        model.train()
        train.set_epoch(epochs)  # augmentations no training step saw
        seen = 0
        for x, _ in train if bn_images > 0 else ():
            with engine.autocast(x.device, amp, amp_dtype):
                model(x)
            seen += x.shape[0]
            if seen >= bn_images:
                break  # before the loader augments a batch no one reads
        for m in norms:
            m.momentum = 0.1
        fc.weight.mul_(FAST_LOGIT_SCALE)  # logits * s == a head with weights * s: the scale moves into the net

    return TeacherRecipe(train, optimizer, scheduler, total, FAST_LOGIT_SCALE, after_step, finish)
