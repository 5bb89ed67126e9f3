"""python -m dearkd_fast.invert: data-free images from a teacher (DeepInversion + BPID).

Synthesises `--images-per-class` images of every class into an ImageFolder (`<output>/<class>/<n>.png`,
lossless) plus `meta.json`, ready for `python -m dearkd_fast.train --data <output>`. Each batch is
optimised from its own seed (seed + batch index), so `--resume` after a kill redoes no finished batch
and produces the same images an uninterrupted run would. Exit 0 / 2 (bad input) / 1 (run-time failure).

The run is a short sequence of steps: check_inputs -> load_inversion_teacher -> prepare_output ->
build_objective -> synthesize_all -> finalise. --output must be empty or this tool's own run (its
run.json lists every file it wrote; --overwrite removes only those).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import config, distributed, engine
from .checkpoint import atomic_write, atomic_write_json
from .cli import OutputFolder, PeerFolder, run_cli
from .config import InvertConfig, SynthesisSettings
from .data.folder import check_folder_names
from .distributed import Dist
from .errors import InputError, RunError
from .losses import DeepInversionLoss, penultimate
from .models.student import load_student
from .models.teacher import TeacherSpec, check_teacher_arch, create_classifier, freeze, load_teacher, spec_of

PROG = "dearkd_fast.invert"
DIST = Dist()  # this process's place under torchrun (one process without it), set by run() as in train.py
DESCRIPTION = __doc__.split("\n\n")[0]


def build_parser():
    return config.build_parser(InvertConfig, f"python -m {PROG}", DESCRIPTION)


# ---------------------------------------------------------------------------------------------- steps


def check_inputs(cfg: InvertConfig) -> None:
    """Missing files and unknown architectures are refused before any work."""
    for flag_name, path in (("--teacher-ckpt", cfg.teacher_ckpt), ("--teacher-weights", cfg.teacher_weights),
                            ("--student-ckpt", cfg.student_ckpt), ("--student-weights", cfg.student_weights)):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{flag_name} '{path}' does not exist")
    if cfg.teacher_ckpt is None:
        check_teacher_arch(cfg.teacher)
    if cfg.student is not None:
        check_teacher_arch(cfg.student)


def load_inversion_teacher(cfg: InvertConfig) -> tuple[torch.nn.Module, TeacherSpec]:
    """The teacher of --teacher-ckpt, or --teacher NAME with its published weights (--pretrained), a state dict
    (--teacher-weights) or random weights (speed tests), with its class names (zero-padded indices by default)."""
    if cfg.teacher_ckpt:
        model, spec = load_teacher(cfg.teacher_ckpt)
        if cfg.teacher and cfg.teacher != spec.arch:
            raise InputError(f"--teacher {cfg.teacher} differs from the checkpoint's architecture {spec.arch}")
    else:
        model = create_classifier(cfg.teacher, cfg.num_classes, pretrained=cfg.pretrained, weights=cfg.teacher_weights)
        spec = spec_of(model)
        spec.arch, n = cfg.teacher, spec.num_classes or cfg.num_classes
        width = len(str(n - 1))  # zero-padded, so folder order is label order (00, 01, ..., 11)
        spec.num_classes, spec.class_names = n, [f"{i:0{width}d}" for i in range(n)]
        if not (cfg.pretrained or cfg.teacher_weights):
            tqdm.write(f"{PROG}: warning: teacher {cfg.teacher} has random weights (no --teacher-ckpt, --pretrained "
                       "or --teacher-weights)")
    if cfg.class_names:
        names = cfg.class_names.split(",")
        if len(names) != spec.num_classes:
            raise InputError(f"--class-names gives {len(names)} names for a teacher of {spec.num_classes} classes")
        spec.class_names = names
    check_folder_names(spec.class_names, "--class-names" if cfg.class_names else f"the class names of {cfg.teacher_ckpt}")
    if spec.class_names != sorted(spec.class_names):
        raise InputError("class names must be in sorted (ImageFolder) order so that folder order equals label order")
    freeze(model)
    return model, spec


def prepare_output(cfg: InvertConfig, settings: SynthesisSettings) -> tuple[OutputFolder, dict]:
    """Claim --output (only an empty folder, or this tool's own run with --resume / --overwrite, which
    removes only the files its manifest lists) and return the progress state: read back on --resume
    (settings must match), else new."""
    out = OutputFolder.open(cfg.output, PROG, resume=cfg.run.resume, overwrite=cfg.run.overwrite,
                            resume_file="progress.json", exclusive=True)
    state = {"settings": settings.as_dict(), "done": {}}
    if cfg.run.resume:
        try:
            with open(os.path.join(out.root, "progress.json")) as f:
                state = json.load(f)
            stored = state["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"--resume: '{os.path.join(out.root, 'progress.json')}' is unreadable") from None
        if stored != settings.as_dict():
            diff = sorted(k for k, v in settings.as_dict().items() if stored.get(k) != v)
            raise InputError(f"--resume: settings differ from the run in '{out.root}': {', '.join(diff)}")
    return out, state


def build_objective(cfg: InvertConfig, model: torch.nn.Module, settings: SynthesisSettings,
                    device: torch.device) -> DeepInversionLoss:
    """DeepInversion (+ BPID) (+ ADI against a student) on the frozen teacher."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    student = None
    if cfg.student_ckpt:
        student = load_student(cfg.student_ckpt, device)[0]
    elif cfg.student:
        student = create_classifier(cfg.student, settings.num_classes, pretrained=cfg.student_pretrained,
                                    weights=cfg.student_weights).to(device)
    if student is not None:
        freeze(student)
    st = settings
    crit = DeepInversionLoss(model, r_bn=st.r_bn, first_bn_mult=st.first_bn_mult, tv_l2=st.tv_l2, tv_l1=st.tv_l1,
                             l2=st.l2, bpid=st.bpid, bpid_margin=st.bpid_margin, bpid_lambda=st.bpid_lambda,
                             adi=st.adi, adi_temperature=st.adi_temperature, student=student, backend=cfg.run.backend)
    if cfg.run.compile:
        crit.teacher = torch.compile(model)
    return crit


