"""Benchmark cases shared by the pytest-benchmark suites and gpu_check.py.

Each case is a forward+backward closure over fixed inputs plus the fewest bytes it must move
(each input read once per pass, each output written once), so GB/s can be reported.
Variants: "eager" (reference.py, fp32 math), "compiled" (torch.compile of the reference),
"deepinversion" (the public DeepInversion hook's way: mean + permute/contiguous/view/var),
"triton" (dearkd_fast.ops, backend="triton"; GPU), "native" (backend="native", the C++ ops; CPU).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from PIL import Image

from dearkd_fast import ops, reference
from dearkd_fast.config import IMAGENET_MEAN, IMAGENET_STD, INVERSION
from dearkd_fast.data.folder import cache_root
from dearkd_fast.kernels_report import ALIGN_SHAPE as GPU_ALIGN_SHAPE
from dearkd_fast.kernels_report import BN_SHAPE as GPU_BN_SHAPE
from dearkd_fast.kernels_report import RESNET50_BATCH as GPU_RESNET50_BATCH
from dearkd_fast.kernels_report import RESNET50_SIZE as GPU_RESNET50_SIZE
from dearkd_fast.testing import folder_data
from dearkd_fast.testing import public_bn_loss as deepinversion_bn_loss

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
BF16 = torch.bfloat16

# shapes of record on a GPU; on a CPU (the 2-core machine) the native backend's shapes of record (issue 13):
# one BN layer [32,64,56,56] channels_last, alignment B=32, N=196, D=192, C=128
BN_SHAPE = GPU_BN_SHAPE if GPU else (32, 64, 56, 56)
BN_CHANNELS_LAST = not GPU
ALIGN_SHAPE = GPU_ALIGN_SHAPE if GPU else dict(B=32, N=196, D=192, C=128)
RESNET50_BATCH, RESNET50_SIZE = (GPU_RESNET50_BATCH, GPU_RESNET50_SIZE) if GPU else (2, 64)


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def _bn_fn(variant):
    if variant == "eager":
        return lambda xs, rms, rvs: sum(reference.bn_stat_loss(x, m, v) for x, m, v in zip(xs, rms, rvs))
    if variant == "deepinversion":
        return lambda xs, rms, rvs: sum(deepinversion_bn_loss(x, m, v) for x, m, v in zip(xs, rms, rvs))
    if variant == "compiled":
        return _compiled(_bn_fn("eager"))
    if variant in ("triton", "native"):
        return lambda xs, rms, rvs: ops.bn_stat_losses(xs, rms, rvs, backend=variant).sum()
    raise ValueError(variant)


def bn_case(variant: str, shapes: list[tuple[int, ...]], dtype=BF16, channels_last: bool = False):
    """fwd+bwd of the summed BN-statistics loss over layers of the given input shapes."""
    g = torch.Generator(device=DEV).manual_seed(0)
    xs, rms, rvs = [], [], []
    for s in shapes:
        x = torch.randn(s, device=DEV, generator=g).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xs.append(x.requires_grad_())
        rms.append(torch.randn(s[1], device=DEV, generator=g))
        rvs.append(torch.rand(s[1], device=DEV, generator=g) + 0.5)
    fn = _bn_fn(variant)

    def run():
        for x in xs:
            x.grad = None
        fn(xs, rms, rvs).backward()

    nbytes = sum(3 * x.numel() * x.element_size() for x in xs)  # read x (fwd), read x + write dx (bwd)
    return run, nbytes


def align_case(variant: str, B: int, N: int, D: int, C: int, dtype=BF16, fed: str = "training"):
    """fwd+bwd of the feature-alignment loss. fed="training": as bf16 training feeds it, fp32 strided patch
    tokens (the residual stream) and fp32 projection weights, cast to bf16 at the op boundary by ops under
    autocast, and a bf16 channels_last teacher map (the slice and the casts are part of what is timed).
    fed="op": the op alone, bf16 leaves (contiguous tokens, weight, bias) and the same target, no autocast.
    Every variant goes through ops.feature_align_loss."""
    g = torch.Generator(device=DEV).manual_seed(0)
    side = int(round(N**0.5))
    leaf_dtype = torch.float32 if fed == "training" else dtype
    base = torch.randn(B, N + 2 if fed == "training" else N, D, device=DEV, generator=g).to(leaf_dtype).requires_grad_()
    weight = (torch.randn(C, D, device=DEV, generator=g) / D**0.5).to(leaf_dtype).requires_grad_()
    bias = torch.zeros(C, device=DEV, dtype=leaf_dtype).requires_grad_()
    target = torch.randn(B, C, side, side, device=DEV, generator=g).to(dtype).to(memory_format=torch.channels_last)
    if variant in ("triton", "native"):
        fn = functools.partial(ops.feature_align_loss, backend=variant)
    elif variant == "eager":
        fn = functools.partial(ops.feature_align_loss, backend="torch")
    elif variant == "compiled":
        fn = _compiled(functools.partial(ops.feature_align_loss, backend="torch"))
    else:
        raise ValueError(variant)

    def run():
        for t in (base, weight, bias):
            t.grad = None
        with torch.autocast(DEV, dtype=BF16, enabled=dtype == BF16 and fed == "training"):
            fn(base[:, 2:] if fed == "training" else base, weight, bias, target).backward()

    e = torch.finfo(dtype).bits // 8
    nbytes = (2 * B * N * D + 2 * B * N * C) * e + B * N * D * e  # tokens + target twice, dtokens once (bf16)
    return run, nbytes


BN_VARIANTS = ["eager", "deepinversion", "compiled", "triton", "native"]
ALIGN_VARIANTS = ["eager", "compiled", "triton", "native"]


# ---- input pipeline
THREADS = int(os.environ.get("DEARKD_BENCH_THREADS", min(4, os.cpu_count() or 1)))


def imagenet_sized_folder(n_per_class=50, classes=4) -> str:
    root = os.path.join(cache_root(), "bench_500x375")
    if not os.path.isfile(os.path.join(root, ".complete")):
        rng = np.random.default_rng(0)
        for c in range(classes):
            os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
            for i in range(n_per_class):
                # smooth random images compress like photographs, unlike white noise
                small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
                Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(
                    os.path.join(root, f"c{c}", f"{i}.jpg"), quality=90)
        open(os.path.join(root, ".complete"), "w").close()
    return root


def data_loader(root, val_root, backend, size, train, fraction=1.0):
    data = folder_data(root, backend, val_source=val_root, size=size, crop_pct=0.875 if size > 64 else 1.0,
                       batch_size=64, workers=THREADS, device=DEV, pad_crop=False, hflip=0.5, fraction=fraction)
    return (data.train, data.num_train) if train else (data.val, data.num_val)




# ---- DeepInversion iterations
P = INVERSION[("deepinversion", "224")]  # the public DeepInversion coefficients, for both variants
INVERT_CFG = dict(arch="resnet50", batch=84, res=224, num_classes=1000) if GPU else \
    dict(arch="cifar_resnet8", batch=64, res=32, num_classes=10)


class PublicBNHook:
    """The public DeepInversion feature hook's way: fp32 eager arithmetic in a forward hook per BN layer."""

    def __init__(self, bn):
        self.handle = bn.register_forward_hook(self.hook)
        self.r_feature = None

    def hook(self, bn, inputs, output):
        self.r_feature = deepinversion_bn_loss(inputs[0], bn.running_mean, bn.running_var)


