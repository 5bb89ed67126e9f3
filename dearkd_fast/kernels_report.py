"""What the Triton kernels compile to on a GPU this machine may not have: `python -m dearkd_fast.kernels_report`.

Every launch that the ops would make at the shapes of record (the GPU benchmark cases) is planned by the ops'
own plan functions on the meta device, specialised exactly as the JIT specialises it on a device (Triton's own
binder: 16-byte aligned pointers, integers divisible by 16, integers equal to 1 as constants), compiled ahead of
time for the target (default sm_90: H100/H200) through Triton's own cache (TRITON_CACHE_DIR decides where the
PTX lands), and read back: registers, spills and shared memory from `ptxas -v`, the widest global loads and
stores, tensor-core instructions (wgmma), integer division, and the launch grid.

    python -m dearkd_fast.kernels_report [--arch sm_90] [--json FILE] [--case NAME ...]

It needs no GPU. Under TRITON_INTERPRET=1 the kernels are interpreted objects that cannot be compiled, so the
tool runs itself again without that variable.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .errors import BackendError, RunError

PROG = "dearkd_fast.kernels_report"

# the benchmark shapes of record on a GPU (benchmarks/cases.py takes them from here)
BN_SHAPE = (256, 64, 56, 56)
RESNET50_BATCH, RESNET50_SIZE = 84, 224
ALIGN_SHAPE = dict(B=256, N=196, D=384, C=256)


def resnet50_bn_shapes(batch: int, size: int) -> list[tuple[int, ...]]:
    """Input shapes of every BatchNorm2d of timm's resnet50 (found on the meta device)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("resnet50")
        shapes = []
        hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
                 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        model(torch.empty(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


@dataclass
class KernelFacts:
    case: str
    kernel: str
    note: str
    grid: list
    programs: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    load_bits: int  # widest global load of a tensor tile (128 = 16-byte vectors)
    store_bits: int
    scalar_16bit_loads: int  # ld.global.b16 / u16: an element-wise bf16/fp16 load
    wgmma: int  # wgmma.mma_async instructions
    mma_sync: int  # pre-Hopper mma.sync instructions
    int_div_rem: int  # div.s/u and rem.s/u on integers
    ptx_file: str


def _meta(shape, dtype, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _bn_launches(shapes, dtype, channels_last):
    from dearkd_fast.kernels import bn_stat

    xs = [_meta(s, dtype, channels_last) for s in shapes]
    launches, mean, var = bn_stat.plan_moments(xs)
    grads = torch.empty_like(mean)
    launches += bn_stat.plan_moments_backward(xs, [torch.empty_like(x) for x in xs], mean, grads, grads)
    return launches


def _align_launches(dtype, tokens_dtype=None, B=256, N=196, D=384, C=256):
    from dearkd_fast.kernels import feature_align

    side = int(N ** 0.5)
    # a ViT's whole sequence (cls + dist tokens first), a channels_last teacher map, as training feeds them
    tokens = torch.empty((B, N + 2, D), dtype=tokens_dtype or dtype, device="meta")
    weight = torch.empty((C, D), dtype=dtype, device="meta")
    bias = torch.empty((C,), dtype=dtype, device="meta")
    target = _meta((B, C, side, side), dtype, channels_last=True)
    launches, _, _ = feature_align.plan_align(tokens, weight, bias, target, grads=True)
    return launches


def cases() -> dict[str, Callable[[], list]]:
    """Name -> the launches of that case, at the shapes, dtypes and layouts of record."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return {
        "bn-one-layer-bf16-channels_last": lambda: _bn_launches([BN_SHAPE], bf16, True),
        "bn-one-layer-bf16-nchw": lambda: _bn_launches([BN_SHAPE], bf16, False),
        "bn-one-layer-fp32-channels_last": lambda: _bn_launches([BN_SHAPE], fp32, True),
        "bn-resnet50-bf16-channels_last": lambda: _bn_launches(resnet50_bn_shapes(RESNET50_BATCH, RESNET50_SIZE), bf16, True),
        "align-bf16": lambda: _align_launches(bf16, **ALIGN_SHAPE),
        "align-fp16": lambda: _align_launches(fp16, **ALIGN_SHAPE),
        "align-fp32-tokens-bf16-weight": lambda: _align_launches(bf16, fp32, **ALIGN_SHAPE),
    }


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    raise BackendError(f"{PROG}: kernels are interpreted (TRITON_INTERPRET=1); run without it")


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_launch(launch, arch: str):
    """Compile one Launch for `arch` as the JIT would on that device; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    cc = int(arch.removeprefix("sm_").rstrip("a"))
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    fn = _jit_function(launch.kernel)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _ptxas_facts(ptx: str, arch: str, path: str) -> tuple[int, int, int]:
    with open(path, "w") as fh:
        fh.write(ptx)
    sm = arch if arch.endswith("a") or arch != "sm_90" else "sm_90a"
    run = subprocess.run([_ptxas(), f"-arch={sm}", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    text = run.stdout + run.stderr
    if run.returncode != 0:
        raise RunError(f"{PROG}: ptxas failed on {path}: {text.strip().splitlines()[-1] if text.strip() else ''}")
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", text)), default=0)
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text))
    return regs, stores, loads


_WIDTH = {"b8": 8, "u8": 8, "b16": 16, "u16": 16, "b32": 32, "u32": 32, "f32": 32, "b64": 64, "u64": 64}


def _widest(ptx: str, op: str) -> int:
    """Widest global access of kind op ('ld' or 'st') in bits: vector count x element width."""
    best = 0
    for vec, kind in re.findall(rf"\b{op}\.global(?:\.\w+)*?(?:\.v(\d))?\.([bu]\d+|f32)\b", ptx):
        best = max(best, int(vec or 1) * _WIDTH.get(kind, 0))
    return best


def facts_of(case: str, launch, compiled, arch: str, folder: str) -> KernelFacts:
    ptx = compiled.asm["ptx"]
    name = compiled.metadata.name
    path = os.path.join(folder, f"{case}-{name}.ptx")
    regs, spill_st, spill_ld = _ptxas_facts(ptx, arch, path)
    return KernelFacts(
        case=case, kernel=name, note=launch.note, grid=[int(g) for g in launch.grid], programs=launch.programs,
        num_warps=launch.num_warps, num_stages=launch.num_stages, registers=regs, spill_stores=spill_st,
        spill_loads=spill_ld, shared_bytes=int(compiled.metadata.shared), load_bits=_widest(ptx, "ld"),
        store_bits=_widest(ptx, "st"),
        scalar_16bit_loads=len(re.findall(r"\bld\.global(?:\.\w+)*?\.[bu]16\b", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)), mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
        int_div_rem=len(re.findall(r"\b(?:div|rem)(?:\.\w+)*?\.[su](?:16|32|64)\b", ptx)), ptx_file=path)


def report(arch: str = "sm_90", only: list[str] | None = None, folder: str | None = None) -> list[KernelFacts]:
    os.environ.setdefault("DEARKD_TARGET_ARCH", arch)  # plans pick the table's configs for this architecture
    folder = folder or tempfile.mkdtemp(prefix="dearkd-ptx-")
    os.makedirs(folder, exist_ok=True)
    rows = []
    for name, make in cases().items():
        if only and name not in only:
            continue
        for launch in make():
            rows.append(facts_of(name, launch, compile_launch(launch, arch), arch, folder))
    return rows


def table(rows: list[KernelFacts]) -> str:
    head = ("| case | kernel | what | grid (programs) | warps/stages | regs | spills st/ld B | smem B | widest ld/st bits "
            "| 16-bit scalar ld | wgmma | mma.sync | int div/rem |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r.case} | {r.kernel} | {r.note} | {'x'.join(map(str, r.grid))} ({r.programs}) | "
                   f"{r.num_warps}/{r.num_stages} | {r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | "
                   f"{r.load_bits}/{r.store_bits} | {r.scalar_16bit_loads} | {r.wgmma} | {r.mma_sync} | {r.int_div_rem} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sm_90", help="target architecture, e.g. sm_90 (H100/H200; default)")
    p.add_argument("--json", metavar="FILE", help="also write the facts as JSON")
    p.add_argument("--case", action="append", choices=sorted(cases()), help="only these cases (repeatable)")
    p.add_argument("--ptx-dir", metavar="DIR", help="where to keep the PTX files (default: a temporary folder)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        print(f"{PROG}: --arch must look like sm_90, got '{args.arch}'", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels cannot be compiled: run again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", PROG, *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    rows = report(args.arch, args.case, args.ptx_dir)
    print(f"Triton kernels compiled ahead of time for {args.arch} (no GPU needed)\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
