"""python -m dearkd_fast.train: the two-stage DearKD trainer.

With no arguments: trains a CIFAR-style ResNet teacher on the built-in `digits` set, then the
DearKD student through stage 1 (CE + KD + early-feature alignment) and stage 2 (labels only),
and prints a results table. Exit 0 on success, 2 on bad input (one line), 1 on a run-time failure.

The run is a short sequence of steps: check_inputs -> load_data -> prepare_teacher ->
build_student -> resume -> fit -> finalise.
"""
from __future__ import annotations

import dataclasses
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
from timm.utils import ModelEmaV3
from tqdm import tqdm

from . import config, distributed, engine, ops, teacher_recipe
from .checkpoint import atomic_write_json, load_checkpoint, load_model_file, rng_state, save_rotating, set_rng_state
from .cli import OutputFolder, PeerFolder, StopRequest, run_cli
from .config import TrainConfig
from .data import DataBundle, InputSpec, build_data
from .distributed import Dist
from .errors import CheckpointError, InputError, Stopped
from .losses import DearKDLoss, SupervisedLoss
from .models.student import STUDENT_FORMAT, save_student
from .models.teacher import (
    Teacher,
    TeacherSpec,
    check_teacher_arch,
    create_classifier,
    create_teacher_model,
    has_module,
    load_teacher,
    save_teacher,
    spec_of,
)

PROG = "dearkd_fast.train"
DESCRIPTION = __doc__.split("\n\n")[0]
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "student_ema.pt", "teacher.pt")
# flags that may differ on --resume without making the result inconsistent (--epochs may also grow)
RESUME_FREE = frozenset({"config", "output", "resume", "overwrite", "workers", "no_progress", "device", "compile", "compile_mode",
                         "backend", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "deterministic"})
DIST = Dist()  # this process's place under torchrun (one process without it)


def log(msg: str) -> None:
    if DIST.main:
        tqdm.write(msg)


def build_parser():
    return config.build_parser(TrainConfig, f"python -m {PROG}", DESCRIPTION)


@dataclass
class Student:
    """The trainable side of a run: the student (holding the alignment projections), its criterion (holding
    the teacher, not owning it), the optimizer and schedule, the step that drives them, the epoch records."""

    model: nn.Module
    criterion: DearKDLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: engine.TrainStep
    steps_per_epoch: int = 0
    records: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    resume_state: dict | None = None  # the epoch state of a mid-epoch checkpoint
    ema: nn.Module | None = None  # --model-ema: timm's ModelEmaV3 of the student (projections included)


# ---------------------------------------------------------------------------------------------- steps


def check_teacher_input(teacher: str, student: str) -> None:
    """InputError unless the teacher takes the images the student is fed (a ViT teacher's fixed input size on
    32 px data fails at the first batch otherwise): one forward on the meta device, no memory, no weights."""
    size = timm.models.get_pretrained_cfg(student).input_size[-1]
    with torch.device("meta"):
        tmodel = create_teacher_model(teacher, 2)
        try:
            tmodel.eval()(torch.empty(1, 3, size, size))
        except (AssertionError, RuntimeError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"--teacher {teacher} does not take the {size} px images of --model {student} ({why}); "
                             "choose a teacher for that size") from None


