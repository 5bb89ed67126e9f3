"""Helpers shared by the test suite and the benchmarks (as numpy.testing / torch.testing are):
random ImageFolders, the public DeepInversion BN arithmetic (the yardstick the fused kernels are
measured against), small teachers and students, and the loaders of a folder in one call."""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch import Tensor

__all__ = ["write_image_folder", "public_bn_loss", "make_teacher", "make_student", "folder_data", "require_native"]


def write_image_folder(root, counts: dict[str, int], size=(32, 32), seed: int = 0, ext: str = "jpg") -> str:
    """root/<class>/<i>.<ext> with random RGB images of size (width, height); returns root."""
    g = torch.Generator().manual_seed(seed)
    for cls, n in counts.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(root, cls, f"{i:03d}.{ext}"))
    return str(root)


def require_native() -> None:
    """For a test of backend "native": return when its library is built; skip when this machine cannot build
    it (no CMake or C++ compiler: the package works without it); fail when it could be built but is not (the
    README's install line, python -m dearkd_fast.native, was not run for these sources)."""
    import pytest

    from . import native

    reason = native.unavailable_reason()
    if reason is None:
        return
    if native.missing_tools():
        pytest.skip(f"backend 'native' is absent: {reason}")
    pytest.fail(f"backend 'native' is absent: {reason}")


def public_bn_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """The public DeepInversion hook's arithmetic: mean over (0,2,3), biased variance of a permuted
    contiguous copy, L2 norms of both differences."""
    C = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([C, -1]).var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def make_teacher(num_classes: int = 5):
    """A randomly initialised cifar_resnet8 Teacher (inputs normalised with mean = std = 0.5)."""
    from .models.teacher import Teacher, TeacherSpec, create_teacher_model

    model = create_teacher_model("cifar_resnet8", num_classes)
    spec = TeacherSpec("cifar_resnet8", num_classes, [str(i) for i in range(num_classes)], 32, (0.5,) * 3, (0.5,) * 3)
    return Teacher(model, spec)


def make_student(num_classes: int = 5, teacher=None):
    """dearkd_micro_patch4_32 in distilled training; with a Teacher, aligned to its taps (projections sized
    from it)."""
    import timm

    from .models import student  # noqa: F401  (registration)

    m = timm.create_model("dearkd_micro_patch4_32", num_classes=num_classes)
    m.set_distilled_training(True)
    if teacher is not None:
        m.set_alignment(teacher.channels())
    return m


def folder_data(source: str, loader: str = "torch", *, val_source: str | None = None, size: int = 32,
                crop_pct: float = 1.0, batch_size: int = 4, workers: int = 1, seed: int = 0, device="cpu",
                rank: int = 0, world_size: int = 1, **data_fields):
    """build_data of one folder (or built-in set) with the test-friendly defaults (no progress bars)."""
    from .data import DataConfig, InputSpec, build_data

    cfg = DataConfig(source=source, val_source=val_source, dali=loader == "dali", workers=workers,
                     loader_choice=loader if loader != "dali" else "auto", **data_fields)
    return build_data(cfg, InputSpec(size=size, crop_pct=crop_pct), batch_size=batch_size, seed=seed, device=device,
                      progress=False, rank=rank, world_size=world_size)
