"""ImageFolder scanning and validation, class-balanced subsets, and the built-in data sets.

A scan finds every image under root/<class>/, decodes each one fully once (a truncated JPEG passes
PIL's verify() but not a full decode), skips and counts the ones that fail, and remembers the result
in a manifest in the cache folder keyed by (size, mtime), so a second run does not decode again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import stat
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..checkpoint import atomic_write_json
from ..errors import DataError, InputError, RunError

__all__ = [
    "DataError",
    "DataSource",
    "FolderScan",
    "IMG_EXTENSIONS",
    "cache_root",
    "builtin_name",
    "data_name",
    "scan_image_folder",
    "balanced_subset",
    "holdout_split",
    "builtin_digits",
    "check_folder_names",
    "load_rgb",
    "builtin_cifar10",
    "resolve_data",
    "BUILTIN_SETS",
    "HOLDOUT",
]

HOLDOUT = "holdout"  # --val-data: a class-balanced share of the training images (data.holdout_split)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully to 8-bit RGB, as DALI's decoder does: 16-bit images are scaled
    (round(v / 257)) instead of clipped to white, palette and grey images expanded, alpha dropped."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            im8 = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
            return im8.convert("RGB")
        return im.convert("RGB")


def _decodes(path: str) -> bool:
    try:
        load_rgb(path).load()
        return True
    except Exception:  # noqa: BLE001 - any failure to decode means skip
        return False


def check_folder_names(names: list[str], what: str) -> None:
    """InputError unless every name can be a folder directly inside another: not empty, no separator,
    not '.' or '..', no NUL, no duplicates."""
    seen = set()
    for name in names:
        bad = (not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep or "/") in name
               or "\0" in name or name != name.strip())
        if bad:
            raise InputError(f"{what}: '{name}' cannot be a folder name (empty, '.', '..', a path separator or "
                             "surrounding spaces)")
        if name in seen:
            raise InputError(f"{what}: '{name}' appears twice")
        seen.add(name)


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
    classes = _class_names(root, classes)
    files, passed = _list_images(root, classes)
    ok = _decodable([p for p, _ in files], _manifest_path(root), workers, progress, os.path.basename(os.path.abspath(root)))
    samples = [(p, c) for p, c in files if ok[p]]
    skipped = sorted(passed + [p for p, _ in files if not ok[p]])
    if not samples:
        raise DataError(f"data folder '{root}' holds no decodable images")
    present = {c for _, c in samples}
    empty = [name for i, name in enumerate(classes) if i not in present]
    if empty and not allow_empty_classes:
        raise DataError(
            f"class folder '{os.path.join(root, empty[0])}' has no usable images"
            + (f" (and {len(empty) - 1} more empty classes)" if len(empty) > 1 else "")
            + "; pass --allow-empty-classes to train anyway"
        )
    return FolderScan(root=root, classes=list(classes), samples=samples, skipped=skipped, empty_classes=empty)


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, following links; False for a link that cannot be resolved (a link to itself: ELOOP)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _class_names(root: str, classes: list[str] | None) -> list[str]:
    """The class folders of root (sorted), or `classes` after checking root has no others."""
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' does not exist")
    found = sorted(e.name for e in os.scandir(root) if _is_dir(e) and not e.name.startswith("."))
    if not found:
        raise DataError(f"data folder '{root}' has no class folders (expected root/<class>/<image>)")
    if classes is None:
        return found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(f"data folder '{root}' has classes the training data lacks: {', '.join(extra[:5])}")
    return list(classes)


def _list_images(root: str, classes: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image file under root/<class>/, each real file once, sorted; and the
    paths passed over. A link is followed only where it stays inside its own class folder (so no image
    is relabelled and nothing outside the root is read); each folder is entered once (a link loop
    ends); dangling links and anything that is not a regular file (a FIFO named x.jpg) are passed over."""
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    files: list[tuple[str, int]] = []
    passed: list[str] = []

    def visit(folder: str, idx: int, home: str) -> None:
        real = os.path.realpath(folder)
        if real in seen_dirs or not _inside(real, home):
            passed.append(folder)
            return
        seen_dirs.add(real)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if _is_dir(entry):
                visit(entry.path, idx, home)
            elif os.path.islink(entry.path) and not os.path.exists(entry.path):
                passed.append(entry.path)  # a link to itself (ELOOP) or a dangling one: passed over and counted
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                target = os.path.realpath(entry.path)
                if not _regular(entry.path) or not _inside(target, home) or target in seen_files:
                    passed.append(entry.path)
                    continue
                seen_files.add(target)
                files.append((entry.path, idx))

    real_root = os.path.realpath(root)
    for idx, name in enumerate(classes):
        cdir = os.path.join(root, name)
        home = os.path.realpath(cdir)
        if os.path.isdir(cdir) and _inside(home, real_root) and home != real_root:
            visit(cdir, idx, home)
        elif os.path.lexists(cdir):
            passed.append(cdir)
    return sorted(files), sorted(passed)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a dangling link
        return False