def check_inputs(cfg: TrainConfig) -> tuple[OutputFolder, dict | None]:
    """Everything that can be refused before any work: unknown or unfit models, missing files, an
    impossible backend, the output folder, and on --resume a change of flags. Returns the claimed
    output folder and the checkpoint to resume from (None for a new run)."""
    if not timm.is_model(cfg.model):
        raise InputError(f"unknown student model '{cfg.model}' (see timm.list_models('dearkd_*'))")
    if not is_student(cfg.model):
        raise InputError(f"--model {cfg.model} is not a DearKD student (no distillation head); choose one of "
                         + ", ".join(timm.list_models("dearkd_*")))
    check_student_shape(cfg)
    if cfg.needs_teacher and cfg.teacher_ckpt is None:
        check_teacher_arch(cfg.teacher)
        check_teacher_input(cfg.teacher, cfg.model)
        if cfg.teacher_taps:
            with torch.device("meta"):  # shapes only, no memory
                tmodel = create_teacher_model(cfg.teacher, 2)
            missing = [t for t in cfg.teacher_taps.split(",") if not has_module(tmodel, t)]
            if missing:
                raise InputError(f"--teacher-taps: {cfg.teacher} has no module '{missing[0]}'")
    if cfg.teacher_ckpt is not None:
        if not os.path.isfile(cfg.teacher_ckpt):
            raise InputError(f"--teacher-ckpt '{cfg.teacher_ckpt}' does not exist")
        load_teacher(cfg.teacher_ckpt)  # readable and whole, or refused (CheckpointError) before any data is read
    if cfg.teacher_weights is not None:
        create_classifier(cfg.teacher, weights=cfg.teacher_weights)  # fits --teacher, or refused before any data
    if cfg.finetune is not None:
        arch = finetune_weights(cfg.finetune)[0]
        if arch != cfg.model:
            raise InputError(f"--finetune '{cfg.finetune}' holds a {arch}, not the --model {cfg.model}")
    if cfg.run.backend != "auto":
        ops.resolve_backend(cfg.run.backend, torch.empty(0, device=cfg.run.torch_device))  # fail now, not mid-epoch
    out = OutputFolder.open(cfg.output, PROG, resume=cfg.run.resume, overwrite=cfg.run.overwrite,
                            resume_file="checkpoint.pt", own_names=RUN_FILES)
    if not cfg.run.resume:
        return out, None
    ck = load_checkpoint(os.path.join(out.root, "checkpoint.pt"))
    check_resume_args(ck["args"], config.flat(cfg))
    return out, ck


def check_student_shape(cfg: TrainConfig) -> None:
    """--num-mhca and --align-blocks fit the student's depth (built on the meta device: no memory)."""
    if cfg.num_mhca is None and cfg.align_blocks is None:
        return
    with torch.device("meta"):
        model = timm.create_model(cfg.model, **({"num_mhca": cfg.num_mhca} if cfg.num_mhca is not None else {}))
    depth = len(model.blocks)
    bad = [b for b in cfg.aligned_blocks or [] if b >= depth]
    if bad:
        raise InputError(f"--align-blocks: {cfg.model} has blocks 0-{depth - 1}, not {bad[0]}")
    if cfg.needs_teacher and cfg.beta > 0 and not (cfg.aligned_blocks or model.num_mhca):
        raise InputError("--num-mhca 0 leaves no block to align: give --align-blocks (or --beta 0)")


