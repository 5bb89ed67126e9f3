"""python -m dearkd_fast.train: the two-stage DearKD trainer.

With no arguments: trains a CIFAR-style ResNet teacher on the built-in `digits` set, then the
DearKD student through stage 1 (CE + KD + early-feature alignment) and stage 2 (labels only),
and prints a results table. Exit 0 on success, 2 on bad input (one line), 1 on a run-time failure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import timm
import torch
import torch.nn as nn
from tqdm import tqdm

from . import engine, ops
from .cli import Parser, UsageError, check_output, pick_device, run_cli
from .checkpoint import atomic_save, atomic_write_json, load_checkpoint, rng_state, set_rng_state
from .data import DataConfig, build_data
from .losses import DearKDLoss, SupervisedLoss
from .models.teacher import Teacher, TeacherCheckpointError, TeacherSpec, create_teacher_model, load_teacher, save_teacher

PROG = "dearkd_fast.train"
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "student.pt")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="digits", help="ImageFolder root, 'digits' (built in), or 'cifar10[:TARBALL_DIR]'")
    d.add_argument("--val-data", default=None, help="validation ImageFolder (default: the built-in set's split, "
                   "else a class-balanced 10%% hold-out of --data)")
    d.add_argument("--data-fraction", type=float, default=1.0, help="class-balanced share of the training images, in (0, 1]")
    d.add_argument("--allow-empty-classes", action="store_true", help="report empty class folders instead of failing")
    d.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading workers/threads")
    d.add_argument("--dali", action="store_true", help="decode and augment with NVIDIA DALI (GPU when --device is CUDA)")
    d.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (default 0 on digits, else 0.5)")
    d.add_argument("--randaug", default=None, help="timm RandAugment string, e.g. rand-m9-mstd0.5")
    d.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    d.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    d.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    m = p.add_argument_group("models")
    m.add_argument("--model", default="dearkd_micro_patch4_32", help="student (timm name, dearkd_*)")
    m.add_argument("--teacher", default="cifar_resnet8", help="teacher architecture (timm name or tv:<torchvision name>)")
    m.add_argument("--teacher-ckpt", default=None, help="teacher.pt to load instead of training a teacher")
    m.add_argument("--teacher-epochs", type=int, default=10, help="epochs to train the teacher when no --teacher-ckpt")
    m.add_argument("--teacher-lr", type=float, default=2e-3)
    m.add_argument("--teacher-taps", default=None, help="comma-separated teacher modules to align to (default: first two stages)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=20)
    o.add_argument("--stage1-epochs", type=int, default=None, help="E1: epochs of stage 1 (default: 2/3 of --epochs)")
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--min-lr-ratio", type=float, default=0.01)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-epochs", type=int, default=2)
    o.add_argument("--max-norm", type=float, default=None, help="gradient clipping norm")
    k = p.add_argument_group("distillation")
    k.add_argument("--alpha", type=float, default=0.5, help="weight of KD against CE in stage 1")
    k.add_argument("--beta", type=float, default=1.0, help="weight of the feature-alignment losses")
    k.add_argument("--distillation-type", choices=["hard", "soft"], default="hard")
    k.add_argument("--tau", type=float, default=1.0, help="soft-KD temperature")
    k.add_argument("--align-standardize", action="store_true", help="per-channel standardise teacher maps before alignment")
    r = p.add_argument_group("run")
    r.add_argument("--output", default=None, help="output folder (default runs/<date-time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --output")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    r.add_argument("--amp", action="store_true", help="bf16 autocast")
    r.add_argument("--compile", action="store_true", help="torch.compile the student")
    r.add_argument("--backend", default="auto", choices=list(ops.BACKENDS), help="loss kernels (dearkd_fast.ops)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.stage1_epochs is None:
        args.stage1_epochs = (2 * args.epochs + 2) // 3
    if not 0 <= args.stage1_epochs <= args.epochs:
        raise UsageError(f"--stage1-epochs must be in [0, --epochs={args.epochs}], got {args.stage1_epochs}")
    if not 0.0 < args.data_fraction <= 1.0:
        raise UsageError(f"--data-fraction must be in (0, 1], got {args.data_fraction}")
    if args.batch_size < 1 or args.lr <= 0 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1, --lr > 0 and --workers >= 0")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError("--mixup/--cutmix need an even --batch-size")
    if args.teacher_ckpt is None and args.teacher_epochs < 1 and args.stage1_epochs > 0:
        raise UsageError("stage 1 needs a teacher: give --teacher-ckpt or --teacher-epochs >= 1")
    if not timm.is_model(args.model):
        raise UsageError(f"unknown student model '{args.model}'")
    if args.output is None:
        args.output = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    check_output(args.output, RUN_FILES, args.resume, args.overwrite, "checkpoint.pt")
    if args.teacher_ckpt is not None and not os.path.isfile(args.teacher_ckpt):
        raise UsageError(f"--teacher-ckpt '{args.teacher_ckpt}' does not exist")
    args.device = pick_device(args.device)


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


def base_criterion(args) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if args.mixup > 0 or args.cutmix > 0:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing)
    return nn.CrossEntropyLoss()


def mixup_fn(args, num_classes: int):
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=num_classes)


def train_teacher(args, data, device: torch.device, log) -> tuple[nn.Module, TeacherSpec]:
    """Train args.teacher from scratch on the run's data (CE, AdamW, cosine) and return it with its spec."""
    model = create_teacher_model(args.teacher, len(data.classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(param_groups([model], 5e-4), args.teacher_lr, device)
    steps = args.teacher_epochs * len(data.train)
    sched = engine.cosine_schedule(opt, min(len(data.train), steps // 10), steps)
    crit = SupervisedLoss(nn.CrossEntropyLoss())
    for epoch in range(args.teacher_epochs):
        stats = engine.train_one_epoch(model, crit, data.train, opt, sched, device=device, amp=args.amp,
                                       desc=f"teacher {epoch + 1}/{args.teacher_epochs}", progress=not args.no_progress)
        log(f"teacher epoch {epoch + 1}/{args.teacher_epochs}  loss {stats['loss']:.4f}")
    spec = TeacherSpec(arch=args.teacher, num_classes=len(data.classes), class_names=list(data.classes),
                       input_size=args.input_size, mean=tuple(args.mean), std=tuple(args.std))
    return model, spec


def run(args: argparse.Namespace) -> dict:
    t_start = time.time()
    device = torch.device(args.device)
    out = args.output
    os.makedirs(out, exist_ok=True)
    log = tqdm.write
    seed_everything(args.seed)
    if args.backend != "auto":
        ops.resolve_backend(args.backend, torch.empty(0, device=device))  # fail now, not mid-epoch

    probe = timm.create_model(args.model, num_classes=1)
    cfg = probe.pretrained_cfg
    args.input_size, args.mean, args.std = cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"])
    del probe
    data = build_data(DataConfig(
        data=args.data, val_data=args.val_data, input_size=args.input_size, mean=args.mean, std=args.std,
        crop_pct=cfg.get("crop_pct", 1.0), batch_size=args.batch_size, workers=args.workers, hflip=args.hflip,
        randaug=args.randaug, data_fraction=args.data_fraction, seed=args.seed,
        allow_empty_classes=args.allow_empty_classes, backend="dali" if args.dali else "torch",
        device=str(device), amp=args.amp, progress=not args.no_progress))
    num_classes = len(data.classes)
    log(f"data: {data.name}, {num_classes} classes, {data.num_train} train / {data.num_val} val images"
        + (f", {len(data.skipped)} undecodable files skipped" if data.skipped else "")
        + (f", empty classes: {', '.join(data.empty_classes)}" if data.empty_classes else ""))

    # ---- teacher: load, reuse this run's, or train
    teacher = None
    teacher_top1 = None
    own_teacher = os.path.join(out, "teacher.pt")
    if args.stage1_epochs > 0:
        ckpt_path = args.teacher_ckpt or (own_teacher if args.resume and os.path.isfile(own_teacher) else None)
        if ckpt_path:
            tmodel, spec = load_teacher(ckpt_path, num_classes=num_classes)
            if spec.class_names != list(data.classes):
                raise TeacherCheckpointError(
                    f"teacher checkpoint '{ckpt_path}' has classes {spec.class_names[:3]}... but the data has "
                    f"{list(data.classes)[:3]}... (same count, different names or order)")
            tmodel = tmodel.to(device)
            log(f"teacher: {spec.arch} from {ckpt_path}")
        else:
            tmodel, spec = train_teacher(args, data, device, log)
        if device.type == "cuda":
            tmodel = tmodel.to(memory_format=torch.channels_last)
        taps = args.teacher_taps.split(",") if args.teacher_taps else None
        teacher = Teacher(tmodel, spec, taps, input_norm=(args.mean, args.std))
        teacher_top1 = engine.evaluate(lambda x: teacher(x)[0], data.val, device=device, amp=args.amp, desc="teacher eval",
                                       progress=not args.no_progress)["top1"]
        spec.top1 = teacher_top1
        if not ckpt_path:
            save_teacher(tmodel, spec, own_teacher)
        log(f"teacher {spec.arch}: top-1 {teacher_top1:.2f}% (taps {', '.join(teacher.taps)})")

    # ---- student and criterion
    student = timm.create_model(args.model, num_classes=num_classes).to(device)
    if args.stage1_epochs > 0 and args.beta > 0:
        student.set_tap_blocks(range(student.num_mhca))
    else:
        student.set_tap_blocks(())
    criterion = DearKDLoss(
        base_criterion(args), teacher, distillation_type=args.distillation_type, alpha=args.alpha, tau=args.tau,
        beta=args.beta, embed_dim=student.embed_dim, grid_size=student.grid_size,
        num_align=len(student.tap_blocks) if teacher is not None else 0,
        standardize_target=args.align_standardize, backend=args.backend,
    ).to(device)
    optimizer = make_optimizer(param_groups([student, criterion], args.weight_decay), args.lr, device)
    steps_per_epoch = len(data.train)
    scheduler = engine.cosine_schedule(optimizer, args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch,
                                       args.min_lr_ratio)
    records: list[dict] = []
    start_epoch = 0
    metrics_path = os.path.join(out, "metrics.jsonl")
    if args.resume:
        ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
        student.load_state_dict(ck["student"])
        criterion.load_state_dict(ck["criterion"], strict=False)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        records, start_epoch = ck["records"], ck["epoch"] + 1
        set_rng_state(ck["rng"])
        with open(metrics_path, "w") as f:  # drop lines of epochs after the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in records)
        log(f"resumed from epoch {start_epoch}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    model = torch.compile(student) if args.compile else student
    mix = mixup_fn(args, num_classes)

    for epoch in range(start_epoch, args.epochs):
        stage = 1 if epoch < args.stage1_epochs else 2
        criterion.set_stage(stage)
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        t0 = time.time()
        calls0 = teacher.calls if teacher is not None else 0
        train_stats = engine.train_one_epoch(model, criterion, data.train, optimizer, scheduler, device=device,
                                             amp=args.amp, mixup_fn=mix, max_norm=args.max_norm,
                                             desc=f"stage {stage} epoch {epoch + 1}/{args.epochs}",
                                             progress=not args.no_progress)
        train_time = time.time() - t0
        val = engine.evaluate(student, data.val, device=device, amp=args.amp, progress=not args.no_progress)
        rec = {"epoch": epoch, "stage": stage, "train": train_stats, "val_top1": val["top1"], "val_top5": val["top5"],
               "val_loss": val["loss"], "num_val_samples": val["num_samples"], "train_time_s": round(train_time, 3),
               "images_per_s": round(data.num_train / max(train_time, 1e-9), 1),
               "teacher_calls": (teacher.calls - calls0) if teacher is not None else 0}
        records.append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        terms = "  ".join(f"{k} {v:.4f}" for k, v in train_stats.items() if k != "lr")
        log(f"epoch {epoch + 1}/{args.epochs} stage {stage}  {terms}  val top-1 {val['top1']:.2f}%  ({train_time:.1f}s)")
        atomic_save({"epoch": epoch, "student": student.state_dict(), "criterion": criterion.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "records": records,
                     "rng": rng_state(), "args": vars(args), "classes": data.classes}, os.path.join(out, "checkpoint.pt"))

    atomic_save({"format": "dearkd_fast.student/1", "model": args.model, "num_classes": num_classes,
                 "class_names": data.classes, "input_size": args.input_size, "mean": args.mean, "std": args.std,
                 "state_dict": student.state_dict()}, os.path.join(out, "student.pt"))
    stage1 = [r for r in records if r["stage"] == 1]
    summary = {
        "final_top1": records[-1]["val_top1"],
        "final_top5": records[-1]["val_top5"],
        "best_top1": max(r["val_top1"] for r in records),
        "stage1_top1": stage1[-1]["val_top1"] if stage1 else None,
        "teacher_top1": teacher_top1,
        "teacher": teacher.spec.arch if teacher is not None else None,
        "model": args.model,
        "data": data.name,
        "num_classes": num_classes,
        "num_train_samples": data.num_train,
        "num_val_samples": records[-1]["num_val_samples"],
        "skipped_files": len(data.skipped),
        "skipped_paths": data.skipped[:100],
        "empty_classes": data.empty_classes,
        "stage_switch_epoch": args.stage1_epochs,
        "epochs": records,
        "device": str(device),
        "elapsed_s": round(time.time() - t_start, 1),
        "args": vars(args),
    }
    atomic_write_json(summary, os.path.join(out, "summary.json"))
    print_table(summary)
    return summary


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
    return run_cli(PROG, build_parser(), validate, run, argv)


if __name__ == "__main__":
    sys.exit(main())