def _decodable(paths: list[str], manifest_path: str, workers: int, progress: bool, label: str) -> dict[str, bool]:
    """{path: decodes fully}, decoding only files the manifest (keyed by size and mtime) does not know."""
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    keys = {p: [st.st_size, st.st_mtime_ns] for p in paths for st in (os.stat(p),)}
    todo = [p for p in paths if manifest.get(p, [None, None, None])[:2] != keys[p]]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(tqdm(pool.map(_decodes, todo, chunksize=64), total=len(todo), desc=f"checking {label}",
                                unit="img", disable=not progress or len(todo) < 500, leave=False))
        manifest.update((p, keys[p] + [ok]) for p, ok in zip(todo, results))
        manifest = {p: manifest[p] for p in paths}
        try:
            atomic_write_json(manifest, manifest_path)
        except (OSError, RunError):
            pass  # a read-only cache only costs a re-check next time
    return {p: bool(manifest[p][2]) for p in paths}


def balanced_subset(samples: list[tuple[str, int]], fraction: float, seed: int, *,
                    flag: str = "--data-fraction") -> list[tuple[str, int]]:
    """Keep round(fraction * n_c) (at least 1) samples of each class c, chosen by `seed`; sorted."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"{flag} must be in (0, 1], got {fraction}")
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
    """Mark a freshly built cache folder complete and rename it into place. A concurrent build that
    finished first wins (its folder is never touched: another run may be reading it); an incomplete
    folder from a killed older build is renamed aside before it is deleted."""
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.isdir(final) and not _complete(final):
        aside = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(final))
        try:
            os.replace(final, os.path.join(aside, "old"))
        except OSError:
            pass  # someone else moved it
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(final):
            raise


@contextlib.contextmanager
def _writing_cache(what: str):
    """A built-in set written into the cache: a cache folder that cannot be written is one line naming it."""
    try:
        yield
    except OSError as e:
        raise DataError(f"cannot write the {what} cache in '{cache_root()}' ({e.strerror or e}); set XDG_CACHE_HOME to "
                        "a writable folder") from None


def builtin_digits() -> tuple[str, str]:
    """scikit-learn's 8x8 digits as 32x32 RGB JPEGs (80/20 stratified split, seed 0), written once.

    Returns (train_dir, val_dir) inside cache_root()/digits.
    """
    final = os.path.join(cache_root(), "digits")
    with _writing_cache("digits"):
        if not _complete(final):
            _write_digits(final)
    return os.path.join(final, "train"), os.path.join(final, "val")


def _write_digits(final: str) -> None:
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
    _publish(tmp, final)


def builtin_cifar10(tar_dir: str, progress: bool = True) -> tuple[str, str]:
    """Extract CIFAR-10's train.tar.gz / test.tar.gz (ImageFolder inside) once into the cache."""
    tars = {s: os.path.join(tar_dir, f"{s}.tar.gz") for s in ("train", "test")}
    for p in tars.values():
        if not os.path.isfile(p):
            raise DataError(f"cifar10: '{p}' not found (give the folder holding train.tar.gz and test.tar.gz)")
    final = os.path.join(cache_root(), "cifar10")
    with _writing_cache("cifar10"):
        if not _complete(final):
            _extract_cifar10(tars, final, progress)
    return os.path.join(final, "train"), os.path.join(final, "test")