def check_resume_args(stored: dict, now: dict) -> None:
    """Refuse a --resume whose flags would make the result inconsistent, naming them. Free: the flags of
    RESUME_FREE; --epochs may grow if the stage switch (given or derived) stays where it was."""
    changed = sorted(k for k in now if k not in RESUME_FREE | {"epochs", "stage1_epochs"} and stored.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {stored.get(k)!r} -> {now[k]!r}" for k in changed)
        raise InputError(f"--resume: the run was started with other flags ({diffs}); resume with the original ones")
    if now["epochs"] < stored["epochs"]:
        raise InputError(f"--resume: --epochs may grow, not shrink ({stored['epochs']} -> {now['epochs']})")
    switch = [config.stage_switch(a["epochs"], a["stage1_epochs"]) for a in (stored, now)]
    if switch[0] != switch[1]:
        raise InputError(f"--resume: more --epochs would move the stage switch from epoch {switch[0]} to {switch[1]}; "
                         f"pass --stage1-epochs {switch[0]} to keep it")


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """--lr, or with --lr-base-batch N DeiT's scaling: lr x (batch x processes) / N."""
    return cfg.lr * cfg.batch_size * world_size / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def finetune_weights(path: str) -> tuple[str, dict]:
    """(arch, weights) of a --finetune student.pt; InputError / CheckpointError for a missing or bad file."""
    if not os.path.isfile(path):
        raise InputError(f"--finetune '{path}' does not exist")
    ck = load_model_file(path, "student", STUDENT_FORMAT)
    return ck["arch"], ck["model"]


def is_student(name: str) -> bool:
    """A registered DearKD student (timm name whose entry point is in models/student.py)."""
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ == save_student.__module__


def load_data(cfg: TrainConfig, device: torch.device) -> tuple[DataBundle, InputSpec]:
    """Scan, split and load the images at the student's input size and normalisation."""
    inputs = InputSpec.of_model(cfg.model)
    data = build_data(cfg.data, inputs, batch_size=cfg.batch_size, seed=cfg.run.seed, device=device, amp=cfg.run.amp,
                      progress=cfg.run.progress, rank=DIST.rank, world_size=DIST.world_size)
    if DIST.active:
        log(f"{DIST.world_size} processes: batch {cfg.batch_size} per process, {cfg.batch_size * DIST.world_size} "
            "in all")
    log(f"data: {data.name}, {len(data.classes)} classes, {data.num_train} train / {data.num_val} val images"
        + (f", {len(data.skipped)} undecodable files skipped" if data.skipped else "")
        + (f", empty classes: {', '.join(data.empty_classes)}" if data.empty_classes else ""))
    return data, inputs


def prepare_teacher(cfg: TrainConfig, out: OutputFolder, data: DataBundle, inputs: InputSpec,
                    device: torch.device) -> Teacher | None:
    """Load --teacher-ckpt (or this run's teacher.pt on --resume) or --teacher-weights, else train one; evaluate it;
    write this run's teacher.pt unless it came from one. None when no epoch of stage 1 needs it."""
    if not cfg.needs_teacher:
        return None
    own = os.path.join(out.root, "teacher.pt")
    path = cfg.teacher_ckpt or (own if cfg.run.resume and os.path.isfile(own) else None)
    if path:
        model, spec = load_teacher(path, num_classes=len(data.classes), class_names=list(data.classes))
        model = model.to(device)
        log(f"teacher: {spec.arch} from {path}")
    elif cfg.teacher_weights:
        model = create_classifier(cfg.teacher, len(data.classes), weights=cfg.teacher_weights).to(device)
        spec = dataclasses.replace(spec_of(model), arch=cfg.teacher, class_names=list(data.classes),
                                   input_size=inputs.size)
        log(f"teacher: {cfg.teacher} with the weights of {cfg.teacher_weights}")
    else:
        model, spec = train_teacher(cfg, data, inputs, device)
    model = model.to(memory_format=torch.channels_last)  # faster cuDNN / oneDNN convolutions (benchmarks/RESULTS.md)
    taps = cfg.teacher_taps.split(",") if cfg.teacher_taps else None
    teacher = Teacher(model, spec, taps, input_norm=(inputs.mean, inputs.std))
    spec.top1 = engine.evaluate(lambda x: teacher(x)[0], data.val, device=device, amp=cfg.run.amp,
                                amp_dtype=cfg.run.autocast_dtype, desc="teacher eval", progress=cfg.run.progress)["top1"]
    if not path and DIST.main:
        save_teacher(model, spec, out.path("teacher.pt"))
    log(f"teacher {spec.arch}: top-1 {spec.top1:.2f}% (taps {', '.join(teacher.taps)})")
    return teacher


def train_teacher(cfg: TrainConfig, data: DataBundle, inputs: InputSpec, device: torch.device) -> tuple[nn.Module, TeacherSpec]:
    """Train --teacher from scratch on the run's data by --teacher-recipe (teacher_recipe.py), CE with
    --teacher-smoothing, in channels_last (faster oneDNN and cuDNN convolutions)."""
    model = create_teacher_model(cfg.teacher, len(data.classes)).to(device).to(memory_format=torch.channels_last)
    if cfg.teacher_recipe == "fast":
        recipe = teacher_recipe.fast_recipe(model, data.train, lr=cfg.teacher_lr, weight_decay=cfg.teacher_weight_decay,
                                            epochs=cfg.teacher_epochs, amp=cfg.run.amp,
                                            amp_dtype=cfg.run.autocast_dtype)
    else:
        recipe = teacher_recipe.standard_recipe(model, data.train, opt=cfg.teacher_opt, lr=cfg.teacher_lr,
                                                weight_decay=cfg.teacher_weight_decay, epochs=cfg.teacher_epochs,
                                                warmup_steps=cfg.teacher_warmup_steps(len(data.train)))
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.teacher_smoothing)
    scale = recipe.logit_scale
    criterion = SupervisedLoss(ce if scale == 1.0 else (lambda out, y: ce(out * scale, y)))
    step = engine.TrainStep(distributed.wrap(model, device, DIST), criterion, recipe.optimizer, recipe.scheduler,
                            device=device, amp=cfg.run.amp, amp_dtype=cfg.run.autocast_dtype)
    done = [0]

    def after_step(_state: engine.EpochState) -> None:
        done[0] += 1
        if recipe.after_step is not None:
            recipe.after_step(done[0])

    for epoch in range(cfg.teacher_epochs):
        recipe.loader.set_epoch(epoch)  # a new order and new augmentations each epoch (the same ones: no augmentation)
        stats = engine.train_one_epoch(step, recipe.loader, desc=f"teacher {epoch + 1}/{cfg.teacher_epochs}",
                                       progress=cfg.run.progress, after_step=after_step)
        log(f"teacher epoch {epoch + 1}/{cfg.teacher_epochs}  loss {stats['loss']:.4f}")
    if recipe.finish is not None:
        recipe.finish()
    spec = TeacherSpec(arch=cfg.teacher, num_classes=len(data.classes), class_names=list(data.classes),
                       input_size=inputs.size, mean=inputs.mean, std=inputs.std)
    return model, spec


