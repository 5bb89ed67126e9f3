"""What every Triton op of the project shares: a launch as data, the config table, and the device facts
that size a grid.

A `Launch` is one kernel launch written down (kernel, grid, arguments, constexprs, warps, stages) before it
runs. The ops build their launches with plan functions and run them; `dearkd_fast.kernels_report` compiles
the very same launches ahead of time for a GPU this machine does not have and reads their PTX. So the
report sees exactly what the launcher would launch.

Configs (block sizes, warps, stages) come from `configs.json` beside this file, keyed by
(op, dtype, shape class, architecture); `benchmarks/sweep.py` writes that table from timings on a card.
A key the table lacks falls back to the heuristic given by the op.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import triton

__all__ = ["Launch", "sm_count", "arch_of", "pick_config", "config_table", "config_key", "CONFIG_FILE", "PROGRAMS_PER_SM",
           "OVERRIDES"]

CONFIG_FILE = Path(__file__).with_name("configs.json")
PROGRAMS_PER_SM = 2  # programs in flight per SM for a split reduction: the floor of 2 per SM of a 132-SM card
HOPPER_SMS = 132  # H100 / H200 SXM: the SM count assumed where no GPU is present (ahead-of-time plans, the interpreter)


@dataclass
class Launch:
    """One kernel launch, written down before it runs."""

    kernel: Any  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    note: str = ""  # what this launch does, for the report
    meta: dict = field(default_factory=dict)  # facts the report prints beside the compiler's (bytes, FLOPs)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


def sm_count(device: torch.device | str | None) -> int:
    """SMs of a CUDA device; a Hopper's 132 elsewhere (ahead-of-time plans and the interpreter size grids
    as the target card would)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_SMS


def arch_of(device: torch.device | str | None) -> str:
    """'sm_90' style name of a CUDA device's architecture; 'sm_90' (the target of record) elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return os.environ.get("DEARKD_TARGET_ARCH", "sm_90")


@functools.lru_cache(maxsize=1)
def config_table() -> dict:
    """The committed table: {"<op>|<dtype>|<shape class>|<arch>": {block sizes, num_warps, num_stages}}."""
    if not CONFIG_FILE.is_file():
        return {}
    with open(CONFIG_FILE, encoding="utf-8") as fh:
        return json.load(fh).get("configs", {})


OVERRIDES: dict = {}  # config key -> config, consulted first: how benchmarks/sweep.py times candidates


def config_key(op: str, dtype: torch.dtype, shape_class: str, arch: str) -> str:
    return f"{op}|{str(dtype).removeprefix('torch.')}|{shape_class}|{arch}"


def pick_config(op: str, dtype: torch.dtype, shape_class: str, arch: str, heuristic: Callable[[], dict]) -> dict:
    """The table's config for (op, dtype, shape class, arch), else the op's heuristic."""
    key = config_key(op, dtype, shape_class, arch)
    found = OVERRIDES.get(key) or config_table().get(key)
    if found is None:
        return heuristic()
    return {k: v for k, v in found.items() if not k.startswith("_")}  # "_..." fields record where it came from


def dtype_bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
