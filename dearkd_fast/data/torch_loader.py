"""The torchvision input backend: PIL decode + torchvision transforms in DataLoader workers."""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T

from .augment import RandAugmentSpec, pad_size
from .folder import load_rgb

if TYPE_CHECKING:
    from . import InputSpec

__all__ = ["ImageListDataset", "train_transform", "eval_transform", "build_torch_loader", "ShardSampler", "shard_bounds",
           "EpochSampler"]


class ImageListDataset(Dataset):
    """(path, label) samples decoded to 8-bit RGB (load_rgb). A file that can no longer be read (deleted
    or changed since the scan) gives (None, path) instead of an image: collate_present drops it. An index
    given as (i, seed) (EpochSampler) runs the transform under that seed (Python, NumPy and torch
    generators, restored afterwards): a sample's augmentation depends on (run seed, epoch, index) only,
    not on workers or on where a run was resumed."""

    def __init__(self, samples: list[tuple[str, int]], transform=None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            img = load_rgb(path)
        except OSError:  # vanished, truncated or replaced since the scan: skipped and counted
            return None, path
        if self.transform is None:
            return img, label
        if seed is None:
            return self.transform(img), label
        return _seeded(self.transform, img, seed), label


def _seeded(fn, x, seed: int):
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        return fn(x)
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class EpochSampler(Sampler):
    """The training order: a permutation drawn from (seed, epoch) alone, cut to whole global batches,
    rank r of W taking every W-th index (each image once per epoch across ranks), yielded as
    (index, per-sample seed) from batch `start` on. With `repeats` R > 1 (DeiT's repeated augmentation) each
    index of the permutation stands R times in a row before the ranks take every W-th, and an epoch keeps its
    length: about n / R distinct images, each R times with its own augmentation, its copies on different ranks.
    set_epoch(epoch, start) positions it, so a run resumed mid-epoch sees exactly the batches an uninterrupted
    run would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, repeats: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.repeats = repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return (self.n // (self.batch_size * self.world_size)) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        # each index R times in a row (R = 1: the permutation itself), dealt round the ranks, the epoch as long;
        # copy k of index i is seeded base + i + k * n (k = 0: every run without repeats keeps its seeds)
        copies = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats)
        seeds = base + copies + self.n * (torch.arange(copies.numel()) % self.repeats)
        take = slice(self.rank, None, self.world_size)
        order, seeds = copies[take][: self.per_rank()], seeds[take][: self.per_rank()]
        skip = self.start * self.batch_size
        yield from zip(order[skip:].tolist(), seeds[skip:].tolist())

    def __len__(self) -> int:
        return self.per_rank() - self.start * self.batch_size


def collate_present(batch: list) -> tuple:
    """(images, labels, paths that could not be read) of the readable samples; (None, None, paths) if none."""
    kept = [b for b in batch if b[0] is not None]
    missing = [b[1] for b in batch if b[0] is None]
    if not kept:
        return None, None, missing
    x, y = default_collate(kept)
    return x, y, missing


def train_transform(inputs: InputSpec, *, pad_crop: bool, hflip: float, randaug: str | None = None,
                    reprob: float = 0.0, remode: str = "pixel"):
    """Random-resized-crop (or, for small inputs, resize to size x size then pad-and-crop, as DALI does),
    flip, optional RandAugment, normalise, optional random erasing (timm's RandomErasing, after Normalize)."""
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
    if reprob > 0:
        from timm.data.random_erasing import RandomErasing

        ops.append(RandomErasing(reprob, mode=remode, device="cpu"))
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
                       rank: int = 0, world_size: int = 1, pin_memory: bool = False, repeats: int = 1) -> DataLoader:
    """Train: EpochSampler (shuffled by seed and epoch, whole batches); eval: every sample of this shard
    exactly once, in order.
    Batches are (images, labels, unreadable paths) (collate_present)."""
    ds = ImageListDataset(samples, transform)
    g = torch.Generator().manual_seed(seed)
    if train:
        sampler = EpochSampler(len(ds), batch_size, seed, rank, world_size, repeats)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                          pin_memory=pin_memory, generator=g, persistent_workers=workers > 0, collate_fn=collate_present)
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world_size), drop_last=False,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0, collate_fn=collate_present)
