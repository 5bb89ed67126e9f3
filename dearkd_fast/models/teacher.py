"""Teacher loading and early-feature taps.

Any timm CNN (by name) or torchvision classifier (`tv:<name>`) can teach; `cifar_resnet{8,20,56}`
are CIFAR-style ResNets (3x3 stem, no max-pool) that teach well at 32 px, `cifar_resnet9` and `cifar_widenet`
the layouts of the fast CIFAR-10 training recipes. A teacher checkpoint
(`teacher.pt`) holds the weights plus everything needed to rebuild and use it alone.
"""
import contextlib
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor

from ..checkpoint import atomic_save, load_model_file
from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, InputError
from .weights import pretrained_kwargs

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


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.drop_path(self.bn2(self.conv2(out))) + self.shortcut(x))


class PoolTransition(nn.Sequential):
    """conv 3x3 -> BN -> ReLU -> 2x2 max-pool: a stage's entry in the pooled (ResNet-9 style) layout."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class _CifarNet(nn.Module):
    """timm's model API for the 32 px CNNs: a stem conv1 -> bn1 -> act1, stages layer1..layer3, a pooled linear
    head `fc` (subclasses build them and set num_classes, in_chans, global_pool, drop_rate, head_bias)."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for `num_classes` (0: none); global_pool 'avg', 'max' or '' (no pooling)."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.conv1.weight
        fc = nn.Linear(self.num_features, num_classes, bias=self.head_bias, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 \
            else nn.Identity()
        fc.train(self.training)
        fc.requires_grad_(ref.requires_grad)
        self.fc = fc

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([*self.layer1, *self.layer2, *self.layer3], x)
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        elif self.global_pool == "max":
            x = x.amax(dim=(2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the stem and stage outputs in `indices` (last n if int, all if None), and the
        final features."""
        if output_fmt != "NCHW":
            raise InputError(f"{type(self).__name__} outputs NCHW features only, got {output_fmt}")
        take_indices, max_index = feature_take_indices(4, indices)
        intermediates: List[Tensor] = []
        x = self.bn1(self.conv1(x))
        for i, stage in enumerate([self.act1, self.layer1, self.layer2, self.layer3]):
            if stop_early and i > max_index:
                break
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates


class CifarResNet(_CifarNet):
    """ResNet for 32 px inputs, timm's model API: 3x3 stem, stages layer1..layer3. downsample "stride": He et
    al.'s CIFAR ResNet (stages at strides 1, 2, 2, each of BasicBlocks); "pool": the fast-training layout of
    ResNet-9 (each stage a conv + max-pool transition, then its BasicBlocks; strides 2, 4, 8)."""

    def __init__(self, blocks_per_stage: Union[int, Tuple[int, int, int]] = 3, widths: Tuple[int, int, int] = (16, 32, 64),
                 num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, downsample: str = "stride", stem_width: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        _check_pool(global_pool)
        if downsample not in ("stride", "pool"):
            raise InputError(f"CifarResNet downsample is 'stride' or 'pool', got '{downsample}'")
        blocks = (blocks_per_stage,) * 3 if isinstance(blocks_per_stage, int) else tuple(blocks_per_stage)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        dpr = torch.linspace(0, drop_path_rate, max(1, sum(blocks)), device="cpu").tolist()
        stem = stem_width or widths[0]
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.conv1 = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(stem)
            self.act1 = nn.ReLU(inplace=True)
            cin, stages, k = stem, [], 0
            for i, (w, n) in enumerate(zip(widths, blocks)):
                if downsample == "pool":
                    stage = [PoolTransition(cin, w)] + [BasicBlock(w, w, 1, dpr[k + j]) for j in range(n)]
                else:
                    stage = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1, dpr[k + j])
                             for j in range(n)]
                stages.append(nn.Sequential(*stage))
                cin, k = w, k + n
            self.layer1, self.layer2, self.layer3 = stages
            self.num_features = self.head_hidden_size = widths[-1]
            self.head_bias = True
            self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        red = (2, 4, 8) if downsample == "pool" else (1, 2, 4)
        self.feature_info = _feature_info(stem, widths, red)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.device.type != "meta":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if dtype is not None:
            self.to(dtype=dtype)

class ConvGroup(nn.Sequential):
    """conv 3x3 -> 2x2 max-pool -> BN -> GELU -> conv 3x3 -> BN -> GELU: a stage of the wide, shallow fast-training
    CIFAR nets (the max-pool before the norm halves the work of everything after it)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class CifarWideNet(_CifarNet):
    """The wide, shallow CIFAR net of the fastest published CIFAR-10 recipes, in timm's model API: a 2x2 stem conv
    (no padding: 32 -> 31 px) -> BN -> GELU, three ConvGroups (31 -> 15 -> 7 -> 3 px), global max-pool, a linear
    head without bias. No residuals: depth 7 at width 256 trains faster on CPUs than ResNet-9 and further."""

    def __init__(self, widths: Tuple[int, int, int] = (64, 256, 256), stem_width: int = 24, num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "max", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        _check_pool(global_pool)
        if drop_path_rate:
            raise InputError("CifarWideNet has no residual branches: drop_path_rate must be 0")
        self.num_classes, self.in_chans, self.global_pool, self.drop_rate = num_classes, in_chans, global_pool, drop_rate
        self.grad_checkpointing, self.head_bias = False, False
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.conv1 = nn.Conv2d(in_chans, stem_width, 2, 1, 0, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.act1 = nn.GELU()
            cins = (stem_width, *widths[:2])
            self.layer1, self.layer2, self.layer3 = (nn.Sequential(ConvGroup(c, w)) for c, w in zip(cins, widths))
            self.num_features = self.head_hidden_size = widths[-1]
            self.fc = nn.Linear(widths[-1], num_classes, bias=False) if num_classes > 0 else nn.Identity()
        self.feature_info = _feature_info(stem_width, widths, (2, 4, 8))
        if dtype is not None:
            self.to(dtype=dtype)


def _feature_info(stem: int, widths: Tuple[int, int, int], reductions: Tuple[int, int, int]) -> list[dict]:
    return [dict(num_chs=stem, reduction=1, module="act1")] + [
        dict(num_chs=w, reduction=r, module=f"layer{i + 1}") for i, (w, r) in enumerate(zip(widths, reductions))]


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("avg", "max", ""):
        raise InputError(f"the CIFAR nets pool with 'avg', 'max' or not at all (''), got '{global_pool}'")


default_cfgs = generate_default_cfgs({
    name: {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
           "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "conv1",
           "classifier": "fc", "license": "apache-2.0"}
    for name in ("cifar_resnet8", "cifar_resnet20", "cifar_resnet56")
} | {
    "cifar_resnet9": {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4), "crop_pct": 1.0,
                      "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "conv1",
                      "classifier": "fc", "license": "apache-2.0"},
    "cifar_widenet": {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (3, 3), "crop_pct": 1.0,
                      "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "conv1",
                      "classifier": "fc", "license": "apache-2.0"},
})


def _cifar(variant: str, blocks, widths: Tuple[int, int, int], pretrained: bool, kwargs: dict) -> CifarResNet:
    kwargs = pretrained_kwargs(variant, pretrained, kwargs, "fc")
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
                                blocks_per_stage=blocks, widths=widths, **kwargs)


@register_model
def cifar_resnet9(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-9 at half width (the fast CIFAR-10 training layout): stem 32, stages 64/128/256 each entered by a
    conv + max-pool, one residual block in the first and last stage; the study's strong teacher."""
    return _cifar("cifar_resnet9", (1, 0, 1), (64, 128, 256), pretrained, dict(dict(downsample="pool", stem_width=32), **kwargs))


@register_model
def cifar_widenet(pretrained: bool = False, **kwargs) -> CifarWideNet:
    """The wide, shallow fast-training CIFAR net (stem 24, stages 64/256/256, max-pooled): the study's strong
    teacher (stages layer1..layer3 tapped)."""
    kwargs = pretrained_kwargs("cifar_widenet", pretrained, kwargs, "fc")
    return build_model_with_cfg(CifarWideNet, "cifar_widenet", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
                                **kwargs)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """1 block a stage, widths 32/64/128: the fast CPU teacher."""
    return _cifar("cifar_resnet8", 1, (32, 64, 128), pretrained, kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """He et al.'s ResNet-20 for CIFAR: 3 blocks a stage, widths 16/32/64."""
    return _cifar("cifar_resnet20", 3, (16, 32, 64), pretrained, kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """He et al.'s ResNet-56 for CIFAR: 9 blocks a stage, widths 16/32/64."""
    return _cifar("cifar_resnet56", 9, (16, 32, 64), pretrained, kwargs)


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
