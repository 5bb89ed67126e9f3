"""The resident input path: small data sets decoded once, held in memory on the training device, augmented there.

Decoding JPEGs every epoch is what limits small-image training (CIFAR-10 on a GPU: stage 2, with no teacher,
only 1.3x stage 1). Here every image is decoded once with the torchvision path's own geometric PIL steps
(train: resize to size x size; eval: the short-side resize and centre crop) into a uint8 [N, 3, S, S] tensor,
cached on disk under a key of the file list (paths, sizes, mtimes) and those steps (written atomically, shared
by every run of a study), then moved to the training device once. A batch is gathered from it by index and
augmented with batched tensor ops on the device: pad-and-crop by per-sample offsets (zero padding, or reflection
for the fast teacher recipe), flip (at random, or alternating per image each epoch), ToTensor's /255 and
Normalize, in the same order as torchvision (with augmentation off, the same pixels).

The training order is the torchvision loader's EpochSampler: the permutation of (seed, epoch), cut to whole
global batches, rank r of W taking every W-th index; so samples, labels and order match it, exact resume
mid-epoch and torchrun sharding work alike. Augmentation draws come from a generator of (seed, epoch, batch).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import DataError
from .augment import pad_size
from .folder import cache_root, load_rgb
from .torch_loader import EpochSampler, shard_bounds

__all__ = ["ResidentLoader", "build_resident_loader", "resident_pixels", "decoded_bytes", "random_erase"]


def decoded_bytes(n: int, size: int) -> int:
    """Bytes of n decoded RGB images of side size (uint8)."""
    return n * 3 * size * size


def _geometry(train: bool, size: int, crop_pct: float):
    """The torchvision path's PIL steps before ToTensor (augmentation aside)."""
    from torchvision import transforms as T

    if train:
        return T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)
    return T.Compose([T.Resize(int(math.floor(size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size)])


def _key(samples: list[tuple[str, int]], train: bool, size: int, crop_pct: float) -> str:
    """A key of the file list (path, label, size, mtime) and the geometry: a changed source gets a new cache."""
    h = hashlib.sha256(json.dumps(["v1", train, size, crop_pct]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def resident_pixels(samples: list[tuple[str, int]], *, train: bool, size: int, crop_pct: float = 1.0,
                    progress: bool = True, desc: str = "decode") -> tuple[Tensor, Tensor, list[str]]:
    """(uint8 images [N,3,S,S], int64 labels [N], paths that no longer decode) for samples, from the on-disk cache
    (built on first use, atomically: a temporary file renamed into place)."""
    folder = os.path.join(cache_root(), "resident")
    path = os.path.join(folder, f"{_key(samples, train, size, crop_pct)}.pt")
    if os.path.isfile(path):
        try:
            blob = torch.load(path, weights_only=True)
            return blob["images"], blob["labels"], list(blob["missing"])
        except (OSError, RuntimeError, KeyError, EOFError):
            pass  # a cache from elsewhere that does not read: build it again
    geometry = _geometry(train, size, crop_pct)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    keep, missing = [], []
    for i, (p, _) in enumerate(tqdm(samples, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)):
        try:
            img = geometry(load_rgb(p))
        except OSError:  # vanished or broken since the scan: skipped and counted, as the other loaders do
            missing.append(p)
            continue
        images[len(keep)] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        keep.append(i)
    images = images[: len(keep)].clone()
    labels = torch.tensor([samples[i][1] for i in keep], dtype=torch.int64)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"images": images, "labels": labels, "missing": missing}, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache folder: run from memory, say so once
        print(f"resident loader: cannot write the decoded cache {path} ({e.strerror}); decoding again next run")
    return images, labels, missing


class ResidentLoader:
    """Batches of (images float32 [B,3,S,S] normalised, labels) from a resident uint8 tensor on `device`.

    train: EpochSampler's order (whole batches, this rank's share), pad-and-crop and flip per sample;
    eval: this rank's contiguous shard, in order, no augmentation. `reflect`: pad by reflection instead of zeros;
    `alternate_flip`: image i is flipped in epoch e when (its seeded coin) xor (e odd), so every image is seen both
    ways in each pair of epochs (then hflip is unused)."""

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, train: bool, mean, std, seed: int = 0,
                 pad: int = 0, hflip: float = 0.0, rank: int = 0, world_size: int = 1, device="cpu",
                 missing: list[str] | None = None, reprob: float = 0.0, remode: str = "pixel", repeats: int = 1):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.seed, self.pad, self.hflip = batch_size, train, seed, pad, hflip
        self.reprob, self.remode = reprob, remode
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.missing: set[str] = set(missing or ())
        n = images.shape[0]
        self.sampler = EpochSampler(n, batch_size, seed, rank, world_size, repeats) if train else None
        self.shard = shard_bounds(n, rank, world_size)
        self.reflect, self.alternate_flip = False, False

    def with_augmentation(self, *, pad: int, reflect: bool, alternate_flip: bool) -> ResidentLoader:
        """The same images, order and sharding with other pad-and-crop and flip settings (a separate sampler)."""
        new = copy.copy(self)
        new.sampler = copy.copy(self.sampler)
        new.pad, new.reflect, new.alternate_flip = pad, reflect, alternate_flip
        if alternate_flip:
            coin = torch.rand(self.images.shape[0], generator=torch.Generator().manual_seed(self.seed)) < 0.5
            new.flip_coin = coin.to(self.device)
        return new

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        if self.train:
            return len(self.sampler) // self.batch_size
        lo, hi = self.shard
        return -(-(hi - lo) // self.batch_size)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.float().div(255) - self.mean) / self.std  # ToTensor, then Normalize

    def _augment(self, x: Tensor, g: torch.Generator, idx: Tensor) -> Tensor:
        """Pad by self.pad (zeros, or reflection) and crop back at per-sample offsets, then flip: with probability
        hflip, or alternating."""
        B, _, S, _ = x.shape
        if self.pad and self.reflect:  # a shifted window whose indices reflect at the borders: no padded copy
            p = self.pad
            ar = torch.arange(S, device=self.device)
            dy = torch.randint(-p, p + 1, (B,), generator=g).to(self.device)
            dx = torch.randint(-p, p + 1, (B,), generator=g).to(self.device)
            rows, cols = (_reflect(d[:, None] + ar[None, :], S) for d in (dy, dx))
            x = x.gather(2, rows[:, None, :, None].expand(B, 3, S, S))
            x = x.gather(3, cols[:, None, None, :].expand(B, 3, S, S))
        elif self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (B,), generator=g).to(self.device)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=g).to(self.device)
            ar = torch.arange(S, device=self.device)
            rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(B, 3, S, S + 2 * p)
            x = padded.gather(2, rows)
            cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(B, 3, S, S)
            x = x.gather(3, cols)
        if self.alternate_flip:
            flip = self.flip_coin.index_select(0, idx) ^ bool(self.sampler.epoch % 2)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        elif self.hflip > 0:
            flip = (torch.rand((B,), generator=g) < self.hflip).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def __iter__(self):
        if not self.train:
            lo, hi = self.shard
            for a in range(lo, hi, self.batch_size):
                b = min(hi, a + self.batch_size)
                yield self._normalise(self.images[a:b]), self.labels[a:b]
            return
        s = self.sampler
        order = torch.tensor([i for i, _ in s], dtype=torch.int64)
        for k in range(len(order) // self.batch_size):
            batch = s.start + k  # the batch's index within the epoch: its draws do not depend on where a run resumed
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + s.epoch) * 1_000_003 + batch)
            idx = order[k * self.batch_size:(k + 1) * self.batch_size].to(self.device)
            x = self._normalise(self._augment(self.images.index_select(0, idx), g, idx))
            if self.reprob > 0:
                x = random_erase(x, self.reprob, self.remode, g)
            yield x, self.labels.index_select(0, idx)