def inversion_case(variant: str, arch: str, batch: int, res: int, num_classes: int):
    """One DeepInversion iteration (forward, backward, Adam step on the images).

    "public": fp32 eager, per-layer hooks; "fast": DeepInversionLoss (grouped ops.bn_stat_losses, backend
    "auto": Triton on CUDA, the native ops on a CPU when built), bf16 autocast, channels_last on CUDA;
    "fast-torch": "fast" with backend "torch" (the CPU path before the native backend); "fast-compiled":
    "fast" plus torch.compile of the teacher.
    """
    from dearkd_fast.losses import DeepInversionLoss
    from dearkd_fast.models.teacher import create_teacher_model

    torch.manual_seed(0)
    model = create_teacher_model(arch, num_classes).to(DEV).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, res, res, device=DEV)
    y = torch.arange(batch, device=DEV) % num_classes
    if variant == "public":
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        hooks = [PublicBNHook(b) for b in bns]
        x.requires_grad_()
        opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))

        def step():
            opt.zero_grad()
            logits = model(x)
            bn = sum((P.first_bn_mult if i == 0 else 1.0) * h.r_feature for i, h in enumerate(hooks))
            tv2, _ = reference.tv_losses(x)
            loss = torch.nn.functional.cross_entropy(logits, y) + P.r_bn * bn + P.tv_l2 * tv2 + P.l2 * x.norm()
            loss.backward()
            opt.step()

        return step
    if variant not in ("fast", "fast-torch", "fast-compiled"):
        raise ValueError(variant)
    if GPU:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    # the public coefficients (INVERSION[("deepinversion", "224")]) are its defaults
    crit = DeepInversionLoss(model, backend="torch" if variant == "fast-torch" else "auto")
    if variant == "fast-compiled":
        crit.teacher = torch.compile(model)

    def step():
        opt.zero_grad()
        with torch.autocast(DEV, dtype=BF16):
            loss = crit(x, y)
        loss.backward()
        opt.step()

    return step


