"""Session fixtures. Helpers shared with the benchmarks live in dearkd_fast.testing."""
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session builds its own cache (digits JPEGs, manifests): no state from outside leaks in,
    and the environment is restored afterwards."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """teacher.pt of a cifar_resnet8 trained by the trainer on all of `digits` (5 teacher epochs and one
    student epoch: about a minute on the 2-core CI machine)."""
    from dearkd_fast.train import main

    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["--teacher-epochs", "5", "--epochs", "1", "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    return str(out / "teacher.pt")
