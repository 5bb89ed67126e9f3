"""Config sweep on a lent GPU: time candidate configs of every Triton op at the benchmark shapes and write the
winners as the config table (kernels/configs.json's format). One command on a new card:

    python benchmarks/sweep.py OUT_DIR          (gpu_check.sh runs it first)

Without a GPU, `--seed` writes the table from the ops' heuristics (marked unmeasured) for the target
architecture, which is what is committed until a card has been swept.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

from dearkd_fast import ops, reference
from dearkd_fast.kernels import bn_stat, feature_align, grid
from dearkd_fast.kernels_report import ALIGN_SHAPE, BN_SHAPE

BF16 = torch.bfloat16


def bn_candidates(cls: str):
    if cls == "rows":
        for br, bc, w in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
            yield dict(BLOCK_R=br, BLOCK_C=bc, num_warps=w, num_stages=1)
    else:
        for br, bc, w in itertools.product((1, 2, 4), (512, 1024, 2048), (4, 8)):
            yield dict(BLOCK_R=br, BLOCK_C=bc, num_warps=w, num_stages=1)


def align_candidates():
    for bm, bc, bk, bd, w, st in itertools.product((64, 128), (64, 128), (32, 64), (128, 256), (4, 8), (2, 3)):
        yield dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, BLOCK_D=bd, num_warps=w, num_stages=st)


def bn_cases():
    for cl in (True, False):
        x = torch.randn(BN_SHAPE, device="cuda").to(BF16)
        x = x.to(memory_format=torch.channels_last) if cl else x
        rm, rv = torch.randn(BN_SHAPE[1], device="cuda"), torch.rand(BN_SHAPE[1], device="cuda") + 0.5
        yield bn_stat.shape_class(x), x.requires_grad_(), rm, rv


def align_case(dtype=BF16):
    B, N, D, C = (ALIGN_SHAPE[k] for k in "BNDC")
    t = torch.randn(B, N + 2, D, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(C, D, device="cuda") / D**0.5).to(dtype).requires_grad_()
    b = torch.randn(C, device="cuda").to(dtype).requires_grad_()
    f = torch.randn(B, C, 14, 14, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    return t, w, b, f


def time_config(key: str, cfg: dict, run, check) -> float | None:
    import triton.testing

    grid.OVERRIDES[key] = cfg
    try:
        run()
        if not check():
            return None
        return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
    except Exception:  # noqa: BLE001 - a config that does not compile or fit is skipped
        return None
    finally:
        grid.OVERRIDES.pop(key, None)
        bn_stat._tables.cache_clear()


def best_of(key: str, candidates, run, check, deadline: float, table: dict) -> None:
    """Time every candidate (until the deadline) and record the fastest correct one under key."""
    timed = [(time_config(key, c, run, check), c) for c in candidates if time.time() < deadline]
    timed = [(t, c) for t, c in timed if t is not None]
    if timed:
        t, c = min(timed, key=lambda p: p[0])
        table[key] = dict(c, _ms=round(t, 4), _measured=f"{torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d')}")
    print(key, table.get(key, "no candidate ran"), flush=True)


def sweep(budget_s: float) -> dict:
    arch = grid.arch_of("cuda")
    table, t0 = {}, time.time()
    for cls, x, rm, rv in bn_cases():
        key = grid.config_key("bn_stat", BF16, cls, arch)
        ref = reference.bn_stat_loss(x.detach().double(), rm.double(), rv.double())

        def run(x=x, rm=rm, rv=rv):
            ops.bn_stat_loss(x, rm, rv, backend="triton").backward()

        def check(x=x, rm=rm, rv=rv, ref=ref):
            return abs(float(ops.bn_stat_loss(x, rm, rv, backend="triton")) - float(ref)) <= 1e-4 * abs(float(ref))

        best_of(key, bn_candidates(cls), run, check, t0 + budget_s, table)
    t, w, b, f = align_case()
    key = grid.config_key("feature_align", BF16, feature_align.align_shape_class(w.shape[1], w.shape[0]), arch)
    ref = reference.feature_align_loss(t[:, 2:].detach().double(), w.detach().double(), b.detach().double(), f.double())

    def run_a():
        ops.feature_align_loss(t[:, 2:], w, b, f, backend="triton").backward()

    def check_a():
        return abs(float(ops.feature_align_loss(t[:, 2:], w, b, f, backend="triton")) - float(ref)) <= 1e-3 * abs(float(ref))

    best_of(key, align_candidates(), run_a, check_a, t0 + budget_s, table)
    return table


def seed(arch: str) -> dict:
    """The heuristics' configs at the benchmark shape classes, marked unmeasured."""
    table = {}
    for cls in ("rows", "planes", "planes-small"):
        for dtype in (BF16, torch.float16, torch.float32):
            table[grid.config_key("bn_stat", dtype, cls, arch)] = dict(bn_stat._heuristic(cls, dtype), _measured="no")
    D, C = ALIGN_SHAPE["D"], ALIGN_SHAPE["C"]
    for dtype in (BF16, torch.float16, torch.float32):
        key = grid.config_key("feature_align", dtype, feature_align.align_shape_class(D, C), arch)
        table[key] = dict(feature_align._heuristic(D, C, dtype), _measured="no")
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT", "."))
    p.add_argument("--seed", metavar="ARCH", help="write the heuristic table for ARCH (no GPU needed)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("DEARKD_SWEEP_BUDGET", 150)))
    args = p.parse_args()
    if args.seed:
        table = seed(args.seed)
    else:
        if not torch.cuda.is_available():
            print("sweep: no CUDA device (use --seed ARCH to write the heuristic table)", file=sys.stderr)
            return 2
        table = sweep(args.budget)
    merged = {}
    if grid.CONFIG_FILE.is_file():
        merged = json.loads(grid.CONFIG_FILE.read_text()).get("configs", {})
    merged.update(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "configs.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"about": "Triton configs by op|dtype|shape class|arch; written by benchmarks/sweep.py "
                            "(_measured: the card and date it was timed on, or 'no' for the heuristic)",
                   "configs": dict(sorted(merged.items()))}, fh, indent=1)
        fh.write("\n")
    print(f"sweep: wrote {path} ({len(table)} entries this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
