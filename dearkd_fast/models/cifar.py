"""CIFAR-style CNNs for 32 px inputs in timm's model API (registered with default configs): He et al.'s ResNets
(`cifar_resnet8`, `cifar_resnet20`, `cifar_resnet56`), ResNet-9 in the fast-training layout (`cifar_resnet9`) and
the wide, shallow net of the fastest published CIFAR-10 recipes (`cifar_widenet`). Each keeps its stem `act1` and
stages `layer1`..`layer3` as named modules to tap."""
import contextlib
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputError
from .weights import pretrained_kwargs

__all__ = ["CifarResNet", "CifarWideNet", "BasicBlock", "ConvGroup"]


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
