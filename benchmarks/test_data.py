"""Input pipeline throughput: torchvision DataLoader vs DALI with the same number of CPU threads.

`pytest benchmarks/test_data.py --benchmark-only`. Images per second are in extra_info. Sets: the
CIFAR-10 JPEGs of ../shared/data/cifar10 (train: a class-balanced 2,000-image slice; eval: the
10,000 test images; skipped with a reason where the tarballs are absent) and generated 500x375 JPEGs
(ImageNet-sized, written once into the cache).
On a CPU machine DALI runs in its CPU-only mode; on a GPU it decodes with "mixed".
"""
import os

import pytest
import torch
from cases import DEV as DEVICE
from cases import THREADS, data_loader, imagenet_sized_folder

CIFAR_DIR = os.environ.get("DEARKD_CIFAR10_DIR",
                           os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))


def cifar10() -> tuple[str, str]:
    if not os.path.isfile(os.path.join(CIFAR_DIR, "train.tar.gz")):
        pytest.skip(f"CIFAR-10 tarballs not found in {CIFAR_DIR} (set DEARKD_CIFAR10_DIR)")
    from dearkd_fast.data.folder import builtin_cifar10

    return builtin_cifar10(CIFAR_DIR)


def _run(benchmark, loader, n_images):
    def epoch():
        count = 0
        for x, _ in loader:
            count += x.shape[0]
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return count

    epoch()  # warm-up: workers, pipeline build
    count = benchmark.pedantic(epoch, rounds=3, iterations=1)
    benchmark.extra_info.update(images=count, threads=THREADS, device=DEVICE,
                                images_per_s=round(count / benchmark.stats["median"], 1))


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.benchmark(group="500x375 JPEG -> 224 px")
def test_imagenet_sized(benchmark, backend, mode):
    root = imagenet_sized_folder()
    loader, n = data_loader(root, root, backend, 224, mode == "train")
    _run(benchmark, loader, n)


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.benchmark(group="CIFAR-10 JPEG -> 32 px (train: 2,000-image slice; eval: the 10,000 test images)")
def test_cifar10(benchmark, backend, mode):
    train_dir, test_dir = cifar10()
    loader, n = data_loader(train_dir, test_dir, backend, 32, mode == "train", fraction=0.04)
    _run(benchmark, loader, n)
