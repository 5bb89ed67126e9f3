"""The torchvision input backend: PIL decode + torchvision transforms in DataLoader workers."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T

from .augment import RandAugmentSpec, pad_size
from .folder import load_rgb

if TYPE_CHECKING:
    from . import InputSpec

__all__ = ["ImageListDataset", "train_transform", "eval_transform", "build_torch_loader", "ShardSampler", "shard_bounds"]


class ImageListDataset(Dataset):
    """(path, label) samples decoded to 8-bit RGB (load_rgb). A file that can no longer be read (deleted
    or changed since the scan) gives (None, path) instead of an image: collate_present drops it."""

    def __init__(self, samples: list[tuple[str, int]], transform=None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = load_rgb(path)
        except OSError:  # vanished, truncated or replaced since the scan: skipped and counted
            return None, path
        return (self.transform(img) if self.transform else img), label


def collate_present(batch: list) -> tuple:
    """(images, labels, paths that could not be read) of the readable samples; (None, None, paths) if none."""
    kept = [b for b in batch if b[0] is not None]
    missing = [b[1] for b in batch if b[0] is None]
    if not kept:
        return None, None, missing
    x, y = default_collate(kept)
    return x, y, missing


def train_transform(inputs: InputSpec, *, pad_crop: bool, hflip: float, randaug: str | None = None):
    """Random-resized-crop (or, for small inputs, resize to size x size then pad-and-crop, as DALI does),
    flip, optional RandAugment, normalise."""
    size = inputs.size
    if pad_crop:
        ops = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR), T.RandomCrop(size, padding=pad_size(size))]
    else:
        ops = [T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if randaug:
        from timm.data.auto_augment import rand_augment_transform

        RandAugmentSpec.parse(randaug)  # one reading of the string for both backends (DataError if unreadable)
        ops.append(rand_augment_transform(randaug, {"img_mean": tuple(round(255 * m) for m in inputs.mean)}))
    ops += [T.ToTensor(), T.Normalize(inputs.mean, inputs.std)]
    return T.Compose(ops)


def eval_transform(inputs: InputSpec):
    """Resize the short side to size / crop_pct, centre-crop size, normalise."""
    return T.Compose([
        T.Resize(int(math.floor(inputs.size / inputs.crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(inputs.size), T.ToTensor(), T.Normalize(inputs.mean, inputs.std),
    ])


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Shard `rank` of `world_size` holds indices [rank*n//W, (rank+1)*n//W) (DALI's reader shards so too)."""
    return rank * n // world_size, (rank + 1) * n // world_size


class ShardSampler(Sampler[int]):
    """Contiguous shard `rank` of `world_size` over the indices, each index in exactly one shard."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(*shard_bounds(n, rank, world_size)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_torch_loader(samples, transform, *, batch_size: int, train: bool, workers: int, seed: int,
                       rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Train: shuffled (seeded), drop_last; eval: every sample of this shard exactly once, in order.
    Batches are (images, labels, unreadable paths) (collate_present)."""
    ds = ImageListDataset(samples, transform)
    g = torch.Generator().manual_seed(seed)
    if train:
        sampler = None
        if world_size > 1:
            sampler = torch.utils.data.DistributedSampler(ds, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(ds) >= batch_size,
                          num_workers=workers, pin_memory=pin_memory, generator=g, persistent_workers=workers > 0,
                          collate_fn=collate_present)
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size), drop_last=False,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0, collate_fn=collate_present)
