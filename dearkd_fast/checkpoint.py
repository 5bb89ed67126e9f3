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
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["atomic_write", "atomic_save", "atomic_write_json", "rng_state", "set_rng_state", "load_checkpoint",
           "load_model_file"]


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success fsync and rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save through atomic_write."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_json(obj: Any, path: str) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """Read a training checkpoint written by the trainer (on the CPU; the caller moves tensors)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {type(e).__name__}") from None
    if not isinstance(ck, dict) or "student" not in ck:
        raise CheckpointError(f"'{path}' is not a dearkd_fast training checkpoint")
    return ck


def load_model_file(path: str, kind: str, fmt: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a teacher.pt / student.pt (weights_only: a file cannot run code) and check its format tag."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{kind} checkpoint '{path}' does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
        raise CheckpointError(f"{kind} checkpoint '{path}' cannot be read: {type(e).__name__}") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise CheckpointError(f"'{path}' is not a dearkd_fast {kind} checkpoint (format {fmt})")
    return ck
