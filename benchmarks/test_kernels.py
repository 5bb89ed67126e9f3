"""Speed of the fused kernels against the plain paths: `pytest benchmarks/test_kernels.py --benchmark-only`.

On a CPU the "triton" variants are skipped (the Triton interpreter measures nothing useful), "native" runs
when its library is built (python -m dearkd_fast.native), and the CPU shapes of record are used
(benchmarks/cases.py); on a GPU the GPU shapes of record, and "native" is skipped (it takes CPU tensors).
"""
import pytest
import torch
from cases import (
    ALIGN_SHAPE,
    ALIGN_VARIANTS,
    BN_CHANNELS_LAST,
    BN_SHAPE,
    BN_VARIANTS,
    GPU,
    RESNET50_BATCH,
    RESNET50_SIZE,
    align_case,
    bn_case,
    resnet50_bn_shapes,
)


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _bench(benchmark, run, nbytes, rounds=5):
    run()  # warm-up (compilation, autotuning)
    _sync()

    def timed():
        run()
        _sync()

    # the 2-core CPU machine is noisy (other jobs share it): three times the rounds there, two warm-up rounds
    benchmark.pedantic(timed, rounds=rounds if GPU else 3 * rounds, iterations=1, warmup_rounds=1 if GPU else 2)
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats["median"] / 1e9, 2)
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if GPU else "cpu"


def _skip_cpu_triton(variant):
    if variant == "triton" and not GPU:
        pytest.skip("Triton variants are timed on a GPU only (benchmarks/gpu_check.sh)")
    if variant == "native":
        from dearkd_fast import native

        if GPU:
            pytest.skip("the native backend takes CPU tensors; timed on the CPU machine")
        if native.unavailable_reason():
            pytest.skip(f"backend 'native' is absent: {native.unavailable_reason()}")


@pytest.mark.parametrize("variant", BN_VARIANTS)
@pytest.mark.benchmark(group="bn_stat_loss one layer bf16 fwd+bwd")
def test_bn_one_layer(benchmark, variant):
    _skip_cpu_triton(variant)
    _bench(benchmark, *bn_case(variant, [BN_SHAPE], channels_last=BN_CHANNELS_LAST))


@pytest.mark.parametrize("variant", BN_VARIANTS)
@pytest.mark.benchmark(group="bn_stat_loss resnet50 all BN layers bf16 fwd+bwd")
def test_bn_resnet50(benchmark, variant):
    _skip_cpu_triton(variant)
    _bench(benchmark, *bn_case(variant, resnet50_bn_shapes(RESNET50_BATCH, RESNET50_SIZE), channels_last=True), rounds=3)


@pytest.mark.parametrize("variant", ALIGN_VARIANTS)
@pytest.mark.benchmark(group="feature_align_loss bf16 fwd+bwd, as training feeds it (fp32 strided tokens, autocast)")
def test_align(benchmark, variant):
    _skip_cpu_triton(variant)
    _bench(benchmark, *align_case(variant, **ALIGN_SHAPE))


@pytest.mark.parametrize("variant", ALIGN_VARIANTS)
@pytest.mark.benchmark(group="feature_align_loss bf16 fwd+bwd, the op alone (bf16 leaves)")
def test_align_op(benchmark, variant):
    _skip_cpu_triton(variant)
    _bench(benchmark, *align_case(variant, **ALIGN_SHAPE, fed="op"))
