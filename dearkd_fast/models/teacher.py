"""Teacher loading and early-feature taps.

Any timm CNN (by name) or torchvision classifier (`tv:<name>`) can teach; `cifar_resnet{8,20,56}`
are CIFAR-style ResNets (3x3 stem, no max-pool) that teach well at 32 px. A teacher checkpoint
(`teacher.pt`) holds the weights plus everything needed to rebuild and use it alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn as nn
from timm.models import register_model
from torch import Tensor

from ..checkpoint import atomic_save, load_model_file
from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, InputError
from .student import TIMM_KWARGS

__all__ = [
    "CifarResNet",
    "Teacher",
    "TeacherSpec",
    "freeze",
    "check_teacher_arch",
    "has_module",
    "create_teacher_model",
    "default_taps",
    "save_teacher",
    "load_teacher",
]

CHECKPOINT_FORMAT = "dearkd_fast.teacher/1"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32 px inputs: 3x3 stem, stages layer1..layer3 at strides 1, 2, 2."""

    def __init__(self, blocks_per_stage: int = 3, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10,
                 in_chans: int = 3, **kwargs):
        super().__init__()
        for k in TIMM_KWARGS:
            kwargs.pop(k, None)
        if kwargs:
            raise InputError(f"CifarResNet got unexpected arguments: {sorted(kwargs)}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, stages = widths[0], []
        for i, w in enumerate(widths):
            stage = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(blocks_per_stage)]
            stages.append(nn.Sequential(*stage))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_info = [
            dict(num_chs=widths[0], reduction=1, module="layer1"),
            dict(num_chs=widths[1], reduction=2, module="layer2"),
            dict(num_chs=widths[2], reduction=4, module="layer3"),
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cifar_cfg() -> dict:
    return {"num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "conv1", "classifier": "fc"}


def _cifar(blocks: int, widths: tuple[int, int, int], pretrained: bool, kwargs: dict) -> CifarResNet:
    if pretrained:
        raise InputError("cifar_resnet: no pretrained weights exist; train the teacher (--teacher-epochs)")
    model = CifarResNet(blocks, widths, **kwargs)
    model.default_cfg = model.pretrained_cfg = _cifar_cfg()
    return model


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """1 block a stage, widths 32/64/128: the fast CPU teacher."""
    return _cifar(1, (32, 64, 128), pretrained, kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """He et al.'s ResNet-20 for CIFAR: 3 blocks a stage, widths 16/32/64."""
    return _cifar(3, (16, 32, 64), pretrained, kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """He et al.'s ResNet-56 for CIFAR: 9 blocks a stage, widths 16/32/64."""
    return _cifar(9, (16, 32, 64), pretrained, kwargs)


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

    def __init__(self, model: nn.Module, spec: TeacherSpec, taps: list[str] | None = None,
                 input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        super().__init__()
        self.model = model
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
        self.offloaded = False
        self.freeze()

    def _make_hook(self, i: int):
        def hook(_m, _inp, out):
            self._feats[i] = out

        return hook

    def freeze(self) -> None:
        freeze(self.model)

    def train(self, mode: bool = True) -> Teacher:  # always eval: BN running stats never move
        super().train(False)
        return self

    @property
    def calls(self) -> int:
        """Forward calls so far (reads the device counter: call it between epochs, not per step)."""
        return int(self.call_count)

    def offload(self) -> None:
        """Move the teacher to the CPU (stage 2 never runs it again); a no-op on the CPU."""
        self.to("cpu")
        self.offloaded = True

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


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics never move) and no gradients for any parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_teacher(model: nn.Module, spec: TeacherSpec, path: str) -> None:
    """Write teacher.pt atomically: weights plus the spec."""
    atomic_save({"format": CHECKPOINT_FORMAT, "spec": asdict(spec), "state_dict": model.state_dict()}, path)


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
    if num_classes is not None and spec.num_classes != num_classes:
        raise CheckpointError(f"teacher checkpoint '{path}' has {spec.num_classes} classes but the data has {num_classes}")
    if class_names is not None and spec.class_names != list(class_names):
        raise CheckpointError(
            f"teacher checkpoint '{path}' has classes {spec.class_names[:3]}... but the data has "
            f"{list(class_names)[:3]}... (same count, different names or order)")
    model = create_teacher_model(spec.arch, spec.num_classes)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError):
        raise CheckpointError(f"teacher checkpoint '{path}' does not fit architecture {spec.arch}") from None
    return model, spec
