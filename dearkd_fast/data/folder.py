"""ImageFolder scanning and validation, class-balanced subsets, and the built-in data sets.

A scan finds every image under root/<class>/, decodes each one fully once (a truncated JPEG passes
PIL's verify() but not a full decode), skips and counts the ones that fail, and remembers the result
in a manifest in the cache folder keyed by (size, mtime), so a second run does not decode again.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from ..checkpoint import atomic_write_json

__all__ = [
    "DataError",
    "FolderScan",
    "IMG_EXTENSIONS",
    "cache_root",
    "scan_image_folder",
    "balanced_subset",
    "holdout_split",
    "builtin_digits",
    "builtin_cifar10",
    "resolve_data",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Bad input data (missing folder, empty class, nothing decodable): a one-line message, exit 2."""


@dataclass
class FolderScan:
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]  # (absolute path, class index), sorted
    skipped: list[str] = field(default_factory=list)  # files that failed to decode
    empty_classes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def cache_root() -> str:
    """$XDG_CACHE_HOME/dearkd_fast, else ~/.cache/dearkd_fast."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dearkd_fast")


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return True
    except Exception:  # noqa: BLE001 - any failure to decode means skip
        return False


def _manifest_path(root: str) -> str:
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "manifests", f"{key}.json")


def scan_image_folder(
    root: str, *, allow_empty_classes: bool = False, classes: list[str] | None = None, progress: bool = True,
    workers: int = 4,
) -> FolderScan:
    """Scan root/<class>/<image>; DataError on a missing/empty root or an empty class (unless allowed).

    `classes` fixes the class list and order (a validation folder must use the training classes).
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' does not exist")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"data folder '{root}' has no class folders (expected root/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"data folder '{root}' has classes the training data lacks: {', '.join(extra[:5])}")
    files: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        cdir = os.path.join(root, name)
        if not os.path.isdir(cdir):
            continue
        for dirpath, _, names in sorted(os.walk(cdir, followlinks=True)):
            files.extend(
                (os.path.join(dirpath, n), idx) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)
            )
    files.sort()
    mpath = _manifest_path(root)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    stats = {p: os.stat(p) for p, _ in files}
    keys = {p: [stats[p].st_size, stats[p].st_mtime_ns] for p, _ in files}
    todo = [p for p, _ in files if manifest.get(p, [None, None, None])[:2] != keys[p]]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(
                tqdm(pool.map(_decodes, todo, chunksize=64), total=len(todo), desc=f"checking {os.path.basename(os.path.abspath(root))}",
                     unit="img", disable=not progress or len(todo) < 500, leave=False)
            )
        for p, ok in zip(todo, results):
            manifest[p] = keys[p] + [ok]
        manifest = {p: manifest[p] for p, _ in files}
        try:
            atomic_write_json(manifest, mpath)
        except OSError:
            pass  # a read-only cache only costs a re-check next time
    samples = [(p, c) for p, c in files if manifest[p][2]]
    skipped = [p for p, _ in files if not manifest[p][2]]
    counts = [0] * len(classes)
    for _, c in samples:
        counts[c] += 1
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if not samples:
        raise DataError(f"data folder '{root}' holds no decodable images")
    if empty and not allow_empty_classes:
        raise DataError(
            f"class folder '{os.path.join(root, empty[0])}' has no usable images"
            + (f" (and {len(empty) - 1} more empty classes)" if len(empty) > 1 else "")
            + "; pass --allow-empty-classes to train anyway"
        )
    return FolderScan(root=root, classes=list(classes), samples=samples, skipped=skipped, empty_classes=empty)


def balanced_subset(samples: list[tuple[str, int]], fraction: float, seed: int) -> list[tuple[str, int]]:
    """Keep round(fraction * n_c) (at least 1) samples of each class c, chosen by `seed`; sorted."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--data-fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(samples)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    out = []
    for c in sorted(by_class):
        items = sorted(by_class[c])
        rng.shuffle(items)
        out.extend(items[: max(1, round(fraction * len(items)))])
    return sorted(out)


def holdout_split(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Class-balanced split: (train, held-out) with `fraction` of each class held out (at least 1 if n_c > 1)."""
    held = set(balanced_subset(samples, fraction, seed)) if fraction > 0 else set()
    by_class: dict[int, int] = {}
    for _, c in samples:
        by_class[c] = by_class.get(c, 0) + 1
    held = {s for s in held if by_class[s[1]] > 1}
    return [s for s in samples if s not in held], sorted(held)


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ".complete"))