def synthesize_all(cfg: InvertConfig, out: OutputFolder, crit: DeepInversionLoss, spec: TeacherSpec,
                   settings: SynthesisSettings, state: dict, device: torch.device) -> None:
    """Every batch not yet done: optimise it from seed + k, write its PNGs, record it in progress.json. Under
    torchrun the ranks take turns (batch k on rank k mod N, each writing its own images); rank 0 records."""
    plan = batches(len(settings.targets), settings.images_per_class, settings.batch_size)
    todo = [k for k in range(len(plan)) if str(k) not in state["done"]]
    bar = tqdm(total=len(plan), initial=len(state["done"]), desc="batches", disable=not cfg.run.progress, dynamic_ncols=True)
    for r in range(0, len(todo), DIST.world_size):
        k = todo[r + DIST.rank] if r + DIST.rank < len(todo) else None
        result = None
        if k is not None:
            ids = plan[k]
            targets = torch.tensor([target_of(settings, j) for j in ids], device=device)
            x, terms = synthesize_batch(crit, targets, settings, spec, settings.seed + k, device, cfg.run.progress,
                                        f"batch {k + 1}/{len(plan)}")
            if not (torch.isfinite(x).all() and all(math.isfinite(v) for v in terms.values())):
                raise RunError(f"batch {k + 1}: the objective diverged (loss {terms['loss']}); lower --lr or the "
                               "coefficients. Finished batches are kept: --resume continues")
            rels = [os.path.relpath(image_path(out.root, spec, settings, j), out.root) for j in ids]
            out.record(rels)  # owned before they are written
            save_images(x, ids, out.root, spec, settings)
            result = (k, terms, rels)
        for done in distributed.gather(result):  # rank 0 records every rank's finished batch
            if done is None or not DIST.main:
                continue
            out.record(done[2])
            state["done"][str(done[0])] = done[1]
            atomic_write_json(state, out.path("progress.json"))
            bar.update(1)
            tqdm.write(f"batch {done[0] + 1}/{len(plan)}: " + "  ".join(f"{n} {v:.4g}" for n, v in done[1].items()))
    bar.close()
    crit.close()


