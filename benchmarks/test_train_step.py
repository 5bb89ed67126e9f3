"""One DearKD training step, three paths side by side: plain, stock fast (PyTorch alone), ours.

`pytest benchmarks/test_train_step.py --benchmark-only`. In-memory synthetic batches (the loader is out
of the measurement). GPU configuration of record: dearkd_small_patch16_224 + timm resnet50, 224 px,
batch 256; CPU: dearkd_tiny_patch4_32 + cifar_resnet20, 32 px, batch 64 (benchmarks/cases.py).
extra_info holds images/s, peak memory (CUDA) and model FLOP utilisation (CUDA, against the card's
dense bf16 peak). The compiled paths compile during the warm-up rounds (tens of seconds on a CPU).
"""
import pytest
import torch
from cases import BF16_PEAK_TFLOPS, GPU, STEP_CFG, STEP_VARIANTS, train_step_case


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.benchmark(group=f"train step: {STEP_CFG['student']} + {STEP_CFG['teacher']}, {STEP_CFG['res']} px, "
                             f"batch {STEP_CFG['batch']}")
def test_train_step(benchmark, stage, variant):
    run, flops = train_step_case(variant, stage, **STEP_CFG)
    for _ in range(3):  # warm-up: compilation, allocator, autotuning
        run()
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def timed():
        run()
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=6 if not GPU else 10, iterations=1)
    median = benchmark.stats["median"]
    benchmark.extra_info["images_per_s"] = round(STEP_CFG["batch"] / median, 1)
    benchmark.extra_info["tflops_per_s"] = round(flops / median / 1e12, 3)
    if GPU:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        benchmark.extra_info["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        benchmark.extra_info["mfu_percent"] = round(100 * flops / median / 1e12 / peak, 1) if peak else None
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if GPU else "cpu"
