"""DeepInversion iterations per second: the public code's way against our fast path.

`pytest benchmarks/test_invert.py --benchmark-only`. GPU configuration of record: timm resnet50 (random
weights), 224 px, batch 84; CPU: the 32 px cifar_resnet8 teacher, batch 64 (benchmarks/cases.py).
"""
import pytest
import torch
from cases import GPU, INVERT_CFG, INVERT_VARIANTS, inversion_case


@pytest.mark.parametrize("variant", INVERT_VARIANTS)
@pytest.mark.benchmark(group=f"DeepInversion iteration: {INVERT_CFG['arch']}, batch {INVERT_CFG['batch']}, "
                             f"{INVERT_CFG['res']} px")
def test_inversion_iteration(benchmark, variant):
    step = inversion_case(variant, **INVERT_CFG)
    for _ in range(2):  # warm-up (compilation)
        step()
    if GPU:
        torch.cuda.synchronize()

    def timed():
        step()
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1)
    benchmark.extra_info["iterations_per_s"] = round(1.0 / benchmark.stats["median"], 2)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if GPU else "cpu"
