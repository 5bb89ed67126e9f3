"""python -m dearkd_fast.train: the two-stage DearKD trainer.

With no arguments: trains a CIFAR-style ResNet teacher on the built-in `digits` set, then the
DearKD student through stage 1 (CE + KD + early-feature alignment) and stage 2 (labels only),
and prints a results table. Exit 0 on success, 2 on bad input (one line), 1 on a run-time failure.

The run is a short sequence of steps: check_inputs -> load_data -> prepare_teacher ->
build_student -> resume -> fit -> finalise.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.nn as nn
from tqdm import tqdm

from . import config, engine, ops
from .checkpoint import atomic_save, atomic_write_json, load_checkpoint, rng_state, set_rng_state
from .cli import check_output, run_cli
from .config import TrainConfig
from .data import DataBundle, InputSpec, build_data
from .errors import CheckpointError, InputError
from .losses import DearKDLoss, SupervisedLoss
from .models.student import save_student
from .models.teacher import Teacher, TeacherSpec, create_teacher_model, load_teacher, save_teacher

PROG = "dearkd_fast.train"
DESCRIPTION = __doc__.split("\n\n")[0]
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "student.pt")
log = tqdm.write


def build_parser():
    return config.build_parser(TrainConfig, f"python -m {PROG}", DESCRIPTION)


@dataclass
class Student:
    """The trainable side of a run: the student, its criterion (holding the alignment projections),
    the optimizer and schedule over both, and the epoch records so far."""

    model: nn.Module
    criterion: DearKDLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    records: list[dict] = field(default_factory=list)
    start_epoch: int = 0


# ---------------------------------------------------------------------------------------------- steps


def check_inputs(cfg: TrainConfig) -> None:
    """What can be refused before any work: unknown model, occupied output, missing files, backend."""
    if not timm.is_model(cfg.model):
        raise InputError(f"unknown student model '{cfg.model}'")
    check_output(cfg.output, RUN_FILES, cfg.run.resume, cfg.run.overwrite, "checkpoint.pt")
    if cfg.teacher_ckpt is not None and not os.path.isfile(cfg.teacher_ckpt):
        raise InputError(f"--teacher-ckpt '{cfg.teacher_ckpt}' does not exist")
    if cfg.run.backend != "auto":
        ops.resolve_backend(cfg.run.backend, torch.empty(0, device=cfg.run.torch_device))  # fail now, not mid-epoch


def load_data(cfg: TrainConfig, device: torch.device) -> tuple[DataBundle, InputSpec]:
    """Scan, split and load the images at the student's input size and normalisation."""
    inputs = InputSpec.of_model(cfg.model)
    data = build_data(cfg.data, inputs, batch_size=cfg.batch_size, seed=cfg.run.seed, device=device, amp=cfg.run.amp,
                      progress=cfg.run.progress)
    log(f"data: {data.name}, {len(data.classes)} classes, {data.num_train} train / {data.num_val} val images"
        + (f", {len(data.skipped)} undecodable files skipped" if data.skipped else "")
        + (f", empty classes: {', '.join(data.empty_classes)}" if data.empty_classes else ""))
    return data, inputs


