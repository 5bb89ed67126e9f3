"""One interface over the input backends: `build_data(cfg, inputs, ...)` -> train and eval loaders.

Both backends see the same scanned file list (subset and skipped files applied once, here) and
yield (images, labels) on the training device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, preset_for
from ..errors import DataError
from .folder import balanced_subset, builtin_name, holdout_split, resolve_data, scan_image_folder
from .torch_loader import build_torch_loader, eval_transform, train_transform

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

        return cls.of_cfg(timm.create_model(name, num_classes=1).pretrained_cfg)

    @classmethod
    def of_cfg(cls, cfg: dict) -> InputSpec:
        """From a timm pretrained config (a built model's `pretrained_cfg`)."""
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

    def all_skipped(self) -> list[str]:
        """Files passed over by the scans (a file in both --data and --val-data counts twice), plus those
        that could not be read during the run."""
        during = set(getattr(self.train, "missing", ())) | set(getattr(self.val, "missing", ()))
        return list(self.skipped) + sorted(during - set(self.skipped))


class DeviceLoader:
    """Wraps a CPU loader of (images, labels, unreadable paths) batches: moves images and labels to the
    device and collects in `missing` the files that vanished or broke after the scan (skipped)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.missing: set[str] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        nb = self.device.type == "cuda"
        for x, y, missing in self.loader:
            self.missing.update(missing)
            if x is not None:
                yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Position the training order at batch `start` of `epoch` (a resumed run starts mid-epoch)."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch, start)


def _file_lists(cfg: DataConfig, seed: int, progress: bool):
    """(source, train samples after the subset, val samples, the training scan, every skipped file)."""
    source = resolve_data(cfg.source, cfg.val_source, progress)
    workers = max(1, cfg.workers)
    scan = scan_image_folder(source.train_dir, allow_empty_classes=cfg.allow_empty_classes, progress=progress,
                             workers=workers)
    skipped = list(scan.skipped)
    if source.val_dir is None:
        train, val = holdout_split(scan.samples, cfg.holdout, 0)  # seed 0: one hold-out for every seed
    else:
        vscan = scan_image_folder(source.val_dir, allow_empty_classes=True, classes=scan.classes, progress=progress,
                                  workers=workers)
        train, val = scan.samples, vscan.samples
        skipped += vscan.skipped
    val = balanced_subset(val, cfg.val_fraction, 0, flag="--val-fraction")  # seed 0: one subset for every run
    return source, balanced_subset(train, cfg.fraction, seed), val, scan, skipped


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_sizes(source, train: list, val: list, batch_size: int) -> None:
    """DataError for a split that cannot train or evaluate: no validation image, fewer training images
    than one batch."""
    if not val:
        raise DataError(f"no validation images for '{source.train_dir}': give --val-data, or at least 2 images "
                        "per class to hold some out")
    if len(train) < batch_size:
        raise DataError(f"only {len(train)} training images (after --data-fraction and the hold-out), fewer than "
                        f"--batch-size {batch_size}; lower --batch-size")


def resolve_loader(cfg: DataConfig, builtin: bool, pad_crop: bool) -> str:
    """The input pipeline: cfg.loader, with 'auto' the resident loader for a built-in set at a pad-and-crop size
    without RandAugment, else torchvision's; DataError where the resident loader cannot serve the size."""
    if cfg.loader == "resident" and not pad_crop:
        raise DataError("--loader resident augments small images (pad-and-crop sizes); use --loader torch or dali here")
    if cfg.loader != "auto":
        return cfg.loader
    return "resident" if builtin and pad_crop and not cfg.randaug else "torch"


def build_data(cfg: DataConfig, inputs: InputSpec, *, batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
               amp: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Scan, validate, subset, and build both loaders (cfg.loader) for a network expecting `inputs`."""
    source, train_samples, val_samples, scan, skipped = _file_lists(cfg, seed, progress)
    hflip = cfg.hflip if cfg.hflip is not None else source.hflip
    pad_crop = cfg.pad_crop if cfg.pad_crop is not None else preset_for(inputs.size).pad_crop
    loader = resolve_loader(cfg, builtin_name(cfg.source) is not None, pad_crop)
    if loader == "dali":  # DALI's reader takes UTF-8 names only: others are skipped and counted
        bad = [p for p, _ in train_samples + val_samples if not _utf8(p)]
        drop = set(bad)
        train_samples = [s for s in train_samples if s[0] not in drop]
        val_samples = [s for s in val_samples if s[0] not in drop]
        skipped = sorted(skipped + bad)
    _check_sizes(source, train_samples, val_samples, batch_size)
    device = torch.device(device)
    ebs = cfg.eval_batch_size or batch_size * 2
    if loader == "resident":
        from .resident import build_resident_loader

        common = dict(inputs=inputs, seed=seed, pad_crop=pad_crop, hflip=hflip, rank=rank, world_size=world_size,
                      device=device, progress=progress, max_bytes=int(cfg.resident_max_gb * 2**30))
        train = build_resident_loader(train_samples, batch_size=batch_size, train=True, reprob=cfg.reprob,
                                      remode=cfg.remode, repeats=cfg.aug_repeats, **common)
        val = build_resident_loader(val_samples, batch_size=ebs, train=False, **common)
    elif loader == "dali":
        from .dali import build_dali_loader

        common = dict(inputs=inputs, device=device, workers=cfg.workers, seed=seed, rank=rank, world_size=world_size,
                      fp16=amp and device.type == "cuda")
        train = build_dali_loader(train_samples, batch_size=batch_size, train=True, pad_crop=pad_crop, hflip=hflip,
                                  randaug=cfg.randaug, **common)
        val = build_dali_loader(val_samples, batch_size=ebs, train=False, **common)
    else:
        common = dict(workers=cfg.workers, seed=seed, rank=rank, world_size=world_size, pin_memory=device.type == "cuda")
        ttf = train_transform(inputs, pad_crop=pad_crop, hflip=hflip, randaug=cfg.randaug, reprob=cfg.reprob,
                              remode=cfg.remode)
        train = DeviceLoader(build_torch_loader(train_samples, ttf, batch_size=batch_size, train=True,
                                                repeats=cfg.aug_repeats, **common), device)
        val = DeviceLoader(build_torch_loader(val_samples, eval_transform(inputs), batch_size=ebs, train=False, **common),
                           device)
    return DataBundle(train=train, val=val, classes=scan.classes, name=source.name, train_files=train_samples,
                      val_files=val_samples, skipped=skipped, empty_classes=scan.empty_classes)
