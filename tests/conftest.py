import os

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session builds its own cache (digits JPEGs, manifests): no state from outside leaks in."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    yield


def write_image_folder(root, counts: dict[str, int], size=(32, 32), seed=0, ext="jpg"):
    """root/<class>/<i>.<ext> with random RGB images; returns root."""
    g = torch.Generator().manual_seed(seed)
    for cls, n in counts.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(root, cls, f"{i:03d}.{ext}"))
    return str(root)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """teacher.pt of a cifar_resnet8 trained by the trainer on all of `digits` (5 epochs, ~15 s)."""
    from dearkd_fast.train import main

    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["--teacher-epochs", "5", "--epochs", "1", "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    return str(out / "teacher.pt")