def build_student(cfg: TrainConfig, num_classes: int, teacher: Teacher | None, steps_per_epoch: int,
                  device: torch.device) -> Student:
    """The student (in distilled training, with alignment projections sized from the teacher's taps), its
    DearKD criterion, AdamW over the student and the per-step warm-up + cosine schedule."""
    extra = {k: v for k, v in (("drop_path_rate", cfg.drop_path), ("num_mhca", cfg.num_mhca)) if v is not None}
    model = timm.create_model(cfg.model, num_classes=num_classes, **extra).to(device)
    if cfg.finetune is not None:  # every trained tensor but the two heads, which start afresh for these classes
        body = {k: v for k, v in finetune_weights(cfg.finetune)[1].items() if not k.startswith(("head.", "head_dist."))}
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith(("head.", "head_dist.")) for k in missing):
            raise CheckpointError(f"--finetune '{cfg.finetune}' does not fit {cfg.model} "
                                  f"({(unexpected or missing)[0]})")
    model.set_distilled_training(True)
    if teacher is not None and cfg.beta > 0:
        model.set_alignment(teacher.channels(), cfg.aligned_blocks)
    labels_loss = engine.base_criterion(cfg.smoothing, soft_targets=cfg.mixes)
    criterion = DearKDLoss(labels_loss, teacher, cfg.distillation_type if teacher is not None else "none", cfg.alpha,
                           cfg.tau, beta=cfg.beta, standardize_target=cfg.align_standardize, backend=cfg.run.backend)
    optimizer = engine.make_optimizer(engine.param_groups([model], cfg.weight_decay), effective_lr(cfg, DIST.world_size))
    scheduler = engine.cosine_schedule(optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch,
                                       cfg.min_lr_ratio)
    step = engine.TrainStep(distributed.wrap(model, device, DIST), criterion, optimizer, scheduler, device=device,
                            amp=cfg.run.amp, amp_dtype=cfg.run.autocast_dtype, max_norm=cfg.max_norm,
                            compile=cfg.run.compile, compile_mode=cfg.run.compile_mode)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    return Student(model, criterion, optimizer, scheduler, step, steps_per_epoch, ema=ema)


