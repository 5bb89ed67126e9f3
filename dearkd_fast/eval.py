"""python -m dearkd_fast.eval: top-1 / top-5 and images/s of a trained student (student.pt) on a validation split.

The split and its preprocessing are the trainer's: `--data` (and `--val-data`, `--val-fraction`) choose the same
images the trainer validated on, at the student's input size and normalisation, so a checkpoint scores here what
its run reported (the same --amp; the trainer validates with batches of twice its --batch-size). Exit 0 / 2 (bad
input, one line) / 1.
"""
from __future__ import annotations

import dataclasses
import sys
import time

from . import engine
from .checkpoint import atomic_write_json
from .cli import run_cli
from .config import EvalConfig, resolve_device
from .data import InputSpec, build_data
from .errors import CheckpointError, InputError
from .models.student import load_student

PROG = "dearkd_fast.eval"
DESCRIPTION = __doc__.split("\n\n")[0]


def run(cfg: EvalConfig) -> dict:
    device = resolve_device(cfg.device)
    model, meta = load_student(cfg.checkpoint, device)
    inputs = InputSpec.of_cfg(model.pretrained_cfg)
    if (inputs.size, tuple(inputs.mean), tuple(inputs.std)) != (meta["input_size"], tuple(meta["mean"]),
                                                                tuple(meta["std"])):
        raise CheckpointError(f"'{cfg.checkpoint}' was trained at another input size or normalisation than "
                              f"{meta['arch']} has here")
    data = build_data(dataclasses.replace(cfg.data, eval_batch_size=cfg.batch_size), inputs, batch_size=1,
                      device=device, amp=cfg.amp, progress=not cfg.no_progress)
    if list(data.classes) != list(meta["class_names"]):
        raise InputError(f"--data has classes {list(data.classes)[:3]}... but '{cfg.checkpoint}' was trained on "
                         f"{list(meta['class_names'])[:3]}... (count {len(meta['class_names'])})")
    t0 = time.perf_counter()
    res = engine.evaluate(model, data.val, device=device, amp=cfg.amp, amp_dtype=cfg.autocast_dtype,
                          progress=not cfg.no_progress)
    seconds = time.perf_counter() - t0
    out = {"checkpoint": cfg.checkpoint, "model": meta["arch"], "data": data.name, "top1": res["top1"],
           "top5": res["top5"], "loss": res["loss"], "num_samples": res["num_samples"],
           "images_per_s": round(res["num_samples"] / max(seconds, 1e-9), 1), "device": str(device), "amp": cfg.amp}
    print(f"{meta['arch']} on {data.name} val ({res['num_samples']} images): top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}%  {out['images_per_s']:.0f} images/s on {device}")
    if cfg.json:
        atomic_write_json(out, cfg.json)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, EvalConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
