"""Classifiers by name, and their weights: timm names or torchvision's (`tv:<name>`), random, with their published
weights from the local caches (nothing downloads), or with a state-dict file."""
import os
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
from torch import Tensor

from ..errors import CheckpointError, InputError

__all__ = ["check_teacher_arch", "create_teacher_model", "read_state_dict", "published_weights_path",
           "create_classifier"]


def check_teacher_arch(arch: str) -> None:
    """InputError unless `arch` names a timm model or a torchvision classifier (`tv:<name>`)."""
    if arch.startswith("tv:"):
        import torchvision

        if arch[3:] not in torchvision.models.list_models(module=torchvision.models):
            raise InputError(f"unknown torchvision teacher '{arch[3:]}' (see torchvision.models.list_models())")
    elif not timm.is_model(arch):
        raise InputError(f"unknown teacher architecture '{arch}' (not a timm model name; tv:<name> for torchvision)")


def create_teacher_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier: timm name, or `tv:<name>` for torchvision."""
    check_teacher_arch(arch)
    if arch.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(arch[3:], weights=None, num_classes=num_classes)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def read_state_dict(path: str) -> dict:
    """A plain state dict from a file (weights_only): the file itself, or its "model" / "state_dict" entry, with
    DDP's "module." prefixes removed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad input
        raise CheckpointError(f"weights file '{path}' cannot be read ({type(e).__name__}; only plain tensors load)") \
            from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file '{path}' holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InputError(f"{type(model).__name__} has no linear classifier")
    return names[-1]


def published_weights_path(arch: str) -> tuple[str | None, str]:
    """(the local file holding `arch`'s published weights or None, how to supply them): torchvision's torch hub
    cache, or the Hugging Face cache / torch hub cache timm reads. Nothing is downloaded."""
    if arch.startswith("tv:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(arch[3:]).DEFAULT
        except (ValueError, KeyError, AttributeError):
            raise InputError(f"torchvision publishes no weights for '{arch[3:]}'") from None
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        return (path if os.path.isfile(path) else None), f"download {weights.url} to {path} (or set TORCH_HOME)"
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise InputError(f"timm publishes no weights for '{arch}'")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for name in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            found = try_to_load_from_cache(cfg.hf_hub_id, name)
            if isinstance(found, str):
                return found, ""
        return None, (f"run timm.create_model('{arch}', pretrained=True) on a connected machine and copy its Hugging "
                      f"Face cache (hf-hub:{cfg.hf_hub_id}) to this one (HF_HUB_CACHE)")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
    return (path if os.path.isfile(path) else None), f"download {cfg.url} to {path}"


def create_classifier(arch: str, num_classes: int | None = None, *, pretrained: bool = False,
                      weights: str | None = None) -> nn.Module:
    """A timm (name) or torchvision (`tv:<name>`) classifier: random; with its published weights from the local
    cache (`pretrained`; InputError saying how to supply them when absent: nothing downloads); or with a
    state-dict file (`weights`). num_classes None: the weights' own (1000 for random weights)."""
    check_teacher_arch(arch)
    if weights:
        sd = read_state_dict(weights)
        if num_classes is None:
            with torch.device("meta"):
                probe = create_teacher_model(arch, 1000)
            key = _last_linear(probe) + ".weight"
            if key not in sd:
                raise CheckpointError(f"weights file '{weights}' has no '{key}' (is it a {arch}?)")
            num_classes = sd[key].shape[0]
        model = create_teacher_model(arch, num_classes)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"weights file '{weights}' does not fit {arch} with {num_classes} classes ({first})") \
                from None
        return model
    if pretrained:
        path, how = published_weights_path(arch)
        if path is None:
            raise InputError(f"the published weights of {arch} are not on this machine and nothing is downloaded "
                             f"here: {how}, or pass --teacher-weights PATH")
        if arch.startswith("tv:"):
            model = create_teacher_model(arch, 1000)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        else:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path))
        own = getattr(model, "num_classes", None) or model.get_submodule(_last_linear(model)).out_features
        if num_classes is not None and num_classes != own:
            raise InputError(f"--num-classes {num_classes}: the published weights of {arch} have {own} classes")
        return model
    return create_teacher_model(arch, num_classes or 1000)