def prepare_teacher(cfg: TrainConfig, data: DataBundle, inputs: InputSpec, device: torch.device) -> Teacher | None:
    """Load --teacher-ckpt (or this run's teacher.pt on --resume), else train one; evaluate it; None
    when no epoch of stage 1 needs it."""
    if not cfg.needs_teacher:
        return None
    own = os.path.join(cfg.output, "teacher.pt")
    path = cfg.teacher_ckpt or (own if cfg.run.resume and os.path.isfile(own) else None)
    if path:
        model, spec = load_teacher(path, num_classes=len(data.classes), class_names=list(data.classes))
        model = model.to(device)
        log(f"teacher: {spec.arch} from {path}")
    else:
        model, spec = train_teacher(cfg, data, inputs, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    taps = cfg.teacher_taps.split(",") if cfg.teacher_taps else None
    teacher = Teacher(model, spec, taps, input_norm=(inputs.mean, inputs.std))
    spec.top1 = engine.evaluate(lambda x: teacher(x)[0], data.val, device=device, amp=cfg.run.amp, desc="teacher eval",
                                progress=cfg.run.progress)["top1"]
    if not path:
        save_teacher(model, spec, own)
    log(f"teacher {spec.arch}: top-1 {spec.top1:.2f}% (taps {', '.join(teacher.taps)})")
    return teacher


def train_teacher(cfg: TrainConfig, data: DataBundle, inputs: InputSpec, device: torch.device) -> tuple[nn.Module, TeacherSpec]:
    """Train --teacher from scratch on the run's data (CE, AdamW, warm-up + cosine)."""
    model = create_teacher_model(cfg.teacher, len(data.classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(param_groups([model], cfg.teacher_weight_decay), cfg.teacher_lr, device)
    steps_per_epoch = len(data.train)
    sched = engine.cosine_schedule(opt, cfg.teacher_warmup_steps(steps_per_epoch), cfg.teacher_epochs * steps_per_epoch)
    crit = SupervisedLoss(nn.CrossEntropyLoss())
    for epoch in range(cfg.teacher_epochs):
        stats = engine.train_one_epoch(model, crit, data.train, opt, sched, device=device, amp=cfg.run.amp,
                                       desc=f"teacher {epoch + 1}/{cfg.teacher_epochs}", progress=cfg.run.progress)
        log(f"teacher epoch {epoch + 1}/{cfg.teacher_epochs}  loss {stats['loss']:.4f}")
    spec = TeacherSpec(arch=cfg.teacher, num_classes=len(data.classes), class_names=list(data.classes),
                       input_size=inputs.size, mean=inputs.mean, std=inputs.std)
    return model, spec


def build_student(cfg: TrainConfig, num_classes: int, teacher: Teacher | None, steps_per_epoch: int,
                  device: torch.device) -> Student:
    """The student, its DearKD criterion, AdamW over both and the per-step warm-up + cosine schedule."""
    model = timm.create_model(cfg.model, num_classes=num_classes).to(device)
    align = teacher is not None and cfg.beta > 0
    model.set_tap_blocks(range(model.num_mhca) if align else ())
    criterion = DearKDLoss(
        base_criterion(cfg), teacher, distillation_type=cfg.distillation_type, alpha=cfg.alpha, tau=cfg.tau,
        beta=cfg.beta, embed_dim=model.embed_dim, grid_size=model.grid_size,
        num_align=len(model.tap_blocks) if teacher is not None else 0,
        standardize_target=cfg.align_standardize, backend=cfg.run.backend,
    ).to(device)
    optimizer = make_optimizer(param_groups([model, criterion], cfg.weight_decay), cfg.lr, device)
    scheduler = engine.cosine_schedule(optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch,
                                       cfg.min_lr_ratio)
    return Student(model, criterion, optimizer, scheduler)


def resume(cfg: TrainConfig, s: Student) -> None:
    """On --resume: restore the last finished epoch (weights, optimizer, schedule, records, RNG) and
    cut metrics.jsonl back to it; otherwise start metrics.jsonl afresh."""
    metrics = os.path.join(cfg.output, "metrics.jsonl")
    if not cfg.run.resume:
        if os.path.exists(metrics):
            os.remove(metrics)
        return
    ck = load_checkpoint(os.path.join(cfg.output, "checkpoint.pt"))
    try:
        s.model.load_state_dict(ck["student"])
        s.criterion.load_state_dict(ck["criterion"], strict=False)
        s.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"--resume: checkpoint.pt in '{cfg.output}' does not fit this model "
                              f"({type(e).__name__}); resume with the run's original flags") from None
    s.scheduler.load_state_dict(ck["scheduler"])
    s.records, s.start_epoch = ck["records"], ck["epoch"] + 1
    set_rng_state(ck["rng"])
    with open(metrics, "w") as f:  # drop lines of epochs after the checkpoint
        f.writelines(json.dumps(r) + "\n" for r in s.records)
    log(f"resumed from epoch {s.start_epoch}")


def fit(cfg: TrainConfig, s: Student, data: DataBundle, teacher: Teacher | None, device: torch.device) -> None:
    """Stage 1 for epochs < E1, stage 2 after; one record per epoch, appended to metrics.jsonl, and a
    checkpoint at every epoch end."""
    net = torch.compile(s.model) if cfg.run.compile else s.model
    mix = mixup_fn(cfg, len(data.classes))
    for epoch in range(s.start_epoch, cfg.epochs):
        stage = 1 if epoch < cfg.switch_epoch else 2
        s.criterion.set_stage(stage)
        data.train.set_epoch(epoch)
        t0, calls0 = time.time(), teacher.calls if teacher is not None else 0
        train = engine.train_one_epoch(net, s.criterion, data.train, s.optimizer, s.scheduler, device=device,
                                       amp=cfg.run.amp, mixup_fn=mix, max_norm=cfg.max_norm,
                                       desc=f"stage {stage} epoch {epoch + 1}/{cfg.epochs}", progress=cfg.run.progress)
        train_time = time.time() - t0
        val = engine.evaluate(s.model, data.val, device=device, amp=cfg.run.amp, progress=cfg.run.progress)
        rec = {"epoch": epoch, "stage": stage, "train": train, "val_top1": val["top1"], "val_top5": val["top5"],
               "val_loss": val["loss"], "num_val_samples": val["num_samples"], "train_time_s": round(train_time, 3),
               "images_per_s": round(data.num_train / max(train_time, 1e-9), 1),
               "teacher_calls": (teacher.calls - calls0) if teacher is not None else 0}
        s.records.append(rec)
        with open(os.path.join(cfg.output, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        terms = "  ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "lr")
        log(f"epoch {epoch + 1}/{cfg.epochs} stage {stage}  {terms}  val top-1 {val['top1']:.2f}%  ({train_time:.1f}s)")
        atomic_save({"epoch": epoch, "student": s.model.state_dict(), "criterion": s.criterion.state_dict(),
                     "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), "records": s.records,
                     "rng": rng_state(), "args": config.flat(cfg), "classes": data.classes},
                    os.path.join(cfg.output, "checkpoint.pt"))


def finalise(cfg: TrainConfig, s: Student, data: DataBundle, inputs: InputSpec, teacher: Teacher | None,
             device: torch.device, t_start: float) -> dict:
    """Write student.pt and summary.json, print the results table."""
    save_student(s.model, cfg.model, data.classes, inputs, os.path.join(cfg.output, "student.pt"))
    records = s.records
    stage1 = [r for r in records if r["stage"] == 1]
    summary = {
        "final_top1": records[-1]["val_top1"],
        "final_top5": records[-1]["val_top5"],
        "best_top1": max(r["val_top1"] for r in records),
        "stage1_top1": stage1[-1]["val_top1"] if stage1 else None,
        "teacher_top1": teacher.spec.top1 if teacher is not None else None,
        "teacher": teacher.spec.arch if teacher is not None else None,
        "model": cfg.model,
        "data": data.name,
        "num_classes": len(data.classes),
        "num_train_samples": data.num_train,
        "num_val_samples": records[-1]["num_val_samples"],
        "skipped_files": len(data.skipped),
        "skipped_paths": data.skipped[:100],
        "empty_classes": data.empty_classes,
        "stage_switch_epoch": cfg.switch_epoch,
        "epochs": records,
        "device": str(device),
        "elapsed_s": round(time.time() - t_start, 1),
        "args": config.flat(cfg),
    }
    atomic_write_json(summary, os.path.join(cfg.output, "summary.json"))
    print_table(summary)
    return summary


def run(cfg: TrainConfig) -> dict:
    t_start = time.time()
    check_inputs(cfg)
    device = cfg.run.torch_device
    os.makedirs(cfg.output, exist_ok=True)
    seed_everything(cfg.run.seed)
    data, inputs = load_data(cfg, device)
    teacher = prepare_teacher(cfg, data, inputs, device)
    student = build_student(cfg, len(data.classes), teacher, len(data.train), device)
    resume(cfg, student)
    fit(cfg, student, data, teacher, device)
    return finalise(cfg, student, data, inputs, teacher, device, t_start)


# ---------------------------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for mod in modules:
        skip = mod.no_weight_decay() if hasattr(mod, "no_weight_decay") else set()
        for name, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused implementation on CUDA."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def base_criterion(cfg: TrainConfig) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixes:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing)
    return nn.CrossEntropyLoss()


def mixup_fn(cfg: TrainConfig, num_classes: int):
    if not cfg.mixes:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=num_classes)


def print_table(s: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"

    rows = [("teacher " + (s["teacher"] or "(none)"), pct(s["teacher_top1"])),
            (f"student {s['model']} after stage 1", pct(s["stage1_top1"])),
            (f"student {s['model']} final", pct(s["final_top1"]))]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'model':<{w}}  top-1 ({s['data']} val, {s['num_val_samples']} images)")
    for name, v in rows:
        print(f"{name:<{w}}  {v}")
    print(f"elapsed {s['elapsed_s']:.0f}s on {s['device']}\n")


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, TrainConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
