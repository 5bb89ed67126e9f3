"""The NVIDIA DALI input backend: decoding on the GPU ("mixed") with CUDA, on the CPU otherwise.

The reader takes an explicit file list (the scan's, after subsets and skipped files), so both
backends see the same images. Train: pad-and-crop (small inputs) or random-resized-crop, flip,
crop-mirror-normalize (fp16 under --amp on CUDA); eval: resize the short side to size / crop_pct,
centre crop, every image of the shard exactly once (a partial last batch, no padding samples).
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

from ..errors import DataError, RunError
from .augment import RandAugmentSpec, pad_size
from .torch_loader import shard_bounds

if TYPE_CHECKING:
    from . import InputSpec

__all__ = ["build_dali_loader", "DaliLoader"]


def _randaug(spec: str) -> RandAugmentSpec:
    """The RandAugment string as DALI can honour it (refused rather than silently changed)."""
    ra = RandAugmentSpec.parse(spec)
    ra.check_dali()
    return ra


def _pipeline(files, labels, *, train, inputs, gpu, pad_crop, hflip, fp16, seed, rank, world_size, batch_size,
              threads, device_id, randaug):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=bool(randaug))
    def pipe():
        jpegs, lab = fn.readers.file(files=files, labels=labels, shuffle_after_epoch=train, shard_id=rank,
                                     num_shards=world_size, pad_last_batch=not train, name="Reader", seed=seed)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        size, mean, std = inputs.size, inputs.mean, inputs.std
        dtype = types.FLOAT16 if fp16 else types.FLOAT
        norm = dict(mean=[255 * m for m in mean], std=[255 * s for s in std], dtype=dtype, output_layout="CHW")
        if train:
            if pad_crop:
                pad = pad_size(size)
                images = fn.resize(images, size=(size, size))
                images = fn.crop(images, crop=(size + 2 * pad, size + 2 * pad), out_of_bounds_policy="pad", fill_values=0)
                images = fn.crop(images, crop=(size, size), crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                                 crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))
            else:
                images = fn.random_resized_crop(images, size=(size, size), interp_type=types.INTERP_CUBIC)
            if randaug:
                from nvidia.dali.auto_aug import rand_augment

                # timm's magnitude m of mmax is DALI's bin m of mmax + 1 bins (same share of the full range)
                images = rand_augment.rand_augment(images, n=randaug.n, m=randaug.m, num_magnitude_bins=randaug.mmax + 1)
            mirror = fn.random.coin_flip(probability=hflip) if hflip > 0 else 0
            images = fn.crop_mirror_normalize(images, mirror=mirror, **norm)
        else:
            images = fn.resize(images, resize_shorter=int(math.floor(size / inputs.crop_pct)), interp_type=types.INTERP_CUBIC)
            images = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, **norm)
        return images, lab

    return pipe(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed + rank,
                prefetch_queue_depth=2)


class DaliLoader:
    """Iterates (images, labels) on the training device; len() is the number of batches per epoch."""

    def __init__(self, pipe, train: bool, batch_size: int, shard_size: int, device: torch.device,
                 files: list[str] | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe.build()
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self.it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
                                      auto_reset=True)
        self.device, self.files = device, files or []
        self.num_batches = shard_size // batch_size if train else math.ceil(shard_size / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        nb = self.device.type == "cuda"
        try:
            for batch in self.it:
                x, y = batch[0]["images"], batch[0]["labels"]
                yield x.to(self.device, non_blocking=nb), y.view(-1).long().to(self.device, non_blocking=nb)
        except RuntimeError as e:  # DALI cannot skip a file: name the one that went away, if one did
            gone = next((f for f in self.files if not os.path.isfile(f)), None)
            if gone is None:
                raise
            raise RunError(f"DALI could not read '{gone}': it vanished or changed after the scan (DALI cannot skip "
                           "files; restore it, or use the torchvision loader, which skips and counts them)") from e

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # the reader reshuffles itself after every epoch
        if start:
            raise RunError("DALI cannot restart mid-epoch; resume this run from an epoch-end checkpoint (or use "
                           "the torchvision loader, without --dali)")


def build_dali_loader(samples: list[tuple[str, int]], *, batch_size: int, train: bool, inputs: InputSpec,
                      device: torch.device, workers: int, seed: int, rank: int = 0, world_size: int = 1,
                      fp16: bool = False, pad_crop: bool = False, hflip: float = 0.5,
                      randaug: str | None = None) -> DaliLoader:
    """A DALI loader over exactly these (path, label) samples."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise DataError("--dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the README's install command)") from e
    gpu = device.type == "cuda"
    files = [p for p, _ in samples]
    labels = [c for _, c in samples]
    ra = _randaug(randaug) if randaug and train else None
    pipe = _pipeline(files, labels, train=train, inputs=inputs, gpu=gpu, pad_crop=pad_crop, hflip=hflip, fp16=fp16,
                     seed=seed, rank=rank, world_size=world_size,
                     batch_size=batch_size, threads=max(1, workers),
                     device_id=(device.index or 0) if gpu else None, randaug=ra)
    lo, hi = shard_bounds(len(samples), rank, world_size)
    return DaliLoader(pipe, train, batch_size, hi - lo, device, files)
