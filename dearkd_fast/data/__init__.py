"""One interface over the input backends: `build_data(cfg)` -> train and eval loaders.

Both backends see the same scanned file list (subset and skipped files applied once, here) and
yield (images, labels) on the training device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .folder import DataError, balanced_subset, holdout_split, resolve_data, scan_image_folder
from .torchvision import build_torch_loader, eval_transform, train_transform

__all__ = ["DataConfig", "DataBundle", "DataError", "build_data", "DeviceLoader"]


@dataclass
class DataConfig:
    data: str = "digits"
    val_data: str | None = None
    input_size: int = 32
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    batch_size: int = 64
    eval_batch_size: int | None = None
    workers: int = 2
    hflip: float | None = None  # None: 0 for digits, else 0.5
    pad_crop: bool | None = None  # None: on for inputs up to 64 px
    randaug: str | None = None
    data_fraction: float = 1.0
    holdout: float = 0.1  # held-out share of --data when no validation folder exists
    seed: int = 0
    allow_empty_classes: bool = False
    backend: str = "torch"  # "torch" | "dali"
    device: str = "cpu"
    amp: bool = False
    rank: int = 0
    world_size: int = 1
    progress: bool = True


@dataclass
class DataBundle:
    train: object
    val: object
    classes: list[str]
    name: str
    train_files: list[tuple[str, int]]  # (path, class index) after subsets and skipped files
    val_files: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(self.train_files)

    @property
    def num_val(self) -> int:
        return len(self.val_files)


class DeviceLoader:
    """Wraps a CPU loader: moves each (images, labels) batch to the device."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        nb = self.device.type == "cuda"
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def build_data(cfg: DataConfig) -> DataBundle:
    """Scan, validate, subset, and build both loaders for cfg.backend."""
    train_dir, val_dir, name = resolve_data(cfg.data, cfg.val_data)
    scan = scan_image_folder(train_dir, allow_empty_classes=cfg.allow_empty_classes, progress=cfg.progress,
                             workers=max(1, cfg.workers))
    train_samples = scan.samples
    skipped = list(scan.skipped)
    if val_dir is None:
        train_samples, val_samples = holdout_split(train_samples, cfg.holdout, cfg.seed)
    else:
        vscan = scan_image_folder(val_dir, allow_empty_classes=True, classes=scan.classes, progress=cfg.progress,
                                  workers=max(1, cfg.workers))
        val_samples = vscan.samples
        skipped += vscan.skipped
    train_samples = balanced_subset(train_samples, cfg.data_fraction, cfg.seed)
    hflip = cfg.hflip if cfg.hflip is not None else (0.0 if name == "digits" else 0.5)
    pad_crop = cfg.pad_crop if cfg.pad_crop is not None else cfg.input_size <= 64
    device = torch.device(cfg.device)
    ebs = cfg.eval_batch_size or cfg.batch_size * 2
    if cfg.backend == "dali":
        from .dali import build_dali_loader

        common = dict(size=cfg.input_size, mean=cfg.mean, std=cfg.std, device=device, workers=cfg.workers,
                      seed=cfg.seed, rank=cfg.rank, world_size=cfg.world_size, fp16=cfg.amp and device.type == "cuda")
        train = build_dali_loader(train_samples, batch_size=cfg.batch_size, train=True, pad_crop=pad_crop, hflip=hflip,
                                  randaug=cfg.randaug, **common)
        val = build_dali_loader(val_samples, batch_size=ebs, train=False, crop_pct=cfg.crop_pct, **common)
    elif cfg.backend == "torch":
        pin = device.type == "cuda"
        ttf = train_transform(cfg.input_size, cfg.mean, cfg.std, pad_crop=pad_crop, hflip=hflip, randaug=cfg.randaug)
        etf = eval_transform(cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct)
        train = DeviceLoader(build_torch_loader(train_samples, ttf, batch_size=cfg.batch_size, train=True, workers=cfg.workers,
                                                seed=cfg.seed, rank=cfg.rank, world_size=cfg.world_size, pin_memory=pin), device)
        val = DeviceLoader(build_torch_loader(val_samples, etf, batch_size=ebs, train=False, workers=cfg.workers,
                                              seed=cfg.seed, rank=cfg.rank, world_size=cfg.world_size, pin_memory=pin), device)
    else:
        raise DataError(f"unknown data backend '{cfg.backend}' (torch or dali)")
    return DataBundle(train=train, val=val, classes=scan.classes, name=name, train_files=train_samples,
                      val_files=val_samples, skipped=skipped, empty_classes=scan.empty_classes)