def _publish(tmp: str, final: str) -> None:
    """Mark a freshly built cache folder complete and move it into place (a concurrent build may win)."""
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(final):
            raise


def builtin_digits() -> tuple[str, str]:
    """scikit-learn's 8x8 digits as 32x32 RGB JPEGs (80/20 stratified split, seed 0), written once.

    Returns (train_dir, val_dir) inside cache_root()/digits.
    """
    final = os.path.join(cache_root(), "digits")
    if not _complete(final):
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        idx_train, idx_val = train_test_split(
            np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0
        )
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".digits-", dir=cache_root())
        for split, idx in (("train", idx_train), ("val", idx_val)):
            for i in idx:
                cdir = os.path.join(tmp, split, str(d.target[i]))
                os.makedirs(cdir, exist_ok=True)
                arr = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype("uint8")
                img = Image.fromarray(arr, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB")
                img.save(os.path.join(cdir, f"{i:04d}.jpg"), quality=95)
        if os.path.isdir(final):  # an incomplete earlier attempt
            shutil.rmtree(final, ignore_errors=True)
        _publish(tmp, final)
    return os.path.join(final, "train"), os.path.join(final, "val")


def builtin_cifar10(tar_dir: str) -> tuple[str, str]:
    """Extract CIFAR-10's train.tar.gz / test.tar.gz (ImageFolder inside) once into the cache."""
    tars = {s: os.path.join(tar_dir, f"{s}.tar.gz") for s in ("train", "test")}
    for s, p in tars.items():
        if not os.path.isfile(p):
            raise DataError(f"cifar10: '{p}' not found (give the folder holding train.tar.gz and test.tar.gz)")
    final = os.path.join(cache_root(), "cifar10")
    if not _complete(final):
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".cifar10-", dir=cache_root())
        for s, p in tars.items():
            with tarfile.open(p, "r:gz") as tf:
                members = [m for m in tf.getmembers() if m.isdir() or m.isfile()]
                for m in members:  # plain files and folders inside the target only (also where tarfile has no filter=)
                    if os.path.isabs(m.name) or ".." in m.name.split("/"):
                        raise DataError(f"cifar10: '{p}' holds an unsafe path '{m.name}'")
                for m in tqdm(members, desc=f"extracting cifar10/{s}", unit="file", leave=False):
                    tf.extract(m, tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if os.path.isdir(final):
            shutil.rmtree(final, ignore_errors=True)
        _publish(tmp, final)
    return os.path.join(final, "train"), os.path.join(final, "test")


def resolve_data(data: str, val_data: str | None) -> tuple[str, str | None, str]:
    """Map --data / --val-data to folders: `digits`, `cifar10[:DIR]`, or an ImageFolder path.

    Returns (train_dir, val_dir or None, name). A built-in name as --val-data means that set's
    validation split (e.g. train on synthetic images, evaluate on real digits). For `cifar10`
    without a DIR the folder comes from the environment variable DEARKD_CIFAR10_DIR.
    """
    train, val, name = _builtin(data)
    if val_data is not None:
        val = _builtin(val_data)[1] if _is_builtin(val_data) else val_data
    return train, val, name


def _is_builtin(spec: str) -> bool:
    return spec == "digits" or spec == "cifar10" or spec.startswith("cifar10:")


def _builtin(spec: str) -> tuple[str, str | None, str]:
    """(train_dir, val_dir, name) of a built-in set, or (spec, None, folder name) for a path."""
    if spec == "digits":
        return (*builtin_digits(), "digits")
    if spec == "cifar10" or spec.startswith("cifar10:"):
        tar_dir = spec.partition(":")[2] or os.environ.get("DEARKD_CIFAR10_DIR", "")
        if not tar_dir:
            raise DataError("cifar10: give the tarball folder as --data cifar10:DIR or set DEARKD_CIFAR10_DIR")
        return (*builtin_cifar10(tar_dir), "cifar10")
    return spec, None, os.path.basename(os.path.normpath(spec))
