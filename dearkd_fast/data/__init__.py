"""One interface over the input backends: `build_data(cfg, inputs, ...)` -> train and eval loaders.

Both backends see the same scanned file list (subset and skipped files applied once, here) and
yield (images, labels) on the training device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, preset_for
from ..errors import DataError
from .folder import balanced_subset, holdout_split, resolve_data, scan_image_folder
from .torchvision import build_torch_loader, eval_transform, train_transform

__all__ = ["DataConfig", "DataBundle", "DataError", "InputSpec", "build_data", "DeviceLoader"]


@dataclass(frozen=True)
class InputSpec:
    """What a network expects of its input images: side, normalisation, eval centre-crop share."""

    size: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0

    @classmethod
    def of_model(cls, name: str) -> InputSpec:
        """From a timm model's pretrained config (a probe model with one class is built: this draws
        from torch's generator exactly as the model's own creation would)."""
        import timm

        cfg = timm.create_model(name, num_classes=1).pretrained_cfg
        return cls(cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("crop_pct", 1.0))


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


def _file_lists(cfg: DataConfig, seed: int, progress: bool):
    """(source, train samples after the subset, val samples, the training scan, every skipped file)."""
    source = resolve_data(cfg.source, cfg.val_source)
    workers = max(1, cfg.workers)
    scan = scan_image_folder(source.train_dir, allow_empty_classes=cfg.allow_empty_classes, progress=progress,
                             workers=workers)
    skipped = list(scan.skipped)
    if source.val_dir is None:
        train, val = holdout_split(scan.samples, cfg.holdout, seed)
    else:
        vscan = scan_image_folder(source.val_dir, allow_empty_classes=True, classes=scan.classes, progress=progress,
                                  workers=workers)
        train, val = scan.samples, vscan.samples
        skipped += vscan.skipped
    return source, balanced_subset(train, cfg.fraction, seed), val, scan, skipped


def build_data(cfg: DataConfig, inputs: InputSpec, *, batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
               amp: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Scan, validate, subset, and build both loaders (cfg.loader) for a network expecting `inputs`."""
    source, train_samples, val_samples, scan, skipped = _file_lists(cfg, seed, progress)
    hflip = cfg.hflip if cfg.hflip is not None else source.hflip
    pad_crop = cfg.pad_crop if cfg.pad_crop is not None else preset_for(inputs.size).pad_crop
    device = torch.device(device)
    ebs = cfg.eval_batch_size or batch_size * 2
    if cfg.loader == "dali":
        from .dali import build_dali_loader

        common = dict(inputs=inputs, device=device, workers=cfg.workers, seed=seed, rank=rank, world_size=world_size,
                      fp16=amp and device.type == "cuda")
        train = build_dali_loader(train_samples, batch_size=batch_size, train=True, pad_crop=pad_crop, hflip=hflip,
                                  randaug=cfg.randaug, **common)
        val = build_dali_loader(val_samples, batch_size=ebs, train=False, **common)
    else:
        common = dict(workers=cfg.workers, seed=seed, rank=rank, world_size=world_size, pin_memory=device.type == "cuda")
        ttf = train_transform(inputs, pad_crop=pad_crop, hflip=hflip, randaug=cfg.randaug)
        train = DeviceLoader(build_torch_loader(train_samples, ttf, batch_size=batch_size, train=True, **common), device)
        val = DeviceLoader(build_torch_loader(val_samples, eval_transform(inputs), batch_size=ebs, train=False, **common),
                           device)
    return DataBundle(train=train, val=val, classes=scan.classes, name=source.name, train_files=train_samples,
                      val_files=val_samples, skipped=skipped, empty_classes=scan.empty_classes)
