"""One-shot GPU check: copy bandwidth, correctness at the shapes of record, kernel timings.

Prints a markdown table and writes it to <out>/gpu_check.md. Run through gpu_check.sh.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from cases import (  # noqa: E402
    ALIGN_SHAPE,
    ALIGN_VARIANTS,
    BN_SHAPE,
    BN_VARIANTS,
    INVERT_CFG,
    INVERT_VARIANTS,
    RESNET50_BATCH,
    RESNET50_SIZE,
    STEP_CFG,
    STEP_VARIANTS,
    THREADS,
    align_case,
    bn_case,
    data_loader,
    imagenet_sized_folder,
    inversion_case,
    resnet50_bn_shapes,
    train_step_case,
)

# the native backend takes CPU tensors: timed on the CPU machine (benchmarks/test_kernels.py), not here
GPU_BN = [v for v in BN_VARIANTS if v != "native"]
GPU_ALIGN = [v for v in ALIGN_VARIANTS if v != "native"]

from dearkd_fast import ops, reference  # noqa: E402


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def peak_mib(run) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def correctness() -> list[str]:
    """Fused vs float64 reference at the shapes of record (loss and gradients)."""
    lines = []
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(BN_SHAPE, device="cuda", generator=g) + 3).bfloat16().to(memory_format=torch.channels_last)
    rm, rv = torch.randn(BN_SHAPE[1], device="cuda", generator=g), torch.rand(BN_SHAPE[1], device="cuda", generator=g)
    xl = x.detach().requires_grad_()
    loss = ops.bn_stat_loss(xl, rm, rv, backend="triton")
    loss.backward()
    xd = x.detach().double().requires_grad_()
    ref = reference.bn_stat_loss(xd, rm.double(), rv.double())
    ref.backward()
    lines.append(f"bn_stat_loss {BN_SHAPE} bf16 channels_last: loss rel err {rel(loss, ref):.2e}, "
                 f"dx rel err {rel(xl.grad, xd.grad):.2e}")
    B, N, D, C = ALIGN_SHAPE["B"], ALIGN_SHAPE["N"], ALIGN_SHAPE["D"], ALIGN_SHAPE["C"]
    t = torch.randn(B, N + 2, D, device="cuda", generator=g).bfloat16()[:, 2:]
    w = (torch.randn(C, D, device="cuda", generator=g) / D**0.5).bfloat16()
    b = torch.randn(C, device="cuda", generator=g).bfloat16()
    f = torch.randn(B, C, 14, 14, device="cuda", generator=g).bfloat16().to(memory_format=torch.channels_last)
    leaves = [a.detach().clone().requires_grad_() for a in (t, w, b)]
    loss = ops.feature_align_loss(*leaves, f, backend="triton")
    loss.backward()
    dl = [a.detach().double().requires_grad_() for a in (t, w, b)]
    ref = reference.feature_align_loss(*dl, f.double())
    ref.backward()
    errs = ", ".join(f"d{n} {rel(a.grad, r.grad):.2e}" for n, a, r in zip("TWb", leaves, dl))
    lines.append(f"feature_align_loss B{B} N{N} D{D} C{C} bf16: loss rel err {rel(loss, ref):.2e}, {errs}")
    return lines


def inversion_rows() -> list[str]:
    """DeepInversion iterations/s: the public code's way vs our fast path (goal: >= 3x)."""
    cfg = INVERT_CFG
    rows = [f"## DeepInversion iteration ({cfg['arch']}, random weights, batch {cfg['batch']}, {cfg['res']} px)", "",
            "| variant | median ms | it/s | x public |", "|---|---|---|---|"]
    times = {}
    for v in [v for v in INVERT_VARIANTS if v != "fast-torch"]:  # the CPU's comparison (native vs torch)
        try:
            step = inversion_case(v, **cfg)
            step()
            step()
            times[v] = ms(step)
        except Exception as e:  # noqa: BLE001
            rows.append(f"| {v} | failed: {type(e).__name__}: {str(e)[:80]} | | |")
        torch.cuda.empty_cache()
    for v, t in times.items():
        x = f"{times['public'] / t:.2f}" if "public" in times else "-"
        rows.append(f"| {v} | {t:.1f} | {1000 / t:.2f} | {x} |")
    return rows


