"""timm's `pretrained=True` for our registered models: no weights are published, so a source must be given.

The routes timm users take all arrive here as builder kwargs: `pretrained_cfg_overlay=dict(file=PATH)` (what
timm's train.py `--pretrained --pretrained-path PATH` passes), a `pretrained_cfg` holding a file or a state dict,
and `timm.create_model("local-dir:FOLDER", pretrained=True)` for a folder written by timm's `save_for_hf`. Our
`student.pt` and `teacher.pt` are valid files: timm's loader reads their "model" entry.
"""
from __future__ import annotations

import os

from ..errors import CheckpointError, InputError

__all__ = ["pretrained_kwargs"]


def _as_dict(cfg) -> dict:
    if cfg is None or isinstance(cfg, str):
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _head_size(path: str, classifiers) -> int | None:
    """Rows of the file's classifier weight (its class count), None when it has no classifier."""
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(path, use_ema=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
        raise CheckpointError(f"weights file '{path}' cannot be read ({type(e).__name__}; only plain tensors load)") \
            from None
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        w = sd.get(f"{name}.weight")
        if w is not None:
            return int(w.shape[0])
    return None


def pretrained_kwargs(variant: str, pretrained: bool, kwargs: dict, classifier) -> dict:
    """The builder kwargs for `variant`: unchanged without `pretrained`; with it, they must name a source (else
    InputError saying what to pass). For a file without a class count of its own in the overlay, the file's
    head size is written into the overlay, so its head loads strictly when the caller asks for that many classes
    (or none: the file's count), and timm's head adaptation applies when the caller asks for another count."""
    if not pretrained:
        return kwargs
    overlay = _as_dict(kwargs.get("pretrained_cfg_overlay"))
    given = {**_as_dict(kwargs.get("pretrained_cfg")), **overlay}
    local_dir = given.get("source") == "local-dir"
    if not (given.get("file") or given.get("state_dict") or local_dir):
        raise InputError(f"{variant}: no published weights exist; give a source: "
                         f"pretrained_cfg_overlay=dict(file=PATH) (a student.pt, teacher.pt or state dict; timm's "
                         f"train.py: --pretrained-path PATH), a 'local-dir:FOLDER' model name, or pretrained=False")
    path = given.get("file")
    if path and not local_dir:
        if not os.path.isfile(path):
            raise CheckpointError(f"{variant}: pretrained weights file '{path}' does not exist")
        if "num_classes" not in overlay:
            n = _head_size(path, classifier)
            if n is not None:
                overlay["num_classes"] = n
                kwargs = {**kwargs, "pretrained_cfg_overlay": overlay}
    return kwargs
