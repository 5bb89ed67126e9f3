"""Named presets: the normalisation of every registered model, the inversion settings per objective and image
size (INVERSION), and the study's tiers (STUDY_TIERS). Plain data; the tool configurations (config.py) and
their flags (flags.py) read them."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SMALL_IMAGE_MAX", "InversionPreset", "SizePreset", "PRESETS", "preset_for",
           "INVERSION", "OBJECTIVES", "inversion_preset", "StudyTier", "STRONG_TEACHER", "STUDY_TIERS"]

# ImageNet normalisation: the statistics of every registered model of this project (timm's defaults too)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# images of at most this side are "small" (CIFAR-style): pad-and-crop augmentation, our inversion settings
SMALL_IMAGE_MAX = 64


# ---------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class InversionPreset:
    """How images are synthesised: the objective's coefficients and the optimisation schedule.

    Phases: `low_res_iterations` at half resolution (2x average-pooled; 0: none), then `iterations` at full
    resolution, each with a fresh Adam(`betas`), `warmup` iterations of linear lr warm-up, then cosine to 0
    (`schedule` "cosine") or a constant lr. `jitter` is the largest random roll at `jitter_side` px (scaled
    with the resolution, halved in the half-resolution phase); `clip` keeps pixels in the valid range after
    each step; `keep` "best" keeps the images of the lowest total loss, "last" the final ones.
    """

    lr: float
    r_bn: float
    first_bn_mult: float
    tv_l2: float
    tv_l1: float
    l2: float
    iterations: int
    low_res_iterations: int
    betas: tuple[float, float]
    warmup: int
    schedule: str
    clip: bool
    jitter: int
    jitter_side: int
    flip: bool
    bpid: float
    keep: str


@dataclass(frozen=True)
class SizePreset:
    """Settings that depend on the image size: the train augmentation."""

    name: str
    description: str
    pad_crop: bool  # pad-and-crop (small images) instead of random-resized-crop


PRESETS: dict[str, SizePreset] = {
    "224": SizePreset("224", f"> {SMALL_IMAGE_MAX} px", pad_crop=False),
    "small": SizePreset("small", f"<= {SMALL_IMAGE_MAX} px", pad_crop=True),
}


def preset_for(side: int) -> SizePreset:
    """The preset of an image side: 'small' up to SMALL_IMAGE_MAX px, else '224'."""
    return PRESETS["small" if side <= SMALL_IMAGE_MAX else "224"]


_OFFICIAL_224 = dict(lr=0.25, r_bn=0.01, first_bn_mult=10.0, tv_l2=1e-4, tv_l1=0.0, l2=1e-5)
# (objective, size) -> settings. "deepinversion" is the public code term by term: at 224 px its ImageNet
# setting 0 (2,000 half-resolution + 1,000 full-resolution iterations, Adam(0.5, 0.9), 100 warm-up
# iterations then cosine per phase, jitter 30, flips, clipping, the best images kept) with its README's
# coefficients; at <= 64 px its CIFAR-10 script with the paper's parameters (2,000 iterations, Adam's
# default betas, constant lr 0.05, r_bn 10, TV-L2 2.5e-5, jitter 2, no flip, no clipping, no first-BN
# multiplier, the best images kept). "dearkd" is ours: BPID on, a shorter schedule, the last images kept;
# its small-image coefficients were tuned on digits (benchmarks/RESULTS.md; l2 8e-5 on the per-image norm
# equals the whole-batch 1e-5 it was tuned with, at batch 64).
INVERSION: dict[tuple[str, str], InversionPreset] = {
    ("dearkd", "224"): InversionPreset(**_OFFICIAL_224, iterations=1500, low_res_iterations=1500, betas=(0.5, 0.9),
                                       warmup=0, schedule="cosine", clip=True, jitter=30, jitter_side=224,
                                       flip=True, bpid=10.0, keep="last"),
    ("dearkd", "small"): InversionPreset(lr=0.25, r_bn=1.0, first_bn_mult=10.0, tv_l2=1e-3, tv_l1=0.0, l2=8e-5,
                                         iterations=120, low_res_iterations=120, betas=(0.5, 0.9), warmup=0,
                                         schedule="cosine", clip=True, jitter=30, jitter_side=224, flip=True,
                                         bpid=10.0, keep="last"),
    ("deepinversion", "224"): InversionPreset(**_OFFICIAL_224, iterations=1000, low_res_iterations=2000,
                                              betas=(0.5, 0.9), warmup=100, schedule="cosine", clip=True, jitter=30,
                                              jitter_side=224, flip=True, bpid=0.0, keep="best"),
    ("deepinversion", "small"): InversionPreset(lr=0.05, r_bn=10.0, first_bn_mult=1.0, tv_l2=2.5e-5, tv_l1=0.0,
                                                l2=0.0, iterations=2000, low_res_iterations=0, betas=(0.9, 0.999),
                                                warmup=0, schedule="constant", clip=False, jitter=2, jitter_side=32,
                                                flip=False, bpid=0.0, keep="best"),
}
OBJECTIVES = ("dearkd", "deepinversion")


def inversion_preset(objective: str, side: int) -> InversionPreset:
    """The inversion settings of an objective preset at an image side."""
    return INVERSION[(objective, preset_for(side).name)]


def _preset_help(key: str) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) and not isinstance(v, bool) else str(v)

    vals = {f"{o} {PRESETS[z].description}": getattr(p, key) for (o, z), p in INVERSION.items()}
    if len(set(vals.values())) == 1:
        return f"default {fmt(next(iter(vals.values())))}"
    return "default: " + ", ".join(f"{fmt(v)} ({d})" for d, v in vals.items())


# ---------------------------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class StudyTier:
    """What every run of one tier of the study shares (python -m dearkd_fast.study; docs/study.md)."""

    model: str
    teacher: str
    teacher_epochs: int
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: int
    fractions: tuple[float, ...]
    seeds: int
    val_fraction: float  # the same class-balanced share of the test split for every run
    workers: int
    synthetic_per_class: int  # data-free: images synthesised per class, with and without BPID
    synthetic_epochs: int
    synthetic_batch_size: int
    invert_iterations: int  # per phase (half, then full resolution)
    teacher_flags: tuple[str, ...] = ()  # the teacher's recipe: trainer flags of its run
    teacher_batch_size: int | None = None  # default: batch_size
    teacher_val_fraction: float | None = None  # share of the validation split the teacher is scored on; default val_fraction
    steps: tuple[int, ...] | None = None  # optimiser steps of every student at each fraction (one: at all; data-free:
    # the first); its epochs follow from its set's size. None: epochs
    no_stage2_seeds: int | None = None  # seeds of the rows without stage 2 (None: seeds)
    evals: int | None = None  # validations per student run (about; at least one a stage); None: every epoch
    tune: bool = False  # first pick each method's settings (TUNING) on a hold-out of the training split
    ablate: bool = False  # then train DearKD's choice with each change of study.ABLATIONS on that hold-out


# the cpu-long tier's teacher (cifar_widenet): the fast CIFAR recipe with label smoothing 0.2, batch 512
STRONG_TEACHER = ("--teacher-recipe", "fast", "--teacher-lr", "0.75", "--teacher-weight-decay", "1.33e-3",
                  "--teacher-smoothing", "0.2")
# cpu: sized to finish within 45 minutes on the 2-core CPU machine; cpu-long: the scarce-data question, within
# 180 minutes of it (resumable across sittings); gpu: the full grid, sized to about 10 minutes
# from the trainer's rate measured on an H200 (docs/study.md: the estimate). Both train with bf16 autocast.
STUDY_TIERS: dict[str, StudyTier] = {
    "cpu": StudyTier(model="dearkd_nano_patch4_32", teacher="cifar_resnet20", teacher_epochs=3, epochs=4, batch_size=128,
                     lr=2e-3, warmup_epochs=1, fractions=(0.1, 0.25), seeds=2, val_fraction=0.25, workers=2,
                     synthetic_per_class=10, synthetic_epochs=10, synthetic_batch_size=32, invert_iterations=80),
    "cpu-long": StudyTier(model="dearkd_nano_patch4_32", teacher="cifar_widenet", teacher_epochs=13, epochs=100,
                          batch_size=128, lr=2e-3, warmup_epochs=1, fractions=(0.02, 0.1), seeds=3, val_fraction=0.2,
                          workers=2, synthetic_per_class=50, synthetic_epochs=100, synthetic_batch_size=100,
                          invert_iterations=200, teacher_flags=STRONG_TEACHER, teacher_batch_size=512,
                          teacher_val_fraction=1.0, steps=(800, 1600), no_stage2_seeds=1, evals=20, tune=True,
                          ablate=True),
    "gpu": StudyTier(model="dearkd_tiny_patch4_32", teacher="cifar_resnet20", teacher_epochs=3, epochs=2, batch_size=512,
                     lr=2e-3, warmup_epochs=1, fractions=(0.1, 0.25, 0.5, 1.0), seeds=2, val_fraction=0.4, workers=12,
                     synthetic_per_class=30, synthetic_epochs=8, synthetic_batch_size=128, invert_iterations=120),
}
