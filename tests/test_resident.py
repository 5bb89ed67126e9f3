"""The resident input path against the torchvision loader: samples, order, pixels, resume, shards, limits, cache."""
import os
import subprocess
import sys

import pytest
import torch
from torchvision import transforms as T

from dearkd_fast.config import IMAGENET_MEAN as MEAN
from dearkd_fast.config import IMAGENET_STD as STD
from dearkd_fast.data.folder import DataError, scan_image_folder
from dearkd_fast.data.resident import ResidentLoader, resident_pixels
from dearkd_fast.data.torch_loader import build_torch_loader
from dearkd_fast.testing import folder_data
from tests.test_data import decode_ids, id_folder


def centre_ids(x):
    """decode_ids on the centre of each image (pad-and-crop moves the border, never the centre)."""
    return decode_ids(x[:, :, 12:20, 12:20])


def _random_folder(root, n_per_class=(7, 6, 5), side=(40, 36)):
    """PNGs of random pixels (lossless), so that pixel equality means something."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in enumerate(n_per_class):
        os.makedirs(root / f"c{c}", exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return scan_image_folder(str(root), progress=False).samples


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y, *_ in loader]


def test_same_samples_order_and_pixels_as_torchvision_with_augmentation_off(tmp_path):
    samples = _random_folder(tmp_path / "d")
    tv = build_torch_loader(samples, T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize(MEAN, STD)]),
                            batch_size=4, train=True, workers=0, seed=3)
    images, labels, missing = resident_pixels(samples, train=True, size=32, progress=False)
    res = ResidentLoader(images, labels, batch_size=4, train=True, mean=MEAN, std=STD, seed=3)
    assert not missing and len(res) == len(tv) == 18 // 4
    for epoch in (0, 1):
        tv.sampler.set_epoch(epoch)
        res.set_epoch(epoch)
        got, want = _batches(res), _batches(tv)
        assert len(got) == len(want)
        for (x, y), (xt, yt) in zip(got, want):
            assert torch.equal(y, yt) and torch.equal(x, xt)  # the same images, labels, order and pixels


def test_pad_crop_and_flip_are_crops_of_the_padded_image(tmp_path):
    samples = _random_folder(tmp_path / "d", (4, 4))
    images, labels, _ = resident_pixels(samples, train=True, size=16, progress=False)
    res = ResidentLoader(images, labels, batch_size=8, train=True, mean=MEAN, std=STD, seed=0, pad=2, hflip=0.5)
    plain = ResidentLoader(images, labels, batch_size=8, train=True, mean=MEAN, std=STD, seed=0)
    (x, y), = _batches(res)
    (x0, _), = _batches(plain)
    padded = torch.nn.functional.pad(x0, (2, 2, 2, 2), value=0.0)
    zero = ((torch.zeros(1, 3, 1, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    padded = torch.where(padded == 0, zero.expand_as(padded), padded)  # zero pixels, normalised
    shifted = flipped = 0
    for i in range(8):
        cands = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(x[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 16, dx:dx + 16]))]
        assert cands, i  # every augmented image is one crop of its padded original, flipped or not
        shifted += all(c[:2] != (2, 2) for c in cands)
        flipped += all(c[2] for c in cands)
    assert shifted > 0 and flipped > 0


def test_resumes_mid_epoch_bit_identically(tmp_path):
    samples = _random_folder(tmp_path / "d")
    images, labels, _ = resident_pixels(samples, train=True, size=16, progress=False)
    make = lambda: ResidentLoader(images, labels, batch_size=3, train=True, mean=MEAN, std=STD, seed=5, pad=2, hflip=0.5)
    full = make()
    full.set_epoch(2)
    whole = _batches(full)
    later = make()
    later.set_epoch(2, start=2)
    rest = _batches(later)
    assert len(rest) == len(whole) - 2
    for (a, b), (c, d) in zip(rest, whole[2:]):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_shards_by_rank_like_the_torchvision_sampler(tmp_path):
    root, ids = id_folder(tmp_path / "d", (6, 6, 6))
    seen = []
    for rank in range(2):
        data = folder_data(root, "resident", val_source=root, batch_size=2, rank=rank, world_size=2, hflip=0.0)
        tv = folder_data(root, "torch", val_source=root, batch_size=2, rank=rank, world_size=2, hflip=0.0, workers=0)
        data.train.set_epoch(1)
        tv.train.set_epoch(1)
        got = [centre_ids(x) for x, _ in data.train]
        assert got == [centre_ids(x) for x, _ in tv.train]  # the same ids per batch (pixels: augmentation aside)
        seen += sum(got, [])
        assert sorted(decode_ids(x)[0] for x, _ in data.val) == sorted(decode_ids(x)[0] for x, _ in tv.val)
    assert len(seen) == len(set(seen)) == 16  # 18 images, whole global batches of 4: 16, each once


def test_refuses_a_set_over_its_size_limit(tmp_path):
    root, _ = id_folder(tmp_path / "d")
    with pytest.raises(DataError, match="resident-max-gb"):
        folder_data(root, "resident", val_source=root, resident_max_gb=1e-6)
    run = subprocess.run([sys.executable, "-m", "dearkd_fast.train", "--data", "digits", "--loader", "resident",
                          "--resident-max-gb", "0.000001", "--epochs", "1", "--no-progress", "--output",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "resident-max-gb" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_rebuilds_a_cache_whose_source_changed(tmp_path):
    from PIL import Image

    samples = _random_folder(tmp_path / "d", (3,))
    first, _, _ = resident_pixels(samples, train=True, size=8, progress=False)
    again, _, _ = resident_pixels(samples, train=True, size=8, progress=False)
    assert torch.equal(first, again)
    cache = os.path.join(os.environ["XDG_CACHE_HOME"], "dearkd_fast", "resident")
    assert len(os.listdir(cache)) >= 1 and not [f for f in os.listdir(cache) if ".tmp-" in f]
    Image.new("RGB", (40, 36), (1, 2, 3)).save(samples[0][0])  # the source changes
    changed, _, _ = resident_pixels(samples, train=True, size=8, progress=False)
    assert torch.equal(changed[0], torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    assert torch.equal(changed[1:], first[1:])


def test_builtin_sets_default_to_the_resident_loader():
    from dearkd_fast.data.resident import ResidentLoader as R

    data = folder_data("digits", "auto", batch_size=8)
    assert isinstance(data.train, R) and isinstance(data.val, R)
    assert not isinstance(folder_data("digits", "torch", batch_size=8).train, R)


def test_repeated_augmentation_covers_each_drawn_sample_r_times_across_two_ranks():
    """--aug-repeats 3 (DeiT's): over two ranks, an epoch as long as without it, made of whole groups of 3 copies of
    n/3 distinct samples, copies on both ranks and each with its own augmentation seed; the torchvision and the
    resident loaders take the same order."""
    from collections import Counter

    from dearkd_fast.data.torch_loader import EpochSampler

    n, bs, R = 48, 4, 3
    plain = [list(EpochSampler(n, bs, seed=1, rank=r, world_size=2)) for r in range(2)]
    ranks = [list(EpochSampler(n, bs, seed=1, rank=r, world_size=2, repeats=R)) for r in range(2)]
    assert [len(x) for x in ranks] == [len(x) for x in plain] == [24, 24]
    counts = Counter(i for r in ranks for i, _ in r)
    assert set(counts.values()) == {R} and len(counts) == 2 * 24 // R
    assert {i for i, _ in ranks[0]} & {i for i, _ in ranks[1]}  # copies land on both ranks
    seeds = [s for r in ranks for _, s in r]
    assert len(set(seeds)) == len(seeds)  # every copy its own augmentation
    images, labels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(), torch.arange(n)
    for r in range(2):
        res = ResidentLoader(images, labels, batch_size=bs, train=True, mean=(0,) * 3, std=(1,) * 3, seed=1, rank=r,
                             world_size=2, repeats=R)
        assert [i for _, y in res for i in y.tolist()] == [i for i, _ in ranks[r]]


def test_random_erasing_on_the_resident_batch(tmp_path):
    """--reprob: about that share of images get one rectangle of 2-33 % of the area replaced (zeros for 'const',
    noise for 'pixel'), the rest untouched; draws from the batch's generator (the same batch, the same erasing)."""
    from dearkd_fast.data.resident import random_erase

    x = torch.ones(400, 3, 32, 32)
    out = random_erase(x, 0.5, "const", torch.Generator().manual_seed(0))
    changed = (out != x).any(1)  # [B, H, W]
    erased = changed.flatten(1).any(1)
    assert 0.4 < erased.float().mean() < 0.6
    share = changed[erased].flatten(1).float().mean(1)
    assert share.min() >= 0.015 and share.max() <= 0.36  # 2-33 %, sides rounded to whole pixels
    rows, cols = changed[erased].any(2), changed[erased].any(1)  # a rectangle: its area is its rows x its columns
    assert torch.equal(changed[erased].flatten(1).sum(1), rows.sum(1) * cols.sum(1))
    assert torch.equal(out, random_erase(x, 0.5, "const", torch.Generator().manual_seed(0)))
    noisy = random_erase(x, 1.0, "pixel", torch.Generator().manual_seed(1))
    assert (noisy != x).any(1).flatten(1).any(1).all() and noisy[noisy != 1].std() > 0.5
    _random_folder(tmp_path / "d")
    root = str(tmp_path / "d")
    for loader in ("resident", "torch"):
        data = folder_data(root, loader, val_source=root, batch_size=4, workers=0, reprob=1.0, remode="const")
        x, _ = next(iter(data.train))
        assert ((x == 0).all(1).flatten(1).any(1)).all(), loader  # every image has an erased (zero) patch


def test_reflected_translation_and_alternating_flips(tmp_path):
    """The fast teacher recipe's augmentation: each image is a crop of its reflect-padded original (F.pad's
    'reflect'), and with alternating flips every image is flipped in exactly one of two consecutive epochs."""
    samples = _random_folder(tmp_path / "d", (4, 4))
    images, labels, _ = resident_pixels(samples, train=True, size=16, progress=False)
    plain = ResidentLoader(images, labels, batch_size=8, train=True, mean=MEAN, std=STD, seed=0)
    res = plain.with_augmentation(pad=2, reflect=True, alternate_flip=True)
    seen = {}
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        res.set_epoch(epoch)
        (x, y), = _batches(res)
        (x0, y0), = _batches(plain)
        padded = torch.nn.functional.pad(x0, (2, 2, 2, 2), mode="reflect")
        order = [int(i) for i, _ in res.sampler]
        for i in range(8):
            cands = {(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                     if torch.equal(x[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 16, dx:dx + 16]))}
            assert cands, (epoch, i)  # one crop of the reflect-padded original, flipped or not
            flips = {f for _, _, f in cands}
            if len(flips) == 1:  # a symmetric crop could read both ways
                seen.setdefault(order[i], []).append(flips.pop())
    assert len(plain.sampler) == len(res.sampler) and torch.equal(y, y0)
    both = [v for v in seen.values() if len(v) == 2]
    assert len(both) >= 6 and all(v[0] != v[1] for v in both)  # flipped in exactly one epoch of the two
    assert any(v[0] for v in both) and any(not v[0] for v in both)
