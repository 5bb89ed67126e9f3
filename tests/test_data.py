"""Input pipeline: both backends behind one interface, scanning, subsets, bad files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dearkd_fast.config import IMAGENET_MEAN as MEAN
from dearkd_fast.config import IMAGENET_STD as STD
from dearkd_fast.data import folder as folder_mod
from dearkd_fast.data.folder import DataError, balanced_subset, scan_image_folder
from dearkd_fast.testing import folder_data, write_image_folder
from dearkd_fast.train import main

BACKENDS = ["torch", "dali"]


def id_folder(root, per_class=(4, 5, 3)):
    """Solid-grey PNGs (lossless) whose grey level encodes a unique image id: 8 * id + 4."""
    ids = {}
    k = 0
    for c, n in enumerate(per_class):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(n):
            Image.new("RGB", (40, 36), (8 * k + 4,) * 3).save(os.path.join(root, f"class{c}", f"{i}.png"))
            ids[k] = c
            k += 1
    return str(root), ids


def decode_ids(x):
    """Recover image ids from normalised solid images."""
    x = x.float()
    grey = (x[:, 0] * STD[0] + MEAN[0]) * 255  # [B,H,W]
    return [int(round((float(g.mean()) - 4) / 8)) for g in grey]


def load(root, backend, val_source="same", **kw):
    """Both loaders of `root` (validating on root itself unless val_source is given)."""
    return folder_data(root, backend, val_source=root if val_source == "same" else val_source, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_covers_every_image_once(tmp_path, backend, world_size):
    root, ids = id_folder(tmp_path / "d")
    seen = []
    for rank in range(world_size):
        data = load(root, backend, eval_batch_size=5, rank=rank, world_size=world_size)
        n = 0
        for x, y in data.val:
            got = decode_ids(x)
            assert [ids[i] for i in got] == y.tolist()  # labels match the class folders
            seen += got
            n += len(got)
        assert len(data.val) == -(-n // 5)  # the loader's len is its real number of batches
    assert sorted(seen) == sorted(ids)  # every image exactly once across the shards


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_shapes_dtypes_ranges(tmp_path, backend):
    root = write_image_folder(tmp_path / "d", {"a": 6, "b": 6}, size=(45, 37))
    data = load(root, backend, pad_crop=False, hflip=0.5)
    assert data.classes == ["a", "b"] and data.num_train == 12
    batches = list(data.train)
    assert len(batches) == len(data.train) == 3
    lo = min((0 - m) / s for m, s in zip(MEAN, STD))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD))
    for x, y in batches:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
        assert lo - 0.05 <= x.min() and x.max() <= hi + 0.05
        assert x.std() > 0.1  # real pixel data, not a constant


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_crop_train_path(tmp_path, backend):
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    data = load(root, backend, pad_crop=True)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32)


def test_subsets_balanced_identical_and_stable(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 10, "b": 20, "c": 5})
    lists = {b: load(root, b, fraction=0.4, val_source=None, seed=3).train_files for b in BACKENDS}
    assert lists["torch"] == lists["dali"]
    again = load(root, "torch", fraction=0.4, val_source=None, seed=3).train_files
    assert again == lists["torch"]
    other = load(root, "torch", fraction=0.4, val_source=None, seed=4).train_files
    assert other != again
    samples = scan_image_folder(root).samples
    sub = balanced_subset(samples, 0.4, 0)
    counts = np.bincount([c for _, c in sub])
    assert counts.tolist() == [4, 8, 2]


def test_scan_manifest_skips_rechecking(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    scan_image_folder(root)
    calls = []
    real = folder_mod._decodes
    monkeypatch.setattr(folder_mod, "_decodes", lambda p: calls.append(p) or real(p))
    scan_image_folder(root)
    assert calls == []
    with Image.open(os.path.join(root, "a", "000.jpg")) as im:  # a changed file is checked again
        im.rotate(90).save(os.path.join(root, "a", "000.jpg"))
    scan_image_folder(root)
    assert calls == [os.path.join(root, "a", "000.jpg")]


def mixed_folder(root):
    """A truncated JPEG, a PNG, a grayscale JPEG and a CMYK JPEG among good images."""
    root = write_image_folder(root, {"a": 4, "b": 4})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(os.path.join(root, "a", "png.png"))
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(os.path.join(root, "b", "gray.jpg"))
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="CMYK").save(os.path.join(root, "b", "cmyk.jpg"))
    good = open(os.path.join(root, "a", "001.jpg"), "rb").read()
    with open(os.path.join(root, "a", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    return root


def test_scan_reports_bad_file(tmp_path):
    scan = scan_image_folder(mixed_folder(tmp_path / "d"))
    assert [os.path.basename(p) for p in scan.skipped] == ["truncated.jpg"]
    assert len(scan.samples) == 11


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_runs_through_bad_files(tmp_path, backend):
    root = mixed_folder(tmp_path / "d")
    out = tmp_path / "o"
    argv = ["--data", root, "--val-data", root, "--epochs", "2", "--stage1-epochs", "1", "--teacher-epochs", "1",
            "--batch-size", "4", "--workers", "1", "--no-progress", "--output", str(out)]
    assert main(argv + (["--dali"] if backend == "dali" else [])) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_files"] == 2  # the truncated file, once in --data and once in --val-data
    assert s["num_val_samples"] == 11 and len(s["epochs"]) == 2


@pytest.mark.slow
def test_empty_class_exit_2_unless_allowed(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    os.makedirs(os.path.join(root, "empty"))
    out = tmp_path / "o"
    argv = ["--data", root, "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "2", "--workers", "0",
            "--no-progress", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert os.path.join(root, "empty") in err and "--allow-empty-classes" in err and err.count("\n") == 1
    assert main(argv + ["--allow-empty-classes"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["empty_classes"] == ["empty"] and s["num_classes"] == 3


@pytest.mark.slow
def test_main_job_amp_dali_on_digits(tmp_path):
    out = tmp_path / "o"
    assert main(["--amp", "--dali", "--data-fraction", "0.12", "--epochs", "2", "--teacher-epochs", "1",
                 "--no-progress", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_val_samples"] == 360 and s["args"]["dali"] and s["args"]["amp"]


def test_missing_dali_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    root = write_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="--dali needs NVIDIA DALI"):
        load(root, "dali")


def test_cifar10_from_tarballs(tmp_path, monkeypatch):
    """`cifar10:DIR` extracts train.tar.gz / test.tar.gz (ImageFolder inside) once into the cache."""
    import tarfile

    src = tmp_path / "src"
    write_image_folder(src / "train", {"airplane": 3, "cat": 2})
    write_image_folder(src / "test", {"airplane": 1, "cat": 2})
    tars = tmp_path / "tars"
    tars.mkdir()
    for split in ("train", "test"):
        with tarfile.open(tars / f"{split}.tar.gz", "w:gz") as tf:
            tf.add(src / split, arcname=split)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = load(f"cifar10:{tars}", "torch", val_source=None)
    assert data.name == "cifar10" and data.classes == ["airplane", "cat"]
    assert (data.num_train, data.num_val) == (5, 3)  # the test split is the validation set
    monkeypatch.setenv("DEARKD_CIFAR10_DIR", str(tars))
    assert load("cifar10", "torch", val_source=None).num_train == 5
    with pytest.raises(DataError, match="train.tar.gz"):
        load(f"cifar10:{tmp_path / 'nowhere'}", "torch", val_source=None)


@pytest.mark.parametrize("backend,spec", [("torch", "rand-m9-n2-mstd0.5"), ("dali", "rand-m9-n2")])
def test_randaugment(tmp_path, backend, spec):
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    data = load(root, backend, randaug=spec, pad_crop=False)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()


def test_randaugment_string_means_one_thing(tmp_path):
    """DALI cannot add magnitude noise: a string it cannot honour is refused, not silently changed."""
    from dearkd_fast.data.augment import RandAugmentSpec

    ra = RandAugmentSpec.parse("rand-m7-n3-mstd0.5-mmax10")
    assert (ra.m, ra.n, ra.mstd, ra.mmax) == (7, 3, 0.5, 10)
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    with pytest.raises(DataError, match="mstd"):
        load(root, "dali", randaug="rand-m9-mstd0.5")
    for bad in ("bogus", "rand-mx"):
        with pytest.raises(DataError, match="randaug"):
            load(root, "torch", randaug=bad)
