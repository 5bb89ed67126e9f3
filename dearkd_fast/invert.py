"""python -m dearkd_fast.invert: data-free images from a teacher (DeepInversion + BPID).

Synthesises `--images-per-class` images of every class into an ImageFolder (`<output>/<class>/<n>.png`,
lossless) plus `meta.json`, ready for `python -m dearkd_fast.train --data <output>`. Each batch is
optimised from its own seed (seed + batch index), so `--resume` after a kill redoes no finished batch
and produces the same images an uninterrupted run would. Exit 0 / 2 (bad input) / 1 (run-time failure).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import ops
from .checkpoint import atomic_write, atomic_write_json
from .cli import Parser, UsageError, check_output, pick_device, run_cli
from .engine import autocast
from .losses import DeepInversionLoss, penultimate
from .models.teacher import TeacherSpec, create_teacher_model, load_teacher

PROG = "dearkd_fast.invert"
RUN_FILES = ("meta.json", "progress.json")
# DeepInversion's public settings at 224 px (3,000 iterations in all: the public code splits them 2k at low and 1k
# at full resolution, we split them evenly), and ours for small (<= 64 px) CIFAR-style teachers, tuned on digits
DEFAULTS_224 = dict(lr=0.25, r_bn=0.01, first_bn_mult=10.0, tv_l2=1e-4, tv_l1=0.0, l2=1e-5, iterations=1500)
DEFAULTS_SMALL = dict(lr=0.25, r_bn=1.0, first_bn_mult=10.0, tv_l2=1e-3, tv_l1=0.0, l2=1e-5, iterations=120)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher-ckpt", default=None, help="teacher.pt written by the trainer (holds everything else)")
    t.add_argument("--teacher", default=None, help="timm name (random weights unless --teacher-ckpt; for speed tests)")
    t.add_argument("--num-classes", type=int, default=None, help="classes of a --teacher given by name")
    t.add_argument("--class-names", default=None, help="comma-separated class folder names, in label order")
    s = p.add_argument_group("synthesis")
    s.add_argument("--images-per-class", type=int, default=16)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--resolution", type=int, default=None, help="image side (default: the teacher's input size)")
    s.add_argument("--iterations", type=int, default=None,
                   help="iterations of the full-resolution phase (default 1500 at >64 px, 120 at <=64 px); "
                        "the half-resolution phase runs the same number again")
    s.add_argument("--multi-resolution", action=argparse.BooleanOptionalAction, default=True,
                   help="first phase at half resolution (2x average-pooled)")
    s.add_argument("--lr", type=float, default=None, help="Adam(0.5, 0.9) learning rate, cosine per phase (default 0.25)")
    s.add_argument("--r-bn", type=float, default=None, help="BN-statistics weight (default 0.01 at >64 px, 1.0 at <=64 px)")
    s.add_argument("--first-bn-mult", type=float, default=None, help="multiplier of the first BN layer (default 10)")
    s.add_argument("--tv-l2", type=float, default=None, help="L2 total variation weight (default 1e-4 at >64 px, 1e-3 at <=64 px)")
    s.add_argument("--tv-l1", type=float, default=None, help="L1 total variation weight (default 0)")
    s.add_argument("--l2", type=float, default=None, help="image L2-norm weight (default 1e-5)")
    s.add_argument("--jitter", type=int, default=None, help="max random roll in pixels (default 30 * resolution / 224)")
    s.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    s.add_argument("--bpid", type=float, default=10.0, help="weight of the boundary-preserving intra-divergence loss (0: off)")
    s.add_argument("--bpid-margin", type=float, default=1.0, help="logit margin m of L_BPID")
    s.add_argument("--bpid-lambda", type=float, default=0.3, help="weight lambda_b of L_BPID's boundary term")
    s.add_argument("--adi", type=float, default=0.0, help="Adaptive DeepInversion competition weight (needs --student-ckpt)")
    s.add_argument("--student-ckpt", default=None, help="student.pt for the ADI competition term")
    r = p.add_argument_group("run")
    r.add_argument("--output", required=True, help="ImageFolder to write")
    r.add_argument("--resume", action="store_true", help="continue a killed run in --output")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--amp", action="store_true", help="bf16 autocast of the teacher")
    r.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    r.add_argument("--backend", default="auto", choices=list(ops.BACKENDS), help="BN-statistics kernels (dearkd_fast.ops)")
    r.add_argument("--no-progress", action="store_true")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.teacher_ckpt is None and args.teacher is None:
        raise UsageError("give --teacher-ckpt (a teacher.pt) or --teacher NAME with --num-classes")
    if args.teacher_ckpt is not None and not os.path.isfile(args.teacher_ckpt):
        raise UsageError(f"--teacher-ckpt '{args.teacher_ckpt}' does not exist")
    if args.teacher_ckpt is None and not args.num_classes:
        raise UsageError("--teacher NAME needs --num-classes")
    if args.images_per_class < 1 or args.batch_size < 2:
        raise UsageError("--images-per-class must be >= 1 and --batch-size >= 2")
    if args.adi > 0 and not args.student_ckpt:
        raise UsageError("--adi needs --student-ckpt")
    if args.student_ckpt and not os.path.isfile(args.student_ckpt):
        raise UsageError(f"--student-ckpt '{args.student_ckpt}' does not exist")
    check_output(args.output, RUN_FILES, args.resume, args.overwrite, "progress.json")
    if (os.path.isdir(args.output) and os.listdir(args.output) and not (args.resume or args.overwrite)):
        raise UsageError(f"output folder '{args.output}' is not empty; pass --overwrite to write into it")
    args.device = pick_device(args.device)


def load_inversion_teacher(args) -> tuple[torch.nn.Module, TeacherSpec]:
    if args.teacher_ckpt:
        model, spec = load_teacher(args.teacher_ckpt)
        if args.teacher and args.teacher != spec.arch:
            raise UsageError(f"--teacher {args.teacher} differs from the checkpoint's architecture {spec.arch}")
    else:
        model = create_teacher_model(args.teacher, args.num_classes)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = (cfg.get("input_size") or (3, 224, 224))[-1]
        spec = TeacherSpec(args.teacher, args.num_classes, [str(i) for i in range(args.num_classes)], size,
                           tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))
        tqdm.write(f"{PROG}: warning: teacher {args.teacher} has random weights (no --teacher-ckpt)")
    if args.class_names:
        names = args.class_names.split(",")
        if len(names) != spec.num_classes:
            raise UsageError(f"--class-names gives {len(names)} names for a teacher of {spec.num_classes} classes")
        spec.class_names = names
    if spec.class_names != sorted(spec.class_names):
        raise UsageError("class names must be in sorted (ImageFolder) order so that folder order equals label order")
    return model, spec


def settings(args, spec: TeacherSpec) -> dict:
    """Resolve the defaults that depend on the resolution; these define the run (checked on --resume)."""
    res = args.resolution or spec.input_size
    base = DEFAULTS_SMALL if res <= 64 else DEFAULTS_224
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    s.update(resolution=res, jitter=args.jitter if args.jitter is not None else max(1, round(30 * res / 224)),
             flip=args.flip, multi_resolution=args.multi_resolution, bpid=args.bpid, bpid_margin=args.bpid_margin,
             bpid_lambda=args.bpid_lambda, adi=args.adi, images_per_class=args.images_per_class,
             batch_size=args.batch_size, seed=args.seed, num_classes=spec.num_classes, teacher=spec.arch,
             amp=args.amp, compile=args.compile)
    return s


def batches(num_classes: int, per_class: int, batch_size: int) -> list[list[int]]:
    """Image ids 0..C*n-1 in batches; image j has target j % C, so every batch cycles through the classes."""
    ids = list(range(num_classes * per_class))
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


def mean_std(spec: TeacherSpec, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's normalisation as [1,3,1,1] tensors: x_normalised = (pixel - mean) / std, pixels in [0, 1]."""
    return (torch.tensor(spec.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(spec.std, device=device).view(1, 3, 1, 1))


def pixel_bounds(spec: TeacherSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid range [lo, hi] of normalised pixels, per channel."""
    m, s = mean_std(spec, device)
    return (0 - m) / s, (1 - m) / s


def synthesize_batch(crit: DeepInversionLoss, targets: torch.Tensor, s: dict, spec: TeacherSpec, seed: int,
                     device: torch.device, progress: bool, desc: str) -> tuple[torch.Tensor, dict]:
    """Optimise one batch of images from noise; returns the images (normalised space) and final terms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rng = random.Random(seed)
    res = s["resolution"]
    x = torch.randn((len(targets), 3, res, res), generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    lo, hi = pixel_bounds(spec, device)
    phases = ([(2, s["iterations"])] if s["multi_resolution"] else []) + [(1, s["iterations"])]
    bar = tqdm(total=sum(n for _, n in phases), desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for pool, iters in phases:
        opt = torch.optim.Adam([x], lr=s["lr"], betas=(0.5, 0.9), eps=1e-8)
        jitter = max(0, s["jitter"] // pool)
        for it in range(iters):
            for g in opt.param_groups:  # cosine from lr to 0 over the phase
                g["lr"] = 0.5 * s["lr"] * (1 + math.cos(math.pi * it / iters))
            dx, dy = rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)
            xt = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            if s["flip"] and rng.random() < 0.5:
                xt = xt.flip(3)
            if pool > 1:
                xt = F.avg_pool2d(xt, pool)
            with autocast(device, s["amp"]):
                loss = crit(xt, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)
            bar.update(1)
            if progress and it % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", bn=f"{crit.last_terms['bn'].item():.3f}")
    bar.close()
    return x.detach(), {k: v.item() for k, v in crit.last_terms.items()}


def to_uint8(x: torch.Tensor, spec: TeacherSpec) -> np.ndarray:
    m, s = mean_std(spec)
    img = (x.float().cpu() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous().numpy()


def image_path(output: str, spec: TeacherSpec, j: int) -> str:
    C = spec.num_classes
    return os.path.join(output, spec.class_names[j % C], f"{j // C:05d}.png")


def save_images(x: torch.Tensor, ids: list[int], output: str, spec: TeacherSpec) -> None:
    """Each PNG written to a temporary sibling and renamed: a kill never leaves a partial image."""
    for img, j in zip(to_uint8(x, spec), ids):
        with atomic_write(image_path(output, spec, j)) as f:
            Image.fromarray(img).save(f, format="PNG")


@torch.no_grad()
def evaluate_synthetic(model: torch.nn.Module, output: str, spec: TeacherSpec, n_images: int, device, batch_size: int):
    """Teacher accuracy on the saved PNGs (argmax == target, %) and mean intra-class feature distance."""
    model.eval()
    m, s = mean_std(spec)
    correct, feats, labels = 0, [], []
    for i in range(0, n_images, batch_size):
        ids = list(range(i, min(n_images, i + batch_size)))
        arr = np.stack([np.asarray(Image.open(image_path(output, spec, j)).convert("RGB")) for j in ids])
        x = ((torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - m) / s).to(device)
        y = torch.tensor([j % spec.num_classes for j in ids], device=device)
        logits, z = penultimate(model, x)
        correct += (logits.argmax(1) == y).sum().item()
        feats.append(F.normalize(z.float().flatten(1), dim=1).cpu())
        labels.append(y.cpu())
    return 100.0 * correct / n_images, intra_class_distance(torch.cat(feats), torch.cat(labels))


def intra_class_distance(z: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over classes (with >= 2 images) of the mean pairwise L2 distance of normalised features."""
    per_class = []
    for c in y.unique():
        zc = z[y == c]
        if len(zc) > 1:
            d = torch.cdist(zc, zc)
            per_class.append((d.sum() / (len(zc) * (len(zc) - 1))).item())
    return float(np.mean(per_class)) if per_class else 0.0


def load_student(path: str, device) -> torch.nn.Module:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != "dearkd_fast.student/1":
        raise UsageError(f"'{path}' is not a dearkd_fast student checkpoint")
    student = timm.create_model(ck["model"], num_classes=ck["num_classes"])
    student.load_state_dict(ck["state_dict"])
    return student.to(device).eval()


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    device = torch.device(args.device)
    model, spec = load_inversion_teacher(args)
    s = settings(args, spec)
    progress_path = os.path.join(args.output, "progress.json")
    state = {"settings": s, "done": {}}
    if args.resume:
        with open(progress_path) as f:
            state = json.load(f)
        if state["settings"] != s:
            diff = sorted(k for k in s if state["settings"].get(k) != s[k])
            raise UsageError(f"--resume: settings differ from the run in '{args.output}': {', '.join(diff)}")
    os.makedirs(args.output, exist_ok=True)
    if args.overwrite:  # only what this tool writes: the class folders' NNNNN.png, progress.json, meta.json
        for name in spec.class_names:
            folder = os.path.join(args.output, name)
            for f in os.listdir(folder) if os.path.isdir(folder) else []:
                if re.fullmatch(r"\d{5}\.png", f):
                    os.remove(os.path.join(folder, f))
        for f in RUN_FILES:
            if os.path.exists(os.path.join(args.output, f)):
                os.remove(os.path.join(args.output, f))
    for root, _, files in os.walk(args.output):  # temporary files of a killed write
        for f in files:
            if f.startswith(".tmp-"):
                os.remove(os.path.join(root, f))
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    student = load_student(args.student_ckpt, device) if args.student_ckpt else None
    crit = DeepInversionLoss(model, r_bn=s["r_bn"], first_bn_mult=s["first_bn_mult"], tv_l2=s["tv_l2"], tv_l1=s["tv_l1"],
                             l2=s["l2"], bpid=s["bpid"], bpid_margin=s["bpid_margin"], bpid_lambda=s["bpid_lambda"],
                             adi=s["adi"], student=student, backend=args.backend)
    if args.compile:
        crit.teacher = torch.compile(model)
    plan = batches(spec.num_classes, s["images_per_class"], s["batch_size"])
    bar = tqdm(total=len(plan), initial=len(state["done"]), desc="batches", disable=args.no_progress, dynamic_ncols=True)
    for k, ids in enumerate(plan):
        if str(k) in state["done"]:
            continue
        targets = torch.tensor([j % spec.num_classes for j in ids], device=device)
        x, terms = synthesize_batch(crit, targets, s, spec, args.seed + k, device, not args.no_progress,
                                    f"batch {k + 1}/{len(plan)}")
        save_images(x, ids, args.output, spec)
        state["done"][str(k)] = terms
        atomic_write_json(state, progress_path)
        bar.update(1)
        tqdm.write(f"batch {k + 1}/{len(plan)}: " + "  ".join(f"{n} {v:.4g}" for n, v in terms.items()))
    bar.close()
    crit.close()
    n_images = spec.num_classes * s["images_per_class"]
    acc, dist = evaluate_synthetic(model, args.output, spec, n_images, device, s["batch_size"])
    finals = list(state["done"].values())
    meta = {
        "settings": s,
        "seed": args.seed,
        "teacher": spec.arch,
        "teacher_ckpt": args.teacher_ckpt,
        "class_names": spec.class_names,
        "num_images": n_images,
        "teacher_accuracy": acc,
        "bn_loss_final": float(np.mean([t["bn"] for t in finals])),
        "intra_class_distance": dist,
        "final_terms": {k: float(np.mean([t[k] for t in finals])) for k in finals[0]},
        "elapsed_s": round(time.time() - t0, 1),
        "device": str(device),
    }
    atomic_write_json(meta, os.path.join(args.output, "meta.json"))
    print(f"\n{n_images} images in {args.output}: teacher agrees with the target on {acc:.1f}%, "
          f"final BN loss {meta['bn_loss_final']:.4f}, intra-class distance {dist:.4f}, {meta['elapsed_s']:.0f}s")
    return meta


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, build_parser(), validate, run, argv)


if __name__ == "__main__":
    sys.exit(main())
