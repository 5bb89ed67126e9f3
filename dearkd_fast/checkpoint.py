"""Atomic writes, model files and resumable training checkpoints.

Every file the project writes whole (checkpoints, model files, summaries, images, manifests) goes
through `atomic_write`: written to a temporary file in the same folder, flushed to disk, then renamed
over the target, so a killed run never leaves a torn file. The one exception is the trainer's
append-only `metrics.jsonl`, which gains one line per epoch (and is rewritten from the checkpoint's
records on --resume).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import CheckpointError, RunError

__all__ = ["atomic_write", "atomic_save", "atomic_write_json", "remove_temporaries", "rng_state", "set_rng_state",
           "load_checkpoint", "load_model_file", "save_rotating"]


def _file_mode() -> int:
    """0o666 less this process's umask (mkstemp creates 0600; outputs should be as open() makes them)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success fsync and rename it over `path` (with
    the umask's permissions). A failed write (disk full, say) removes the temporary file and raises
    RunError naming `path`; a kill leaves only a `.tmp-*` sibling, which `remove_temporaries` clears."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=folder)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        _discard(tmp)
        if isinstance(e, RunError):
            raise
        cause = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else (str(e).strip().splitlines() or [""])[-1]
        raise RunError(f"cannot write '{path}': {cause}") from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def remove_temporaries(folder: str, recursive: bool = False) -> int:
    """Delete the `.tmp-*` files a killed write left in folder (and below it); returns how many."""
    n = 0
    for root, _, files in os.walk(folder) if recursive else [(folder, None, os.listdir(folder))]:
        for f in files:
            path = os.path.join(root, f)
            if f.startswith(TMP_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                n += 1
    return n


def atomic_save(obj: Any, path: str) -> None:
    """torch.save through atomic_write."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_json(obj: Any, path: str) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, as plain types and tensors only (so a
    checkpoint loads with weights_only=True)."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"python": [version, list(py_state), gauss],
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """Read a training checkpoint written by the trainer (weights_only: a crafted file runs nothing)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_reason(e)}); it is truncated, from another "
                              "version, or not a dearkd_fast checkpoint") from None
    if not isinstance(ck, dict) or not {"student", "epoch", "args"} <= set(ck):
        raise CheckpointError(f"'{path}' is not a dearkd_fast training checkpoint")
    return ck


def _reason(e: Exception) -> str:
    return type(e).__name__ + (": refuses to unpickle code" if "weights_only" in str(e) or "Unsupported global" in str(e)
                               else "")


def load_model_file(path: str, kind: str, fmt: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a teacher.pt / student.pt (weights_only: a crafted file runs nothing) and check its format tag."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{kind} checkpoint '{path}' does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
        raise CheckpointError(f"{kind} checkpoint '{path}' cannot be read ({_reason(e)})") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise CheckpointError(f"'{path}' is not a dearkd_fast {kind} checkpoint (format {fmt})")
    return ck


def save_rotating(obj: Any, path: Callable[[str], str], step: int, keep: int, name: str = "checkpoint.pt") -> None:
    """Write `name` atomically; with keep N > 1 as checkpoint-<step>.pt instead, `name` a hard link to the newest,
    and only the newest N of them kept. `path(relpath)` gives a file's place in the output folder (and records it
    in the folder's manifest, as OutputFolder.path does)."""
    if keep == 1:
        atomic_save(obj, path(name))
        return
    stem = name.removesuffix(".pt")
    own = path(f"{stem}-{step:09d}.pt")
    atomic_save(obj, own)
    folder = os.path.dirname(own)
    tmp = os.path.join(folder, f".tmp-{name}")  # the link renamed over `name`: never a moment without one
    if os.path.exists(tmp):
        os.remove(tmp)
    os.link(own, tmp)
    os.replace(tmp, path(name))
    kept = sorted(f for f in os.listdir(folder) if f.startswith(f"{stem}-") and f.endswith(".pt"))
    for old in kept[:-keep]:
        os.remove(os.path.join(folder, old))