def _extract_cifar10(tars: dict, final: str, progress: bool) -> None:
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cifar10-", dir=cache_root())
    for split, path in tars.items():
        _extract(path, tmp, f"cifar10/{split}", progress)
    _publish(tmp, final)


def _extract(path: str, dest: str, label: str, progress: bool = True) -> None:
    """Extract the plain files and folders of a tarball into dest; DataError for a member outside it."""
    with tarfile.open(path, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isdir() or m.isfile()]
        unsafe = [m.name for m in members if os.path.isabs(m.name) or ".." in m.name.split("/")]
        if unsafe:  # checked here too: Python before 3.11.4 has no tarfile filter=
            raise DataError(f"{label}: '{path}' holds an unsafe path '{unsafe[0]}'")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for m in tqdm(members, desc=f"extracting {label}", unit="file", leave=False, disable=not progress):
            tf.extract(m, dest, **kw)


@dataclass(frozen=True)
class DataSource:
    """Where --data / --val-data point, and the defaults that belong to the data set."""

    train_dir: str
    val_dir: str | None  # None: hold out a share of train_dir
    name: str
    hflip: float = 0.5  # default flip probability (digits are not mirror-symmetric: 0)


# built-in sets: name -> (train_dir, val_dir) builder taking the part after "name:" and whether to show progress,
# and the set's flip default
BUILTIN_SETS = {
    "digits": (lambda arg, progress: builtin_digits(), 0.0),
    "cifar10": (lambda arg, progress: builtin_cifar10(_cifar10_dir(arg), progress), 0.5),
}


def _cifar10_dir(arg: str) -> str:
    tar_dir = arg or os.environ.get("DEARKD_CIFAR10_DIR", "")
    if not tar_dir:
        raise DataError("cifar10: give the tarball folder as --data cifar10:DIR or set DEARKD_CIFAR10_DIR")
    return tar_dir


def builtin_name(spec: str) -> str | None:
    """The built-in set a --data / --val-data value names ('cifar10' for 'cifar10:DIR'), else None."""
    name = spec.partition(":")[0]
    return name if name in BUILTIN_SETS and (spec == name or name == "cifar10") else None


def data_name(spec: str) -> str:
    """The short name of a --data value: the built-in set's, else the folder's own."""
    return builtin_name(spec) or os.path.basename(os.path.normpath(spec))


def resolve_data(data: str, val_data: str | None, progress: bool = True) -> DataSource:
    """Map --data / --val-data to folders: a built-in set (`digits`, `cifar10[:DIR]`) or an ImageFolder path.

    A built-in name as --val-data means that set's validation split (e.g. train on synthetic images,
    evaluate on real digits); 'holdout' means a hold-out of the training split (no validation folder). For
    `cifar10` without a DIR the folder comes from the environment variable DEARKD_CIFAR10_DIR.
    """
    name = builtin_name(data)
    if name is None:
        source = DataSource(data, None, data_name(data))
    else:
        build, hflip = BUILTIN_SETS[name]
        source = DataSource(*build(data.partition(":")[2], progress), name, hflip)
    if val_data == HOLDOUT:  # validate on images held out of the training split; its own split is not read
        return DataSource(source.train_dir, None, source.name, source.hflip)
    if val_data is not None:
        vname = builtin_name(val_data)
        val_dir = BUILTIN_SETS[vname][0](val_data.partition(":")[2], progress)[1] if vname else val_data
        source = DataSource(source.train_dir, val_dir, source.name, source.hflip)
    return source
