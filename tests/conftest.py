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