def _reflect(i: Tensor, n: int) -> Tensor:
    """Indices i (within one n of [0, n)) reflected into [0, n) without repeating the edge (F.pad 'reflect')."""
    i = i.abs()
    return (n - 1) - (n - 1 - i).abs()


def random_erase(x: Tensor, p: float, mode: str, g: torch.Generator, attempts: int = 10) -> Tensor:
    """timm's RandomErasing on a normalised batch, per image: with probability p, one rectangle of area 2-33 %
    and aspect 0.3-3.3 (the first of `attempts` draws that fits) filled with zeros ('const'), one normal draw
    per channel ('rand') or per pixel ('pixel')."""
    B, C, H, W = x.shape
    area = torch.empty(B, attempts).uniform_(0.02, 1 / 3, generator=g) * (H * W)
    aspect = torch.empty(B, attempts).uniform_(math.log(0.3), math.log(1 / 0.3), generator=g).exp()
    h, w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (h < H) & (w < W) & (h > 0) & (w > 0)
    pick = fits.long().argmax(1)
    ar = torch.arange(B)
    h, w = h[ar, pick], w[ar, pick]
    erase = fits.any(1) & (torch.rand(B, generator=g) < p)
    top = (torch.rand(B, generator=g) * (H - h + 1)).long()
    left = (torch.rand(B, generator=g) * (W - w + 1)).long()
    rows, cols = torch.arange(H), torch.arange(W)
    inside = (erase[:, None, None] & ((rows[None] >= top[:, None]) & (rows[None] < (top + h)[:, None]))[:, :, None]
              & ((cols[None] >= left[:, None]) & (cols[None] < (left + w)[:, None]))[:, None, :])
    shape = {"const": (1, 1, 1, 1), "rand": (B, C, 1, 1), "pixel": (B, C, H, W)}[mode]
    fill = torch.zeros(shape) if mode == "const" else torch.randn(shape, generator=g)
    return torch.where(inside[:, None].to(x.device), fill.to(x.device, x.dtype), x)


def build_resident_loader(samples, *, inputs, batch_size: int, train: bool, seed: int, pad_crop: bool, hflip: float,
                          max_bytes: int, rank: int = 0, world_size: int = 1, device="cpu", progress: bool = True,
                          reprob: float = 0.0, remode: str = "pixel", repeats: int = 1):
    """A ResidentLoader over samples, or DataError when their decoded pixels exceed max_bytes."""
    need = decoded_bytes(len(samples), inputs.size)
    if need > max_bytes:
        raise DataError(f"the resident loader would hold {need / 2**30:.2f} GiB of decoded pixels, over --resident-max-gb "
                        f"{max_bytes / 2**30:g}; raise it, or use --loader torch")
    images, labels, missing = resident_pixels(samples, train=train, size=inputs.size, crop_pct=inputs.crop_pct,
                                              progress=progress, desc="decode train" if train else "decode val")
    return ResidentLoader(images, labels, batch_size=batch_size, train=train, mean=inputs.mean, std=inputs.std, seed=seed,
                          pad=pad_size(inputs.size) if (train and pad_crop) else 0, hflip=hflip if train else 0.0,
                          rank=rank, world_size=world_size, device=device, missing=missing,
                          reprob=reprob if train else 0.0, remode=remode, repeats=repeats if train else 1)