def restore_or_start(out: OutputFolder, student: Student, ck: dict | None) -> None:
    """Restore checkpoint `ck` (weights, optimizer, schedule, scaler, records, RNG; a mid-epoch one also
    the epoch's position and partial sums) and cut metrics.jsonl back to its finished epochs; for a new
    run (ck None) start metrics.jsonl empty."""
    metrics = out.path("metrics.jsonl")
    if ck is not None:
        rng = distributed.per_rank(ck["rng"], "rng", DIST)
        epoch_state = distributed.per_rank(ck.get("epoch_state"), "epoch_state", DIST)
        try:
            student.model.load_state_dict(ck["student"], strict=True)
            student.optimizer.load_state_dict(ck["optimizer"])
            student.scheduler.load_state_dict(ck["scheduler"])
            if student.step.scaler is not None and ck.get("scaler"):
                student.step.scaler.load_state_dict(ck["scaler"])
            if student.ema is not None:
                student.ema.load_state_dict(ck["ema"], strict=True)
            set_rng_state(rng)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"--resume: checkpoint.pt in '{out.root}' does not fit this model "
                                  f"({type(e).__name__}); resume with the run's original flags") from None
        student.records, student.resume_state = ck["records"], epoch_state
        student.start_epoch = ck["epoch"] + (0 if student.resume_state else 1)
        at = (f"epoch {student.start_epoch + 1}, step {student.resume_state['step']}" if student.resume_state
              else f"epoch {student.start_epoch}")
        log(f"resumed after {at}")
    if DIST.main:
        with open(metrics, "w") as f:  # drop lines of epochs after the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in student.records)


def fit(cfg: TrainConfig, out: OutputFolder, student: Student, data: DataBundle, teacher: Teacher | None,
        device: torch.device) -> None:
    """Stage 1 for epochs < E1, stage 2 after; one record per epoch, appended to metrics.jsonl; a
    checkpoint at every epoch end, every --checkpoint-every steps, and on SIGINT / SIGTERM at the next
    step boundary (then Stopped)."""
    mix = mixup_fn(cfg, len(data.classes))
    with StopRequest() as stop:
        for epoch in range(student.start_epoch, cfg.epochs):
            stage = 1 if epoch < cfg.switch_epoch else 2
            student.criterion.set_stage(stage, beta=cfg.beta_at(epoch))
            if stage == 2 and teacher is not None:
                teacher.offload()  # never run again: its memory goes back to the device
            resumed = student.resume_state if epoch == student.start_epoch else None
            state = engine.EpochState.from_dict(resumed, device)
            data.train.set_epoch(epoch, state.step)
            t0, calls0 = time.time(), teacher.calls if teacher is not None else 0

            def after_step(st: engine.EpochState, epoch: int = epoch) -> None:
                if student.ema is not None:
                    student.ema.update(getattr(student.model, "module", student.model),
                                       step=epoch * student.steps_per_epoch + st.step)
                signum = distributed.agreed_stop(stop.signum, st.step, device, DIST)
                due = cfg.checkpoint_every and (epoch * student.steps_per_epoch + st.step) % cfg.checkpoint_every == 0
                if signum or due:  # one checkpoint when both fall on this step
                    save_checkpoint(cfg, out, student, data, epoch, st)
                if signum:
                    raise Stopped(signum, f"at epoch {epoch + 1}, step {st.step}")

            train = engine.train_one_epoch(student.step, data.train, mixup_fn=mix, progress=cfg.run.progress, state=state,
                                           max_bad_steps=cfg.max_bad_steps, after_step=after_step,
                                           desc=f"stage {stage} epoch {epoch + 1}/{cfg.epochs}")
            train_time = time.time() - t0
            val = validate(cfg, student, data, device) if cfg.evaluates(epoch) else NOT_EVALUATED
            record_epoch(cfg, out, student, data, {"epoch": epoch, "stage": stage, "train": train, **val},
                         train_time, (teacher.calls - calls0) if teacher is not None else 0)
            save_checkpoint(cfg, out, student, data, epoch, None)


NOT_EVALUATED = {"top1": None, "top5": None, "loss": None, "num_samples": 0}  # an epoch --eval-every passes over


def validate(cfg: TrainConfig, student: Student, data: DataBundle, device: torch.device) -> dict:
    """The student's validation metrics, and with --model-ema its EMA's top-1 ("top1_ema")."""
    val = engine.evaluate(student.model, data.val, device=device, amp=cfg.run.amp, amp_dtype=cfg.run.autocast_dtype,
                          progress=cfg.run.progress)
    if student.ema is not None:
        val["top1_ema"] = engine.evaluate(student.ema.module, data.val, device=device, amp=cfg.run.amp,
                                          amp_dtype=cfg.run.autocast_dtype, progress=cfg.run.progress)["top1"]
    return val


