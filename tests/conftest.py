"""Session fixtures. Helpers shared with the benchmarks live in dearkd_fast.testing."""
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session builds its own cache (digits JPEGs, manifests): no state from outside leaks in,
    and the environment is restored afterwards. The native library is the install's build product, not
    cached data: its folder stays where the install line put it (DEARKD_NATIVE_DIR)."""
    from dearkd_fast import native

    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "DEARKD_NATIVE_DIR")}
    os.environ["DEARKD_NATIVE_DIR"] = str(native.native_dir())
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """teacher.pt of a cifar_resnet8 trained by the trainer on all of `digits` (5 teacher epochs and one
    student epoch: about a minute on the 2-core CI machine)."""
    from dearkd_fast.train import main

    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["--teacher-epochs", "5", "--epochs", "1", "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    return str(out / "teacher.pt")
