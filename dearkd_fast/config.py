"""The tool configurations, every default written once: typed, frozen dataclasses.

`TrainConfig` (python -m dearkd_fast.train), `InvertConfig` (.invert), `EvalConfig` (.eval), `StudyConfig`
(.study) and `NativeConfig` (.native) hold every setting; `DataConfig` (the data flags) sits inside
`TrainConfig`, `RunConfig` (the flags the tools share) inside train and invert. Their parsers, config files
and the flag tables of docs/cli.md come from these classes (flags.py), the presets and study tiers they
fall back to from presets.py; both are re-exported here. A config checks itself when it is made
(`InputError` naming the flag) and computes what derives from it (the stage-switch epoch, the device, the
preset of an image size); nothing is written back.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .flags import RECIPES_DIR, _check, _finite, build_parser, config_argv, flag, flag_table, flat, from_argv, recipe_path
from .presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INVERSION,
    OBJECTIVES,
    PRESETS,
    SMALL_IMAGE_MAX,
    STRONG_TEACHER,
    STUDY_TIERS,
    InversionPreset,
    SizePreset,
    StudyTier,
    inversion_preset,
    preset_for,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SMALL_IMAGE_MAX", "InversionPreset", "SizePreset", "PRESETS", "preset_for",
    "INVERSION", "OBJECTIVES", "inversion_preset", "StudyTier", "STRONG_TEACHER", "STUDY_TIERS",
    "flag", "build_parser", "from_argv", "config_argv", "recipe_path", "RECIPES_DIR", "flat", "flag_table",
    "resolve_device", "RunConfig", "autocast_dtype", "DataConfig", "stage_switch", "TrainConfig", "InvertConfig",
    "SynthesisSettings", "EvalConfig", "NativeConfig", "StudyConfig", "TOOL_CONFIGS",
]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; InputError for a device this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device '{device}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: only cpu and cuda are supported")
    return dev


# ---------------------------------------------------------------------------------------------- configs

BACKENDS = ("auto", "triton", "native", "torch")  # ops.BACKENDS; kept here so the parser needs no kernels


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The run flags both tools share."""

    resume: bool = flag(False, "continue the run in --output", group="run")
    overwrite: bool = flag(False, "replace a finished run in --output", group="run")
    seed: int = flag(0, "seed of everything random (data subset and order, initialisation, augmentation, noise)", group="run")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N", group="run")
    amp: bool = flag(False, "autocast (bf16 unless --amp-dtype)", group="run")
    amp_dtype: str = flag("bfloat16", "autocast dtype; float16 adds a gradient scaler (train only)", group="run",
                          choices=("bfloat16", "float16"))
    compile: bool = flag(False, "torch.compile what runs every step (train: student + DearKD loss + teacher as one "
                         "graph; invert: teacher)", group="run")
    compile_mode: str = flag("default", "torch.compile mode", group="run",
                             choices=("default", "reduce-overhead", "max-autotune"))
    backend: str = flag("auto", "loss kernels (dearkd_fast.ops)", group="run", choices=BACKENDS)
    no_progress: bool = flag(False, "no progress bars", group="run")

    def __post_init__(self):
        _check(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        _check(self.amp_dtype in ("bfloat16", "float16"), f"--amp-dtype must be bfloat16 or float16, got {self.amp_dtype}")
        _check(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        resolve_device(self.device)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def progress(self) -> bool:
        return not self.no_progress

    @property
    def autocast_dtype(self) -> torch.dtype:
        return autocast_dtype(self.amp_dtype)


def autocast_dtype(name: str) -> torch.dtype:
    """--amp-dtype's torch dtype."""
    return torch.bfloat16 if name == "bfloat16" else torch.float16


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are read and augmented."""

    source: str = flag("digits", "ImageFolder root, 'digits' (built in), or 'cifar10[:TARBALL_DIR]'", group="data",
                       name="--data")
    val_source: str | None = flag(None, "validation ImageFolder, a built-in set's name (its validation split), or "
                                  "'holdout': a class-balanced 10%% of --data's training images, the same for every "
                                  "seed, never the test split (tuning) (default: the built-in set's split, else "
                                  "holdout)", group="data", name="--val-data")
    fraction: float = flag(1.0, "class-balanced share of the training images, in (0, 1]", group="data",
                           name="--data-fraction")
    val_fraction: float = flag(1.0, "class-balanced share of the validation images, in (0, 1] (the same images for "
                               "every seed)", group="data")
    allow_empty_classes: bool = flag(False, "report empty class folders instead of failing", group="data")
    workers: int = flag(min(4, os.cpu_count() or 1), "data loading workers/threads", group="data", shown="min(4, cores)")
    loader_choice: str = flag("auto", "input pipeline: resident (decoded once, held and augmented on the training device; "
                              "small images), torch (torchvision DataLoader), dali, or auto (resident for the built-in "
                              "sets, else torch)", group="data", name="--loader", choices=("auto", "resident", "torch", "dali"))
    resident_max_gb: float = flag(4.0, "largest decoded size (GiB) the resident loader holds", group="data")
    dali: bool = flag(False, "decode and augment with NVIDIA DALI (GPU when --device is CUDA); same as --loader dali",
                      group="data")
    hflip: float | None = flag(None, "horizontal flip probability (default: the built-in set's, 0 on digits; else 0.5)",
                               group="data")
    randaug: str | None = flag(None, "timm RandAugment string, e.g. rand-m9-mstd0.5 (DALI: rand-mM-nN only)", group="data")
    reprob: float = flag(0.0, "random erasing probability (timm's RandomErasing; DeiT: 0.25)", group="data")
    remode: str = flag("pixel", "random erasing fill: const (zeros), rand (per channel), pixel (per pixel)",
                       group="data", choices=("const", "rand", "pixel"))
    aug_repeats: int = flag(1, "repeated augmentation: each drawn image N times per epoch, its copies on different "
                            "ranks, the epoch as long (DeiT: 3)", group="data")
    holdout: float = 0.1  # held-out share of --data when no validation folder exists
    eval_batch_size: int | None = None  # default: twice the training batch
    pad_crop: bool | None = None  # default: the size preset's

    def __post_init__(self):
        _finite("--data-fraction", self.fraction, low=0.0, low_open=True, high=1.0)
        _finite("--val-fraction", self.val_fraction, low=0.0, low_open=True, high=1.0)
        _check(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        _finite("--hflip", self.hflip, low=0.0, high=1.0)
        _check(0.0 <= self.holdout < 1.0, f"holdout must be in [0, 1), got {self.holdout}")
        _finite("--resident-max-gb", self.resident_max_gb, low=0.0, low_open=True)
        _check(not (self.dali and self.loader_choice not in ("auto", "dali")),
               f"--dali and --loader {self.loader_choice} disagree; give one of them")
        _finite("--reprob", self.reprob, low=0.0, high=1.0)
        _check(self.remode in ("const", "rand", "pixel"), f"--remode must be const, rand or pixel, got {self.remode}")
        _check(self.aug_repeats >= 1, f"--aug-repeats must be >= 1, got {self.aug_repeats}")
        _check(not ((self.reprob > 0 or self.aug_repeats > 1) and self.loader == "dali"),
               "--reprob and --aug-repeats need --loader torch or resident (not DALI)")
        _check(not (self.randaug and self.loader_choice == "resident"),
               "--randaug needs --loader torch or dali (the resident loader augments with pad-and-crop and flips only)")
        if self.randaug:  # read now (not at the first batch); the same reading for both loaders
            from .data.augment import RandAugmentSpec

            spec = RandAugmentSpec.parse(self.randaug)
            if self.dali:
                spec.check_dali()

    @property
    def loader(self) -> str:
        """The input pipeline asked for: 'dali', 'torch', 'resident' or 'auto' (build_data resolves it)."""
        return "dali" if self.dali else self.loader_choice

    @property
    def uses_dali(self) -> bool:
        return self.loader == "dali"


def stage_switch(epochs: int, stage1_epochs: int | None) -> int:
    """E1, the first stage-2 epoch: --stage1-epochs, else 2/3 of --epochs rounded up."""
    return stage1_epochs if stage1_epochs is not None else (2 * epochs + 2) // 3


def _default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of python -m dearkd_fast.train."""

    config: str | None = flag(None, "YAML file (or bundled recipe name: dearkd_fast/recipes/) of flag: value pairs; "
                              "flags given override it", group="config")
    data: DataConfig = field(default_factory=DataConfig)
    mixup: float = flag(0.0, "Mixup alpha (0: off)", group="data")
    cutmix: float = flag(0.0, "CutMix alpha (0: off)", group="data")
    smoothing: float = flag(0.0, "label smoothing, in [0, 1)", group="data")
    model: str = flag("dearkd_micro_patch4_32", "student (timm name, dearkd_*)", group="models")
    teacher: str = flag("cifar_resnet8", "teacher architecture (timm name or tv:<torchvision name>)", group="models")
    teacher_ckpt: str | None = flag(None, "teacher.pt to load instead of training a teacher", group="models")
    teacher_weights: str | None = flag(None, "a plain state dict of --teacher (e.g. published weights) to load "
                                       "instead of training a teacher", group="models")
    teacher_epochs: int = flag(10, "epochs to train the teacher when no --teacher-ckpt", group="models")
    teacher_opt: str = flag("adamw", "the teacher's optimiser under --teacher-recipe standard: adamw, or sgd (Nesterov "
                            "momentum 0.9); the fast recipe has its own", group="models", choices=("adamw", "sgd"))
    teacher_recipe: str = flag("standard", "how the teacher is trained: standard (--teacher-opt, warm-up + cosine, the "
                               "run's augmentation) or fast (the fast CIFAR-10 techniques for cifar_widenet on the "
                               "resident loader: whitened frozen stem, Nesterov SGD at momentum 0.85, lookahead, ...; "
                               "docs/method.md)", group="models",
                               choices=("standard", "fast"))
    teacher_lr: float = flag(2e-3, "peak learning rate of the teacher (standard: warm-up, then cosine; fast: "
                              "the triangular schedule's peak)", group="models")
    teacher_weight_decay: float = flag(5e-4, "weight decay of the teacher (not on norms and biases)", group="models")
    teacher_smoothing: float = flag(0.0, "label smoothing of the teacher's cross-entropy", group="models")
    teacher_taps: str | None = flag(None, "comma-separated teacher modules to align to (default: first two stages)",
                                    group="models")
    epochs: int = flag(20, "E: total student epochs (0: train or load the teacher, evaluate it, write teacher.pt "
                       "and summary.json, no student)", group="optimisation")
    stage1_epochs: int | None = flag(None, "E1: epochs of stage 1 (default: 2/3 of --epochs, rounded up)",
                                     group="optimisation")
    batch_size: int = flag(64, "per step", group="optimisation")
    lr: float = flag(1e-3, "AdamW peak learning rate", group="optimisation")
    lr_base_batch: int | None = flag(None, "scale --lr by the global batch over this (DeiT: 512, lr 5e-4 x "
                                     "batch / 512); default: --lr as given", group="optimisation")
    min_lr_ratio: float = flag(0.01, "cosine floor, as a share of --lr", group="optimisation")
    weight_decay: float = flag(0.05, "AdamW (not on norms, biases, tokens, position embeddings)", group="optimisation")
    warmup_epochs: int = flag(2, "linear warm-up", group="optimisation")
    eval_every: int = flag(1, "validate after every N-th epoch and after the last epoch of each stage",
                           group="optimisation")
    max_norm: float | None = flag(None, "gradient clipping norm", group="optimisation")
    model_ema: bool = flag(False, "keep an exponential moving average of the student (timm's ModelEmaV3), validated "
                           "each epoch beside it and written to student_ema.pt", group="optimisation")
    model_ema_decay: float = flag(0.9998, "decay of --model-ema per step", group="optimisation")
    finetune: str | None = flag(None, "start the student from this student.pt with a fresh head (a new data set; "
                                "DeiT's --finetune)", group="models")
    drop_path: float | None = flag(None, "stochastic depth rate of the student's last block (default: the model's)",
                                   group="models")
    alpha: float = flag(0.5, "weight of KD against CE in stage 1", group="distillation")
    beta: float = flag(1.0, "weight of the feature-alignment losses", group="distillation")
    distillation_type: str = flag("hard", "`hard` (CE on teacher argmax) or `soft` (KL at --tau)", group="distillation",
                                  choices=("hard", "soft"))
    tau: float = flag(1.0, "soft-KD temperature", group="distillation")
    align_standardize: bool = flag(False, "per-channel standardise teacher maps before alignment", group="distillation")
    align_blocks: str | None = flag(None, "comma-separated student blocks aligned to the teacher (default: its MHCA "
                                    "blocks), split evenly over the taps in order", group="distillation")
    beta_decay: bool = flag(False, "decay the alignment weight linearly from --beta to 0 over stage 1 (per epoch)",
                            group="distillation")
    num_mhca: int | None = flag(None, "student blocks (the first K) with MHCA; 0: plain attention throughout "
                                "(default: the model's)", group="models")
    output: str = flag(help="output folder", group="run", factory=_default_run_dir, shown="runs/<date-time>")
    checkpoint_every: int = flag(0, "also checkpoint every N steps (0: at epoch ends only); needs the torchvision "
                                 "loader (DALI cannot restart mid-epoch)", group="checkpoints")
    keep_checkpoints: int = flag(1, "checkpoints kept (checkpoint.pt is always the newest)", group="checkpoints")
    max_bad_steps: int = flag(20, "stop (exit 1) after N non-finite losses in a row (each is skipped; 0: never stop)",
                              group="checkpoints")
    deterministic: bool = flag(False, "deterministic algorithms (a run resumed from any checkpoint then ends "
                               "bit-identical to one never interrupted)", group="checkpoints")
    run: RunConfig = field(default_factory=RunConfig)
    # the teacher warms up over this share of its steps, at most one epoch
    teacher_warmup_share: float = 0.1

    def __post_init__(self):
        _check(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        _check(self.lr_base_batch is None or self.lr_base_batch >= 1,
               f"--lr-base-batch must be >= 1, got {self.lr_base_batch}")
        _check(self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        _finite("--model-ema-decay", self.model_ema_decay, low=0.0, low_open=True, high=1.0)
        _check(self.model_ema_decay < 1.0, "--model-ema-decay must be < 1 (1 would never move)")
        _finite("--drop-path", self.drop_path, low=0.0)
        _check(self.drop_path is None or self.drop_path < 1.0, f"--drop-path must be < 1, got {self.drop_path}")
        _check(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.max_bad_steps >= 0, f"--max-bad-steps must be >= 0, got {self.max_bad_steps}")
        _check(not (self.checkpoint_every and self.data.uses_dali), "--checkpoint-every needs the torchvision loader: DALI "
               "cannot restart mid-epoch (drop --dali, or checkpoint at epoch ends only)")
        _check(not (self.deterministic and self.data.uses_dali), "--deterministic needs the torchvision loader (drop --dali)")
        _check(self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}")
        e1 = self.switch_epoch
        _check(0 <= e1 <= self.epochs, f"--stage1-epochs must be in [0, --epochs={self.epochs}], got {e1}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _finite("--lr", self.lr, low=0.0, low_open=True)
        _finite("--teacher-lr", self.teacher_lr, low=0.0, low_open=True)
        _finite("--alpha", self.alpha, low=0.0, high=1.0)
        _finite("--beta", self.beta, low=0.0)
        _finite("--tau", self.tau, low=0.0, low_open=True)
        _finite("--weight-decay", self.weight_decay, low=0.0)
        _finite("--teacher-weight-decay", self.teacher_weight_decay, low=0.0)
        _finite("--teacher-smoothing", self.teacher_smoothing, low=0.0, high=0.99)
        _finite("--min-lr-ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _finite("--max-norm", self.max_norm, low=0.0, low_open=True)
        _finite("--mixup", self.mixup, low=0.0)
        _finite("--cutmix", self.cutmix, low=0.0)
        _check(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.teacher_epochs >= 0, f"--teacher-epochs must be >= 0, got {self.teacher_epochs}")
        _finite("--smoothing", self.smoothing, low=0.0)
        _check(self.smoothing < 1.0, f"--smoothing must be < 1, got {self.smoothing}")
        _check(not (self.mixes and self.batch_size % 2), "--mixup/--cutmix need an even --batch-size")
        _check(self.num_mhca is None or self.num_mhca >= 0, f"--num-mhca must be >= 0, got {self.num_mhca}")
        _ = self.aligned_blocks  # parses --align-blocks or refuses it
        _check(not (self.teacher_ckpt and self.teacher_weights), "give --teacher-ckpt or --teacher-weights, not both")
        _check(self.teacher_ckpt is not None or self.teacher_weights is not None or self.teacher_epochs >= 1
               or not self.needs_teacher,
               "stage 1 needs a teacher: give --teacher-ckpt, --teacher-weights or --teacher-epochs >= 1" if self.epochs
               else "--epochs 0 runs the teacher alone: give --teacher-epochs >= 1, --teacher-ckpt or --teacher-weights")
        _check(bool(self.output), "--output must not be empty")

    @property
    def aligned_blocks(self) -> list[int] | None:
        """--align-blocks as block indices (None: the student's MHCA blocks)."""
        if self.align_blocks is None:
            return None
        try:
            blocks = [int(b) for b in self.align_blocks.split(",")]
        except ValueError:
            raise InputError(f"--align-blocks must be comma-separated block indices, got '{self.align_blocks}'") from None
        _check(len(set(blocks)) == len(blocks) and min(blocks) >= 0,
               f"--align-blocks must be distinct indices >= 0, got '{self.align_blocks}'")
        return blocks

    def beta_at(self, epoch: int) -> float:
        """The alignment weight of an epoch: --beta, or with --beta-decay beta x (1 - epoch / E1) in stage 1."""
        if not self.beta_decay:
            return self.beta
        return self.beta * max(0.0, 1.0 - epoch / max(1, self.switch_epoch))

    @property
    def switch_epoch(self) -> int:
        """E1, the first stage-2 epoch (see stage_switch)."""
        return stage_switch(self.epochs, self.stage1_epochs)

    def evaluates(self, epoch: int) -> bool:
        """Whether epoch (0-based) ends with a validation: every --eval-every-th, and the last of each stage."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 in (self.switch_epoch, self.epochs)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def needs_teacher(self) -> bool:
        return self.switch_epoch > 0 or self.epochs == 0

    def teacher_warmup_steps(self, steps_per_epoch: int) -> int:
        return min(steps_per_epoch, int(self.teacher_epochs * steps_per_epoch * self.teacher_warmup_share))


@dataclass(frozen=True)
class SynthesisSettings(InversionPreset):
    """The resolved settings that define an inversion run (compared on --resume): the objective preset's,
    overridden by the flags given, and everything else the images depend on."""

    preset: str
    resolution: int
    jitter_px: int
    bpid_margin: float
    bpid_lambda: float
    adi: float
    adi_temperature: float
    images_per_class: int
    batch_size: int
    seed: int
    num_classes: int
    targets: tuple[int, ...]
    teacher: str
    amp: bool
    compile: bool

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["targets"] = list(self.betas), list(self.targets)  # as JSON reads them back
        return d


def _int_list(text: str, flag_name: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise InputError(f"{flag_name} must be comma-separated class indices, got '{text}'") from None


@dataclass(frozen=True, kw_only=True)
class InvertConfig:
    """Every setting of python -m dearkd_fast.invert."""

    teacher_ckpt: str | None = flag(None, "teacher.pt written by the trainer (holds everything else)", group="teacher")
    teacher: str | None = flag(None, "timm name, or tv:<name> for torchvision (random weights unless --pretrained "
                               "or --teacher-weights)", group="teacher")
    pretrained: bool = flag(False, "load --teacher's published weights from the local timm / torch hub cache "
                            "(nothing downloads here: a clear error says where to put them)", group="teacher")
    teacher_weights: str | None = flag(None, "a plain state dict (or {'model' | 'state_dict': ...}) for --teacher",
                                       group="teacher")
    num_classes: int | None = flag(None, "classes of a --teacher given by name (default with --pretrained or "
                                   "--teacher-weights: the weights' own)", group="teacher")
    class_names: str | None = flag(None, "comma-separated class folder names, in label order (default: zero-padded "
                                   "indices)", group="teacher")
    targets: str | None = flag(None, "comma-separated class indices to synthesise (default: every class)",
                               group="targets")
    num_targets: int | None = flag(None, "synthesise K classes drawn at random by --seed", group="targets")
    preset: str = flag("dearkd", "objective and schedule: 'dearkd' (ours, BPID on) or 'deepinversion' (the public "
                       "code term by term); the size (<= 64 px or larger) picks the variant", group="synthesis",
                       choices=OBJECTIVES)
    images_per_class: int = flag(16, "images of every class", group="synthesis")
    batch_size: int = flag(64, "images optimised together (batches cycle through the classes)", group="synthesis")
    resolution: int | None = flag(None, "image side (default: the teacher's input size)", group="synthesis")
    iterations: int | None = flag(None, "iterations at full resolution", group="synthesis", preset="iterations")
    low_res_iterations: int | None = flag(None, "iterations of a first phase at half resolution (0: none)",
                                          group="synthesis", preset="low_res_iterations")
    lr: float | None = flag(None, "Adam learning rate (warm-up, then cosine per phase or constant, as the preset)",
                            group="synthesis", preset="lr")
    r_bn: float | None = flag(None, "BN-statistics weight", group="synthesis", preset="r_bn")
    first_bn_mult: float | None = flag(None, "multiplier of the first BN layer", group="synthesis", preset="first_bn_mult")
    tv_l2: float | None = flag(None, "L2 total variation weight", group="synthesis", preset="tv_l2")
    tv_l1: float | None = flag(None, "L1 total variation weight", group="synthesis", preset="tv_l1")
    l2: float | None = flag(None, "weight of the images' L2 norm (per image, batch mean)", group="synthesis",
                            preset="l2")
    jitter: int | None = flag(None, "max random roll in pixels at full resolution (default: the preset's, scaled to "
                              "the resolution)", group="synthesis")
    flip: bool | None = flag(None, "random horizontal flip", group="synthesis", preset="flip")
    bpid: float | None = flag(None, "weight of the boundary-preserving intra-divergence loss (0: off)",
                              group="synthesis", preset="bpid")
    bpid_margin: float = flag(1.0, "logit margin m of L_BPID", group="synthesis")
    bpid_lambda: float = flag(0.3, "weight lambda_b of L_BPID's boundary term", group="synthesis")
    adi: float = flag(0.0, "Adaptive DeepInversion competition weight (needs a student)", group="adi")
    adi_temperature: float = flag(3.0, "softmax temperature of the ADI competition term", group="adi")
    student_ckpt: str | None = flag(None, "student.pt of the trainer as the ADI student", group="adi")
    student: str | None = flag(None, "any timm name or tv:<name> as the ADI student (with --student-weights or "
                               "--student-pretrained)", group="adi")
    student_weights: str | None = flag(None, "a plain state dict for --student", group="adi")
    student_pretrained: bool = flag(False, "--student's published weights from the local cache", group="adi")
    output: str = flag(help="ImageFolder to write", group="run")
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check(self.teacher_ckpt is not None or self.teacher is not None,
               "give --teacher-ckpt (a teacher.pt) or --teacher NAME (with --num-classes, --pretrained or "
               "--teacher-weights)")
        _check(self.teacher_ckpt is None or not (self.pretrained or self.teacher_weights),
               "--pretrained / --teacher-weights go with --teacher NAME, not --teacher-ckpt")
        _check(not (self.pretrained and self.teacher_weights), "give --pretrained or --teacher-weights, not both")
        _check(self.teacher_ckpt is not None or bool(self.num_classes) or self.pretrained or bool(self.teacher_weights),
               "--teacher NAME needs --num-classes (or --pretrained / --teacher-weights)")
        _check(self.images_per_class >= 1, f"--images-per-class must be >= 1, got {self.images_per_class}")
        _check(self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}")
        has_student = bool(self.student_ckpt or self.student)
        _check(not (self.adi > 0 and not has_student), "--adi needs a student: --student-ckpt or --student NAME")
        _check(not (self.student_ckpt and self.student), "give --student-ckpt or --student, not both")
        _check(self.student is not None or not (self.student_weights or self.student_pretrained),
               "--student-weights / --student-pretrained go with --student NAME")
        _check(not (self.targets and self.num_targets), "give --targets or --num-targets, not both")
        if self.targets:
            _check(all(t >= 0 for t in self.target_list), f"--targets must be class indices >= 0, got {self.targets}")
            _check(len(set(self.target_list)) == len(self.target_list), f"--targets repeats a class: {self.targets}")
        _check(self.num_targets is None or self.num_targets >= 1, f"--num-targets must be >= 1, got {self.num_targets}")
        _check(bool(self.output), "--output must not be empty")
        _check(self.run.amp_dtype == "bfloat16", "invert: --amp-dtype float16 is not supported (images are optimised "
               "without a gradient scaler); use bfloat16")
        _check(self.num_classes is None or self.num_classes >= 1, f"--num-classes must be >= 1, got {self.num_classes}")
        _check(self.iterations is None or self.iterations >= 1, f"--iterations must be >= 1, got {self.iterations}")
        _check(self.low_res_iterations is None or self.low_res_iterations >= 0,
               f"--low-res-iterations must be >= 0, got {self.low_res_iterations}")
        _check(self.resolution is None or self.resolution >= 8, f"--resolution must be >= 8, got {self.resolution}")
        _check(self.jitter is None or self.jitter >= 0, f"--jitter must be >= 0, got {self.jitter}")
        _finite("--lr", self.lr, low=0.0, low_open=True)
        for name in ("r_bn", "first_bn_mult", "tv_l2", "tv_l1", "l2", "bpid", "bpid_lambda", "adi"):
            _finite("--" + name.replace("_", "-"), getattr(self, name), low=0.0)
        _finite("--adi-temperature", self.adi_temperature, low=0.0, low_open=True)
        _finite("--bpid-margin", self.bpid_margin)

    @property
    def target_list(self) -> tuple[int, ...]:
        return _int_list(self.targets, "--targets") if self.targets else ()

    def synthesis(self, teacher_arch: str, num_classes: int, input_size: int) -> SynthesisSettings:
        """The settings of this run for a teacher: flags where given, else the objective preset's at this size."""
        res = self.resolution or input_size
        base = inversion_preset(self.preset, res)
        values = {k: (getattr(self, k) if getattr(self, k, None) is not None else v)
                  for k, v in dataclasses.asdict(base).items()}
        values["betas"] = tuple(values["betas"])
        _check(values["low_res_iterations"] == 0 or res >= 16,
               f"a half-resolution phase needs --resolution >= 16 (got {res}); pass --low-res-iterations 0")
        targets = self.target_list or self.random_targets(num_classes)
        _check(all(t < num_classes for t in targets),
               f"--targets: class {max(targets)} does not exist (the teacher has {num_classes} classes)")
        jitter_px = self.jitter if self.jitter is not None else max(1, round(base.jitter * res / base.jitter_side))
        return SynthesisSettings(
            **values, preset=self.preset, resolution=res, jitter_px=jitter_px, bpid_margin=self.bpid_margin,
            bpid_lambda=self.bpid_lambda, adi=self.adi, adi_temperature=self.adi_temperature,
            images_per_class=self.images_per_class, batch_size=self.batch_size, seed=self.run.seed,
            num_classes=num_classes, targets=tuple(targets), teacher=teacher_arch, amp=self.run.amp,
            compile=self.run.compile)

    def random_targets(self, num_classes: int) -> tuple[int, ...]:
        """Every class, or --num-targets of them drawn by --seed (sorted)."""
        if not self.num_targets:
            return tuple(range(num_classes))
        _check(self.num_targets <= num_classes,
               f"--num-targets {self.num_targets} exceeds the teacher's {num_classes} classes")
        g = torch.Generator().manual_seed(self.run.seed)
        return tuple(sorted(torch.randperm(num_classes, generator=g)[: self.num_targets].tolist()))


# ---------------------------------------------------------------------------------------------- parsing



@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Every setting of python -m dearkd_fast.eval: a student.pt on a validation split."""

    checkpoint: str = flag("", "student.pt (or student_ema.pt) written by the trainer", group="eval")
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = flag(128, "images per forward (the trainer validates with twice its --batch-size)", group="eval")
    json: str | None = flag(None, "also write the results to this JSON file", group="eval")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N", group="run")
    amp: bool = flag(False, "autocast (bf16 unless --amp-dtype), as the run validated with --amp", group="run")
    amp_dtype: str = flag("bfloat16", "autocast dtype", group="run", choices=("bfloat16", "float16"))
    no_progress: bool = flag(False, "no progress bar", group="run")

    def __post_init__(self):
        _check(bool(self.checkpoint), "--checkpoint is required (a student.pt)")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        resolve_device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype:
        return autocast_dtype(self.amp_dtype)


@dataclass(frozen=True, kw_only=True)
class NativeConfig:
    """Every setting of python -m dearkd_fast.native: build the native CPU backend (kernels/native/)."""

    force: bool = flag(False, "rebuild even when a library for these sources, this torch and this CPU exists",
                       group="build")
    strict: bool = flag(False, "exit 1 when the library cannot be built (default: say why, exit 0: the package "
                        "works without it, backend 'native' is then absent)", group="build")
    no_progress: bool = flag(False, "no progress bar", group="run")


def _tier_help(key: str) -> str:
    vals = {t: getattr(v, key) for t, v in STUDY_TIERS.items()}
    show = {t: ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else
            "-" if v is None else str(v) for t, v in vals.items()}
    return "default: " + ", ".join(f"{v} ({t})" for t, v in show.items())


def _tier_flag(key: str, help: str):
    return flag(None, f"{help} ({_tier_help(key)})", group="grid")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Every setting of python -m dearkd_fast.study; None falls back to the tier's value."""

    config: str | None = flag(None, "YAML file (or bundled recipe name: dearkd_fast/recipes/) of flag: value pairs; "
                              "flags given override it", group="config")
    data: str = flag("cifar10", "the data set: 'cifar10[:TARBALL_DIR]', 'digits' or an ImageFolder (students and "
                     "teacher are evaluated on its validation split)", group="study")
    tier: str = flag("cpu", "'cpu' (the 2-core CPU machine, within 45 minutes), 'cpu-long' (scarce data with a strong "
                     "teacher, settings tuned on a hold-out; within 180 minutes of it) or 'gpu' (the full grid, one GPU)",
                     group="study", choices=tuple(STUDY_TIERS))
    output: str | None = flag(None, "study folder (rerun the same command to continue an interrupted study)",
                              group="study", shown="results/<data>-<tier>")
    fractions: str | None = _tier_flag("fractions", "comma-separated shares of the training split")
    seeds: int | None = _tier_flag("seeds", "seeds per method and fraction")
    epochs: int | None = _tier_flag("epochs", "student epochs (every method), where no --steps")
    steps: str | None = _tier_flag("steps", "comma-separated optimiser steps of every student at each fraction (one "
                                   "number: at all), its epochs following from its set's size")
    teacher_epochs: int | None = _tier_flag("teacher_epochs", "teacher epochs on the whole training split")
    batch_size: int | None = _tier_flag("batch_size", "batch size of every student")
    val_fraction: float | None = _tier_flag("val_fraction", "class-balanced share of the validation split evaluated")
    workers: int | None = _tier_flag("workers", "data loading workers of each run")
    data_free: bool = flag(True, "also the data-free rows (synthesised images, with and without BPID)", group="grid")
    synthetic_per_class: int | None = _tier_flag("synthetic_per_class", "data-free: images synthesised per class")
    synthetic_epochs: int | None = _tier_flag("synthetic_epochs", "data-free: student epochs")
    invert_iterations: int | None = _tier_flag("invert_iterations", "data-free: inversion iterations per phase")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N", group="run")
    deterministic: bool = flag(False, "every trainer run with --deterministic (a study killed and rerun anywhere then "
                               "ends with the same numbers)", group="run")
    no_progress: bool = flag(False, "no progress bar", group="run")

    def __post_init__(self):
        resolve_device(self.device)
        t = self.settings
        _check(all(0.0 < f <= 1.0 for f in t.fractions) and len(set(t.fractions)) == len(t.fractions),
               f"--fractions must be distinct shares in (0, 1], got {self.fractions}")
        for name in ("seeds", "epochs", "teacher_epochs", "batch_size", "synthetic_per_class", "synthetic_epochs",
                     "invert_iterations"):
            _check(getattr(t, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(t, name)}")
        _check(t.steps is None or (all(n >= 1 for n in t.steps) and len(t.steps) in (1, len(t.fractions))),
               f"--steps must be one count >= 1, or one for each of the {len(t.fractions)} fractions, got {t.steps}")
        _check(t.workers >= 0, f"--workers must be >= 0, got {t.workers}")
        _finite("--val-fraction", t.val_fraction, low=0.0, low_open=True, high=1.0)

    @property
    def settings(self) -> StudyTier:
        """The tier with this command's overrides."""
        base = STUDY_TIERS[self.tier]
        over = {f.name: getattr(self, f.name) for f in dataclasses.fields(StudyTier)
                if hasattr(self, f.name) and getattr(self, f.name) is not None}
        if "fractions" in over:
            try:
                over["fractions"] = tuple(float(x) for x in self.fractions.split(",") if x.strip())
            except ValueError:
                raise InputError(f"--fractions must be comma-separated numbers, got '{self.fractions}'") from None
            _check(bool(over["fractions"]), "--fractions must name at least one share")
        if "steps" in over:
            try:
                over["steps"] = tuple(int(x) for x in self.steps.split(",") if x.strip())
            except ValueError:
                raise InputError(f"--steps must be comma-separated whole numbers, got '{self.steps}'") from None
        return dataclasses.replace(base, **over)

    @property
    def folder(self) -> str:
        from .data.folder import data_name

        return self.output or os.path.join("results", f"{data_name(self.data)}-{self.tier}")


TOOL_CONFIGS = {"train": TrainConfig, "invert": InvertConfig, "eval": EvalConfig, "study": StudyConfig,
                "native": NativeConfig}

if __name__ == "__main__":  # python -m dearkd_fast.config train|invert|study|native: a tool's flag table for docs/cli.md
    print(flag_table(TOOL_CONFIGS[sys.argv[1]]), end="")