def record_epoch(cfg: TrainConfig, out: OutputFolder, student: Student, data: DataBundle, r: dict, train_time: float,
                 teacher_calls: int) -> None:
    """Append an epoch's record (train means, validation metrics, timing) to the records and metrics.jsonl."""
    train = r["train"]
    rec = {"epoch": r["epoch"], "stage": r["stage"], "train": train, "val_top1": r["top1"], "val_top5": r["top5"],
           "val_loss": r["loss"], "num_val_samples": r["num_samples"], "train_time_s": round(train_time, 3),
           "images_per_s": round(data.num_train / max(train_time, 1e-9), 1), "teacher_calls": teacher_calls}
    if student.ema is not None:
        rec["val_top1_ema"] = r.get("top1_ema")
    student.records.append(rec)
    if DIST.main:
        with open(out.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    terms = "  ".join(f"{k} {v:.4f}" for k, v in train.items() if k not in ("lr", "skipped_steps"))
    skipped = f", {train['skipped_steps']} non-finite steps skipped" if train["skipped_steps"] else ""
    val = f"val top-1 {r['top1']:.2f}%" if r["top1"] is not None else "not validated"
    if r.get("top1_ema") is not None:
        val += f" (EMA {r['top1_ema']:.2f}%)"
    log(f"epoch {r['epoch'] + 1}/{cfg.epochs} stage {r['stage']}  {terms}  {val}  ({train_time:.1f}s{skipped})")


def save_checkpoint(cfg: TrainConfig, out: OutputFolder, student: Student, data: DataBundle, epoch: int,
                    state: engine.EpochState | None) -> None:
    """checkpoint.pt (atomic): everything to continue exactly: student (projections included), optimizer,
    schedule, scaler, records, RNG, and for a mid-epoch one (state given) the epoch's position and partial
    sums; never the teacher (the run's teacher.pt, or --teacher-ckpt, is read again). With
    --keep-checkpoints N > 1 the newest N are also kept as checkpoint-<step>.pt (checkpoint.pt links the newest)."""
    rngs = distributed.gather(rng_state())  # each rank's streams (and partial sums): a resumed run continues them
    states = distributed.gather(state.state_dict() if state is not None else None)
    if not DIST.main:
        return
    ck = {"epoch": epoch, "epoch_state": states if DIST.active else states[0],
          "global_step": epoch * student.steps_per_epoch + (state.step if state is not None else student.steps_per_epoch),
          "student": student.model.state_dict(), "optimizer": student.optimizer.state_dict(),
          "scheduler": student.scheduler.state_dict(),
          "records": student.records, "rng": rngs if DIST.active else rngs[0], "args": config.flat(cfg),
          "classes": data.classes, "world_size": DIST.world_size,
          "scaler": student.step.scaler.state_dict() if student.step.scaler is not None else None,
          "ema": student.ema.state_dict() if student.ema is not None else None}
    save_rotating(ck, out.path, ck["global_step"], cfg.keep_checkpoints)


def save_students(cfg: TrainConfig, out: OutputFolder, student: Student, data: DataBundle, inputs: InputSpec) -> None:
    """student.pt, and with --model-ema student_ema.pt (the average), each deployable (no alignment projections)."""
    save_student(student.model, cfg.model, data.classes, inputs, out.path("student.pt"))
    if student.ema is not None:
        save_student(student.ema.module, cfg.model, data.classes, inputs, out.path("student_ema.pt"))


def finalise(cfg: TrainConfig, out: OutputFolder, student: Student | None, data: DataBundle, inputs: InputSpec,
             teacher: Teacher | None, device: torch.device, t_start: float) -> dict:
    """Write student.pt and summary.json, print the results table (rank 0). No student (--epochs 0): the
    student fields are None."""
    if DIST.main and student is not None:
        save_students(cfg, out, student, data, inputs)
    records = student.records if student is not None else []
    stage1 = [r for r in records if r["stage"] == 1]
    skipped = data.all_skipped()
    summary = {
        "final_top1": records[-1]["val_top1"] if records else None,
        "final_top5": records[-1]["val_top5"] if records else None,
        "final_top1_ema": records[-1].get("val_top1_ema") if records else None,
        "best_top1": max(r["val_top1"] for r in records if r["val_top1"] is not None) if records else None,
        "stage1_top1": stage1[-1]["val_top1"] if stage1 else None,
        "teacher_top1": teacher.spec.top1 if teacher is not None else None,
        "teacher": teacher.spec.arch if teacher is not None else None,
        "model": cfg.model,
        "data": data.name,
        "num_classes": len(data.classes),
        "num_train_samples": data.num_train,
        "num_val_samples": records[-1]["num_val_samples"] if records else data.num_val,
        "skipped_files": len(skipped),
        "skipped_paths": skipped[:100],
        "empty_classes": data.empty_classes,
        "stage_switch_epoch": cfg.switch_epoch,
        "epochs": records,
        "device": str(device),
        "elapsed_s": round(time.time() - t_start, 1),
        "world_size": DIST.world_size,
        "batch_size_per_process": cfg.batch_size,
        "global_batch_size": cfg.batch_size * DIST.world_size,
        "lr_effective": effective_lr(cfg, DIST.world_size),
        "args": config.flat(cfg),
    }
    if DIST.main:
        atomic_write_json(summary, out.path("summary.json"))
        print_table(summary)
    return summary


def run(cfg: TrainConfig) -> dict:
    global DIST
    t_start = time.time()
    DIST, device = distributed.init(cfg.run.torch_device)
    if not DIST.main:  # rank 0 alone shows progress and writes files
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, no_progress=True))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        out, ck = claim_output(cfg)
        if cfg.deterministic:
            make_deterministic(device)
        return _run(cfg, out, ck, device, t_start)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        distributed.close()
        DIST = Dist()


