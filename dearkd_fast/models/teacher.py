"""Teachers: the frozen `Teacher` wrapper with its early-feature taps, its `TeacherSpec`, and `teacher.pt`.

Any timm CNN (by name) or torchvision classifier (`tv:<name>`) can teach (classifiers.py builds them and
loads their weights); the CIFAR nets of cifar.py teach well at 32 px. A teacher checkpoint (`teacher.pt`)
holds the weights plus everything needed to rebuild and use it alone.
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import atomic_save, load_model_file
from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError
from .cifar import CifarResNet, CifarWideNet
from .classifiers import (
    _last_linear,
    check_teacher_arch,
    create_classifier,
    create_teacher_model,
    published_weights_path,
    read_state_dict,
)

__all__ = [
    "CifarResNet",
    "CifarWideNet",
    "Teacher",
    "TeacherSpec",
    "freeze",
    "check_teacher_arch",
    "has_module",
    "create_teacher_model",
    "create_classifier",
    "read_state_dict",
    "published_weights_path",
    "default_taps",
    "save_teacher",
    "load_teacher",
]

CHECKPOINT_FORMAT = "dearkd_fast.teacher/2"


def default_taps(model: nn.Module, count: int = 2) -> list[str]:
    """Names of the first `count` stages after the stem: timm's feature_info, else ResNet's layerN."""
    info = getattr(model, "feature_info", None)
    if info:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        names = [e["module"] for e in entries if e.get("module") and not e["module"].startswith(("act", "bn", "conv", "stem"))]
        if len(names) >= count:
            return names[:count]
    names = [n for n in ("layer1", "layer2", "s1", "s2", "stages.0", "stages.1") if has_module(model, n)]
    if len(names) < count:
        raise CheckpointError(
            f"cannot find {count} early stages in {type(model).__name__}; name them with --teacher-taps"
        )
    return names[:count]


def has_module(model: nn.Module, name: str) -> bool:
    """Whether model has a submodule called `name` (dotted path)."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


@dataclass
class TeacherSpec:
    """Everything needed to rebuild and use a teacher alone."""

    arch: str
    num_classes: int
    class_names: list[str]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    taps: list[str] = field(default_factory=list)
    top1: float | None = None


class Teacher(nn.Module):
    """A frozen CNN in eval mode; calling it returns (logits, [tap feature maps]) without grad.

    `input_norm=(mean, std)`: the statistics the inputs are normalised with, when they differ from the
    teacher's own (spec.mean, spec.std); inputs are then re-normalised for it.
    """

    def __init__(self, model: nn.Module, spec: TeacherSpec | None = None, taps: list[str] | None = None,
                 input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        super().__init__()
        self.model = model
        spec = spec if spec is not None else spec_of(model)
        self.spec = spec
        # x_t = (x * std_in + mean_in - mean_t) / std_t = x * renorm_scale + renorm_shift (buffers: moved once)
        own = (tuple(spec.mean), tuple(spec.std))
        self.renorm = input_norm is not None and (tuple(input_norm[0]), tuple(input_norm[1])) != own
        if self.renorm:
            m_in, s_in = (torch.tensor(v).view(1, 3, 1, 1) for v in input_norm)
            m_t, s_t = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
            self.register_buffer("renorm_scale", s_in / s_t, persistent=False)
            self.register_buffer("renorm_shift", (m_in - m_t) / s_t, persistent=False)
        self.taps = list(taps if taps is not None else (spec.taps or default_taps(model)))
        self.spec.taps = self.taps
        self._feats: list[Tensor | None] = [None] * len(self.taps)
        self._handles = []
        for i, name in enumerate(self.taps):
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise CheckpointError(f"teacher {spec.arch} has no module '{name}' to tap") from e
            self._handles.append(module.register_forward_hook(self._make_hook(i)))
        # a tensor, not an int attribute: torch.compile would treat an int as a constant and recompile each step
        self.register_buffer("call_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.freeze()

    def _make_hook(self, i: int):
        def hook(_m, _inp, out):
            self._feats[i] = out

        return hook

    def freeze(self) -> None:
        freeze(self.model)

    def train(self, mode: bool = True) -> "Teacher":  # always eval: BN running stats never move
        super().train(False)
        return self

    @property
    def calls(self) -> int:
        """Forward calls so far (reads the device counter: call it between epochs, not per step)."""
        return int(self.call_count)

    def offload(self) -> None:
        """Move the teacher to the CPU (stage 2 never runs it again); a no-op on the CPU."""
        self.to("cpu")

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        self.call_count += 1
        if self.renorm:  # .to is a no-op once the buffers sit on x's device
            x = x * self.renorm_scale.to(x.device) + self.renorm_shift.to(x.device)
        with torch.no_grad():
            logits = self.model(x)
        feats = list(self._feats)
        self._feats = [None] * len(self.taps)
        return logits, feats

    def channels(self, input_size: int | None = None) -> list[int]:
        """Channel count of each tap, found by one dry forward on a small input."""
        size = input_size or self.spec.input_size
        p = next(self.model.parameters())
        _, feats = self(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        return [f.shape[1] for f in feats]


def spec_of(model: nn.Module) -> TeacherSpec:
    """A spec for a teacher given as a bare module: its timm config where it has one, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_classes = getattr(model, "num_classes", 0) or model.get_submodule(_last_linear(model)).out_features
    return TeacherSpec(arch=cfg.get("architecture", type(model).__name__), num_classes=num_classes,
                       class_names=[str(i) for i in range(num_classes)],
                       input_size=(cfg.get("input_size") or (3, 224, 224))[-1],
                       mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics never move) and no gradients for any parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_teacher(model: nn.Module, spec: TeacherSpec, path: str) -> None:
    """Write teacher.pt atomically in the ecosystem's shape: {"model": state_dict, "spec": ..., "format": ...}."""
    atomic_save({"format": CHECKPOINT_FORMAT, "arch": spec.arch, "model": model.state_dict(), "spec": asdict(spec)},
                path)


def load_teacher(path: str, num_classes: int | None = None, map_location: str | torch.device = "cpu",
                 class_names: list[str] | None = None) -> tuple[nn.Module, TeacherSpec]:
    """Rebuild a teacher from teacher.pt; CheckpointError names whatever does not fit (the class count,
    or the class names and their order when `class_names` is given)."""
    ckpt = load_model_file(path, "teacher", CHECKPOINT_FORMAT, map_location)
    try:
        s = ckpt["spec"]
        spec = TeacherSpec(**{**s, "mean": tuple(s["mean"]), "std": tuple(s["std"])})
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"teacher checkpoint '{path}' lacks or mangles a field of its spec ({e})") from None
    if not isinstance(spec.class_names, list) or len(spec.class_names) != spec.num_classes:
        n = len(spec.class_names) if isinstance(spec.class_names, list) else "no list of"
        raise CheckpointError(f"teacher checkpoint '{path}' has {n} class names for its {spec.num_classes} classes")
    if num_classes is not None and spec.num_classes != num_classes:
        raise CheckpointError(f"teacher checkpoint '{path}' has {spec.num_classes} classes but the data has {num_classes}")
    if class_names is not None and spec.class_names != list(class_names):
        raise CheckpointError(
            f"teacher checkpoint '{path}' has classes {spec.class_names[:3]}... but the data has "
            f"{list(class_names)[:3]}... (same count, different names or order)")
    model = create_teacher_model(spec.arch, spec.num_classes)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, TypeError):
        raise CheckpointError(f"teacher checkpoint '{path}' does not fit architecture {spec.arch}") from None
    return model, spec