INVERT_VARIANTS = ["public", "fast-torch", "fast", "fast-compiled"]


# ---- training step (stage 1 and stage 2), in-memory synthetic batches
STEP_CFG = dict(student="dearkd_small_patch16_224", teacher="resnet50", res=224, batch=256, num_classes=1000) if GPU \
    else dict(student="dearkd_tiny_patch4_32", teacher="cifar_resnet20", res=32, batch=64, num_classes=10)
STEP_VARIANTS = ["plain", "stock-fast", "ours"]
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM), for model FLOP utilisation


def train_step_case(variant: str, stage: int, student: str, teacher: str, res: int, batch: int, num_classes: int):
    """(step closure, FLOPs per step) of one training step of the DearKD trainer.

    "plain": fp32 eager, reference MHCA (full attention matrix), backend "torch", for-loop AdamW;
    "stock-fast": plus bf16 autocast and torch.compile of the step's forward + loss (PyTorch alone);
    "ours": bf16, the whole step compiled, MHCA's automatic path (fused SDPA on CUDA, the reference on a
    CPU, where it measured faster), backend "auto" (Triton on CUDA), fused
    (CUDA) / foreach (CPU) AdamW, channels_last teacher on CUDA. Stage 2 never runs the teacher.
    """
    import timm

    from dearkd_fast import engine
    from dearkd_fast.losses import DearKDLoss
    from dearkd_fast.models.teacher import Teacher, TeacherSpec, create_teacher_model

    torch.manual_seed(0)
    dev = torch.device(DEV)
    model = timm.create_model(student, num_classes=num_classes).to(dev)
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = None if variant == "ours" else False  # ours: fused on CUDA, the faster reference on a CPU
    tmodel = create_teacher_model(teacher, num_classes).to(dev)
    if GPU and variant == "ours":
        tmodel = tmodel.to(memory_format=torch.channels_last)
    spec = TeacherSpec(teacher, num_classes, [str(i) for i in range(num_classes)], res, IMAGENET_MEAN, IMAGENET_STD)
    t = Teacher(tmodel, spec)
    model.set_alignment(t.channels())  # the projections are the student's
    crit = DearKDLoss(torch.nn.CrossEntropyLoss(), t, backend="auto" if variant == "ours" else "torch")
    crit.set_stage(stage, model)
    params = [{"params": list(model.parameters())}]
    opt = engine.make_optimizer(params, 1e-4) if variant == "ours" else \
        torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)
    step = engine.TrainStep(model, crit, opt, engine.cosine_schedule(opt, 0, 10**6), device=dev,
                            amp=variant != "plain", compile=variant != "plain")
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(batch, 3, res, res, device=DEV, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=DEV, generator=g)
    model.train()
    return (lambda: step(x, y)), step_flops(model, t if stage == 1 else None, x)


def step_flops(model, teacher, x) -> float:
    """FLOPs of one step counted by torch's FlopCounterMode on a 2-image batch, scaled to the batch:
    student forward + backward, plus the teacher forward in stage 1 (eager fp32 count)."""
    from torch.utils.flop_counter import FlopCounterMode

    xs = x[:2].float()
    with FlopCounterMode(display=False) as fc:
        out = model(xs)
        sum(o.float().sum() for o in out[:2]).backward()
        if teacher is not None:
            teacher(xs)
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() * x.shape[0] / 2