def claim_output(cfg: TrainConfig) -> tuple[OutputFolder, dict | None]:
    """check_inputs on rank 0 (the only writer; a refusal ends every rank alike); the other ranks read
    the same checkpoint."""
    res = distributed.on_rank0(lambda: check_inputs(cfg))
    if DIST.main:
        return res
    ck = load_checkpoint(os.path.join(cfg.output, "checkpoint.pt")) if cfg.run.resume else None
    return PeerFolder(cfg.output, PROG), ck


def _run(cfg: TrainConfig, out: OutputFolder, ck: dict | None, device: torch.device, t_start: float) -> dict:
    seed_everything(cfg.run.seed + DIST.rank)  # own dropout streams; the weights start from rank 0's (DDP)
    data, inputs = load_data(cfg, device)
    teacher = prepare_teacher(cfg, out, data, inputs, device)
    if cfg.epochs == 0:  # the teacher alone (a study trains it once and hands it to every student run)
        return finalise(cfg, out, None, data, inputs, teacher, device, t_start)
    student = build_student(cfg, len(data.classes), teacher, len(data.train), device)
    restore_or_start(out, student, ck)
    fit(cfg, out, student, data, teacher, device)
    return finalise(cfg, out, student, data, inputs, teacher, device, t_start)


# ---------------------------------------------------------------------------------------------- pieces


def make_deterministic(device: torch.device) -> None:
    """Deterministic algorithms only (an op without one raises), no cuDNN autotuning."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mixup_fn(cfg: TrainConfig, num_classes: int):
    if not cfg.mixes:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=num_classes)


def print_table(summary: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"

    rows = [("teacher " + (summary["teacher"] or "(none)"), pct(summary["teacher_top1"])),
            (f"student {summary['model']} after stage 1", pct(summary["stage1_top1"])),
            (f"student {summary['model']} final", pct(summary["final_top1"]))]
    if summary.get("final_top1_ema") is not None:
        rows.append((f"student {summary['model']} EMA", pct(summary["final_top1_ema"])))
    w = max(len(r[0]) for r in rows)
    print(f"\n{'model':<{w}}  top-1 ({summary['data']} val, {summary['num_val_samples']} images)")
    for name, v in rows:
        print(f"{name:<{w}}  {v}")
    print(f"elapsed {summary['elapsed_s']:.0f}s on {summary['device']}\n")


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, TrainConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