def finalise(cfg: InvertConfig, out: OutputFolder, model: torch.nn.Module, spec: TeacherSpec, settings: SynthesisSettings,
             state: dict, device: torch.device, t0: float) -> dict:
    """Judge the saved PNGs with the teacher and write meta.json."""
    n_images = len(settings.targets) * settings.images_per_class
    acc, dist = evaluate_synthetic(model, out.root, spec, settings, n_images, device)
    finals = list(state["done"].values())
    meta = {
        "settings": settings.as_dict(),
        "seed": settings.seed,
        "teacher": spec.arch,
        "teacher_ckpt": cfg.teacher_ckpt,
        "class_names": spec.class_names,
        "targets": list(settings.targets),
        "num_images": n_images,
        "teacher_accuracy": acc,
        "bn_loss_final": float(np.mean([t["bn"] for t in finals])),
        "intra_class_distance": dist,
        "final_terms": {k: float(np.mean([t[k] for t in finals])) for k in finals[0]},
        "elapsed_s": round(time.time() - t0, 1),
        "device": str(device),
    }
    atomic_write_json(meta, out.path("meta.json"))
    print(f"\n{n_images} images in {cfg.output}: teacher agrees with the target on {acc:.1f}%, "
          f"final BN loss {meta['bn_loss_final']:.4f}, intra-class distance {dist:.4f}, {meta['elapsed_s']:.0f}s")
    return meta


def run(cfg: InvertConfig) -> dict:
    global DIST
    t0 = time.time()
    DIST, device = distributed.init(cfg.run.torch_device)
    if not DIST.main:  # rank 0 alone shows progress and records; every rank writes its own batches' images
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, no_progress=True))
    try:
        check_inputs(cfg)
        model, spec = load_inversion_teacher(cfg)
        settings = cfg.synthesis(spec.arch, spec.num_classes, spec.input_size)
        out, state = claim_output(cfg, settings)
        model = model.to(device)
        crit = build_objective(cfg, model, settings, device)
        synthesize_all(cfg, out, crit, spec, settings, state, device)
        return finalise(cfg, out, model, spec, settings, state, device, t0) if DIST.main else {}
    finally:
        distributed.close()
        DIST = Dist()


def claim_output(cfg: InvertConfig, settings: SynthesisSettings) -> tuple[OutputFolder, dict]:
    """prepare_output on rank 0 (a refusal ends every rank alike); the others get its progress state and
    write only the image files of their batches, which rank 0 records."""
    res = distributed.on_rank0(lambda: prepare_output(cfg, settings))
    state = distributed.broadcast(res[1] if DIST.main else None)
    return (res[0] if DIST.main else PeerFolder(cfg.output, PROG)), state


# ---------------------------------------------------------------------------------------------- pieces


def batches(num_targets: int, per_class: int, batch_size: int) -> list[list[int]]:
    """Image ids 0..T*n-1 in batches; image j has the target of index j % T, so every batch cycles through the
    target classes."""
    ids = list(range(num_targets * per_class))
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


def target_of(settings: SynthesisSettings, j: int) -> int:
    """The class of image j."""
    return settings.targets[j % len(settings.targets)]


