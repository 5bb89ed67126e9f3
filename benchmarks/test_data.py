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


def _small_loader(backend: str, train: bool):
    """CIFAR-10 at 32 px as training reads it (pad-and-crop + flip): the torchvision DataLoader or the resident
    loader, the same threads (torch's intra-op threads for the resident loader's batched tensor ops)."""
    from dearkd_fast.testing import folder_data

    train_dir, test_dir = cifar10()
    torch.set_num_threads(THREADS)
    data = folder_data(train_dir, backend, val_source=test_dir, size=32, batch_size=128, workers=THREADS, device=DEVICE,
                       hflip=0.5, fraction=0.2)
    return (data.train, data.num_train) if train else (data.val, data.num_val)


@pytest.mark.parametrize("backend", ["torch", "resident"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.benchmark(group="CIFAR-10 -> 32 px, pad-and-crop + flip (train: 10,000-image slice; eval: 10,000 test images)")
def test_cifar10_resident(benchmark, backend, mode):
    loader, n = _small_loader(backend, mode == "train")
    _run(benchmark, loader, n)


@pytest.mark.parametrize("backend", ["torch", "resident"])
@pytest.mark.benchmark(group="CIFAR-10 training step: share of the time spent waiting for the next batch")
def test_step_waits_for_data(benchmark, backend):
    """bf16 training steps of dearkd_nano_patch4_32 fed by each loader: extra_info holds the share of wall time
    spent in the loader's next() (goal for the resident loader: < 5 %)."""
    import time

    import timm

    import dearkd_fast  # noqa: F401 - registers the students

    loader, _ = _small_loader(backend, True)
    model = timm.create_model("dearkd_nano_patch4_32", num_classes=10).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def epoch(steps=20):
        wait = 0.0
        it = iter(loader)
        t0 = time.perf_counter()
        for _ in range(steps):
            a = time.perf_counter()
            x, y = next(it)
            wait += time.perf_counter() - a
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return wait / (time.perf_counter() - t0)

    epoch(3)  # warm-up
    shares = []
    benchmark.pedantic(lambda: shares.append(epoch()), rounds=3, iterations=1)
    benchmark.extra_info.update(wait_share=round(sorted(shares)[1], 4), threads=THREADS, device=DEVICE)