def train_step_rows(t_start: float, budget_s: float = float(os.environ.get("DEARKD_GPU_CHECK_BUDGET", 420))) -> list[str]:
    """The training step of record, plain / stock fast / ours, stages 1 and 2: images/s, x plain, x stock,
    peak memory and model FLOP utilisation (dense bf16 peak 989 TFLOP/s on H100/H200 SXM). Rows past the
    time budget are skipped (the whole check must stay under 8 minutes)."""
    c = STEP_CFG
    rows = [f"## training step ({c['student']} + {c['teacher']}, {c['res']} px, batch {c['batch']}, synthetic batches)", "",
            "| stage | variant | median ms | images/s | x plain | x stock-fast | peak MiB | MFU % |",
            "|---|---|---|---|---|---|---|---|"]
    for stage in (1, 2):
        times = {}
        for v in STEP_VARIANTS:
            if time.time() - t_start > budget_s:
                rows.append(f"| {stage} | {v} | skipped: time budget | | | | | |")
                continue
            try:
                run, flops = train_step_case(v, stage, **c)
                for _ in range(3):
                    run()
                times[v] = (ms(run), peak_mib(run), flops)
            except Exception as e:  # noqa: BLE001
                rows.append(f"| {stage} | {v} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | |")
            torch.cuda.empty_cache()
        for v, (t, peak, flops) in times.items():
            sp = lambda k, t=t, times=times: f"{times[k][0] / t:.2f}" if k in times else "-"  # noqa: E731
            rows.append(f"| {stage} | {v} | {t:.1f} | {c['batch'] / t * 1e3:.0f} | {sp('plain')} | {sp('stock-fast')} | "
                        f"{peak:.0f} | {100 * flops / (t * 1e-3) / 989e12:.1f} |")
    return rows


def loader_rows() -> list[str]:
    """Images/s of the torchvision DataLoader vs DALI (GPU "mixed" decode), same CPU threads, 224 px."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return ["## input pipeline", "", "DALI is not installed on this machine: loader figures skipped."]
    rows = [f"## input pipeline (500x375 JPEG -> 224 px, {THREADS} CPU threads)", "",
            "| transform | torchvision img/s | DALI mixed img/s | DALI / torchvision |", "|---|---|---|---|"]
    root = imagenet_sized_folder()
    for mode in ("train", "eval"):
        rate = {}
        for backend in ("torch", "dali"):
            loader, _ = data_loader(root, root, backend, 224, mode == "train")
            for _ in loader:  # warm-up epoch
                pass
            torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            for _ in range(3):
                for x, _y in loader:
                    n += x.shape[0]
            torch.cuda.synchronize()
            rate[backend] = n / (time.perf_counter() - t0)
        rows.append(f"| {mode} | {rate['torch']:.0f} | {rate['dali']:.0f} | {rate['dali'] / rate['torch']:.2f} |")
    return rows


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    t0 = time.time()
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    header = [f"# gpu_check on {name}", "", f"torch {torch.__version__}, triton {triton.__version__}, "
              f"date {time.strftime('%Y-%m-%d')}, copy bandwidth {bw:.0f} GB/s (1 GiB D2D, read+write)", ""]
    try:
        checks = correctness()
    except Exception as e:  # noqa: BLE001 - report and keep timing
        checks = [f"correctness check FAILED: {type(e).__name__}: {e}"]
    header += ["## correctness (fused vs float64 reference)", ""] + [f"- {c}" for c in checks] + [""]
    groups = [
        (f"bn_stat_loss {BN_SHAPE} bf16, fwd+bwd", GPU_BN, lambda v: bn_case(v, [BN_SHAPE])),
        (f"bn_stat_loss resnet50 all {len(resnet50_bn_shapes(RESNET50_BATCH, RESNET50_SIZE))} BN inputs, batch "
         f"{RESNET50_BATCH}, {RESNET50_SIZE} px, bf16 channels_last, fwd+bwd", GPU_BN,
         lambda v: bn_case(v, resnet50_bn_shapes(RESNET50_BATCH, RESNET50_SIZE), channels_last=True)),
        (f"feature_align_loss B{ALIGN_SHAPE['B']} N{ALIGN_SHAPE['N']} D{ALIGN_SHAPE['D']} C{ALIGN_SHAPE['C']} bf16, fwd+bwd",
         GPU_ALIGN, lambda v: align_case(v, **ALIGN_SHAPE)),
    ]
    rows = ["| case | variant | median ms | GB/s | % copy BW | x eager | x compiled | x deepinversion | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for title, variants, make in groups:
        times = {}
        for v in variants:
            try:
                run, nbytes = make(v)
                run()
                times[v] = (ms(run), nbytes, peak_mib(run))
            except Exception as e:  # noqa: BLE001
                rows.append(f"| {title} | {v} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | | |")
            torch.cuda.empty_cache()
        for v, (t, nbytes, peak) in times.items():
            gbs = nbytes / (t * 1e-3) / 1e9
            sp = lambda k, t=t, times=times: f"{times[k][0] / t:.2f}" if k in times else "-"  # noqa: E731
            rows.append(f"| {title} | {v} | {t:.3f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {sp('eager')} | "
                        f"{sp('compiled')} | {sp('deepinversion')} | {peak:.0f} |")
    text = "\n".join(header + ["## timings (triton.testing.do_bench median)", ""] + rows + [""] + inversion_rows() + [""] +
                     train_step_rows(t0) + [""] +
                     loader_rows() +
                     ["", f"total {time.time() - t0:.0f} s"]) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