def mean_std(spec: TeacherSpec, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's normalisation as [1,3,1,1] tensors: x_normalised = (pixel - mean) / std, pixels in [0, 1]."""
    return (torch.tensor(spec.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(spec.std, device=device).view(1, 3, 1, 1))


def pixel_bounds(spec: TeacherSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid range [lo, hi] of normalised pixels, per channel."""
    m, s = mean_std(spec, device)
    return (0 - m) / s, (1 - m) / s


def synthesize_batch(crit: DeepInversionLoss, targets: torch.Tensor, settings: SynthesisSettings, spec: TeacherSpec, seed: int,
                     device: torch.device, progress: bool, desc: str) -> tuple[torch.Tensor, dict]:
    """Optimise one batch of images from noise, phase by phase (half resolution first when the settings have
    one); each iteration average-pools (half resolution), rolls by a random jitter, flips at random, then
    steps Adam on the objective and clips to the pixel range (as the settings say). Returns the images
    (normalised space) kept by the settings (the final ones, or those of the lowest total loss) and their
    terms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rng = random.Random(seed)
    x = torch.randn((len(targets), 3, settings.resolution, settings.resolution), generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    lo, hi = pixel_bounds(spec, device)
    phases = [(pool, n) for pool, n in ((2, settings.low_res_iterations), (1, settings.iterations)) if n > 0]
    best = BestImages(x) if settings.keep == "best" else None
    bar = tqdm(total=sum(n for _, n in phases), desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for pool, iters in phases:
        opt = torch.optim.Adam([x], lr=settings.lr, betas=settings.betas, eps=1e-8)
        sched = engine.cosine_schedule(opt, settings.warmup, iters, min_ratio=0.0) if settings.schedule == "cosine" else None
        jitter = settings.jitter_px // pool
        for it in range(iters):
            with engine.autocast(device, settings.amp):
                loss = crit(jittered_view(x, pool, jitter, settings.flip, rng), targets)
            if best is not None:
                best.offer(loss, x, crit.last_terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if settings.clip:
                with torch.no_grad():
                    x.clamp_(min=lo, max=hi)
            bar.update(1)
            if progress and it % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", bn=f"{crit.last_terms['bn'].item():.3f}")
    bar.close()
    images, terms = (best.images, best.terms) if best is not None else (x.detach(), crit.last_terms)
    return images, {k: v.item() for k, v in terms.items()}


def jittered_view(x: torch.Tensor, pool: int, jitter: int, flip: bool, rng: random.Random) -> torch.Tensor:
    """What the teacher sees: x 2x average-pooled (pool 2), rolled by up to `jitter` pixels each way, flipped
    horizontally with probability 1/2 (when `flip`): the public code's order and random draws."""
    xt = torch.roll(F.avg_pool2d(x, pool) if pool > 1 else x, dims=(2, 3),
                    shifts=(rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)))
    return xt.flip(3) if rng.random() > 0.5 and flip else xt


class BestImages:
    """The images of the lowest total loss so far (before the step that loss drove) and their terms, chosen
    on the device: no host sync per iteration."""

    def __init__(self, x: torch.Tensor):
        self.loss = torch.full((), math.inf, device=x.device)
        self.images = x.detach().clone()
        self.terms: dict[str, torch.Tensor] = {}

    def offer(self, loss: torch.Tensor, x: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        better = loss.detach() < self.loss
        self.loss = torch.where(better, loss.detach(), self.loss)
        self.images = torch.where(better, x.detach(), self.images)
        self.terms = {k: torch.where(better, v, self.terms[k]) if k in self.terms else v for k, v in terms.items()}


def to_uint8(x: torch.Tensor, spec: TeacherSpec) -> np.ndarray:
    m, s = mean_std(spec)
    img = (x.float().cpu() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous().numpy()


def image_path(output: str, spec: TeacherSpec, settings: SynthesisSettings, j: int) -> str:
    return os.path.join(output, spec.class_names[target_of(settings, j)], f"{j // len(settings.targets):05d}.png")


def save_images(x: torch.Tensor, ids: list[int], output: str, spec: TeacherSpec, settings: SynthesisSettings) -> None:
    """Each PNG written to a temporary sibling and renamed: a kill never leaves a partial image."""
    for img, j in zip(to_uint8(x, spec), ids):
        with atomic_write(image_path(output, spec, settings, j)) as f:
            Image.fromarray(img).save(f, format="PNG")


@torch.no_grad()
def evaluate_synthetic(model: torch.nn.Module, output: str, spec: TeacherSpec, settings: SynthesisSettings, n_images: int,
                       device) -> tuple[float, float]:
    """Teacher accuracy on the saved PNGs (argmax == target, %) and mean intra-class feature distance."""
    model.eval()
    m, sd = mean_std(spec)
    correct, feats, labels = 0, [], []
    for i in range(0, n_images, settings.batch_size):
        ids = list(range(i, min(n_images, i + settings.batch_size)))
        arr = np.stack([np.asarray(Image.open(image_path(output, spec, settings, j)).convert("RGB")) for j in ids])
        x = ((torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - m) / sd).to(device)
        y = torch.tensor([target_of(settings, j) for j in ids], device=device)
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


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, InvertConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
