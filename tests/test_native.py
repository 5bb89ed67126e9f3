"""The native backend's build tool (python -m dearkd_fast.native) and library lookup; the ops themselves are
tested against the float64 reference in test_kernels.py (backend "native")."""
import os
import subprocess
import sys

import pytest

from dearkd_fast import native


def _run(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "dearkd_fast.native", "--no-progress", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _env(tmp_path, path):
    env = dict(os.environ, DEARKD_NATIVE_DIR=str(tmp_path / "native"), PATH=str(path))
    env.pop("CXX", None)
    return env


def test_without_cmake_or_compiler_the_tool_says_why_once_and_native_is_absent(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = _env(tmp_path, empty)
    done = _run([], env, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cmake and c++ not found on PATH" in lines[0] and "works without it" in lines[0]
    probe = subprocess.run([sys.executable, "-c", "from dearkd_fast import ops; print(ops.available_backends())"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and "native" not in probe.stdout and "torch" in probe.stdout
    strict = _run(["--strict"], env, tmp_path)
    assert strict.returncode == 1 and "cmake and c++ not found" in strict.stderr


def test_a_failed_build_is_recorded_and_leaves_no_library(tmp_path, monkeypatch):
    """A CMake that fails: RunError naming the log, FAILED holds the reason, nothing at the library path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "cmake"
    fake.write_text("#!/bin/sh\necho 'CMake Error: configured to fail' >&2\nexit 1\n")
    fake.chmod(0o755)
    (bin_dir / "c++").symlink_to("/bin/true")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DEARKD_NATIVE_DIR", str(tmp_path / "native"))
    with pytest.raises(native.RunError, match="cmake -S exited 1; the build log is"):
        native.build(progress=False)
    assert not native.library_path().exists()
    assert "its build failed: cmake -S exited 1" in native.unavailable_reason()
    assert "configured to fail" in (native.library_path().parent / "build.log").read_text()
    assert not [p for p in native.library_path().parent.iterdir() if p.name.startswith("build-")]  # no work folder left


def test_the_key_names_sources_torch_and_cpu(tmp_path, monkeypatch):
    key = native.build_key()
    assert len(key) == 16 and native.library_path().parent.name == key and native.build_key() == key
    # each thing the key claims to cover changes it: a source file, torch's version, the CPU's flags (the key is
    # cached per process: cleared after each change here)
    import shutil

    import torch

    def key_now() -> str:
        native.build_key.cache_clear()
        return native.build_key()

    sources = tmp_path / "src"
    shutil.copytree(native.SOURCES, sources)
    monkeypatch.setattr(native, "SOURCES", sources)
    assert key_now() == key  # the same sources elsewhere: the same key
    cpp = next(sources.glob("*.cpp"))
    cpp.write_text(cpp.read_text() + "\n// edited\n")
    edited = key_now()
    assert edited != key
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    other_torch = key_now()
    assert other_torch not in (key, edited)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "sse2")
    assert key_now() not in (key, edited, other_torch)
    monkeypatch.undo()
    assert key_now() == key
    monkeypatch.setenv("DEARKD_NATIVE_DIR", str(tmp_path))
    assert native.library_path() == tmp_path / key / native.LIBRARY
    assert native.unavailable_reason().endswith("run python -m dearkd_fast.native") or native.missing_tools()


def test_building_again_is_a_no_op_when_built():
    from dearkd_fast.testing import require_native

    require_native()
    path = native.library_path()
    before = path.stat().st_mtime_ns
    assert native.build(progress=False) == path and path.stat().st_mtime_ns == before


def test_the_blas_path_without_amx_matches_the_reference(tmp_path):
    """DEARKD_NATIVE_NO_AMX=1 takes the products through ATen's CPU BLAS instead of the AMX micro-kernel (what a
    CPU without AMX runs): odd sizes, bf16 and fp16, against the float64 reference (a fresh process: the
    choice is made once per process)."""
    from dearkd_fast.testing import require_native

    require_native()
    code = """
import torch
from dearkd_fast import ops, reference
def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
for dtype in (torch.bfloat16, torch.float16):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 51, 65, generator=g).to(dtype).requires_grad_()  # 2 prefix rows, N = 49, odd D
    w = (torch.randn(37, 65, generator=g) / 8).to(dtype).requires_grad_()
    b = torch.randn(37, generator=g).to(dtype).requires_grad_()
    f = torch.randn(3, 37, 7, 7, generator=g).to(dtype)
    loss = ops.feature_align_loss(base[:, 2:], w, b, f, backend="native")
    loss.backward()
    ins = [t.detach()[:, 2:] if t is base else t.detach() for t in (base, w, b)]
    ins = [t.double().requires_grad_() for t in ins]
    ref = reference.feature_align_loss(*ins, f.double())
    ref.backward()
    assert rel(loss, ref) < 1e-4, rel(loss, ref)
    for got, r in zip((base.grad[:, 2:], w.grad, b.grad), ins):
        assert rel(got, r.grad) < 2e-2, rel(got, r.grad)
print("ok")
"""
    env = dict(os.environ, DEARKD_NATIVE_NO_AMX="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_bn_moments_do_not_depend_on_the_thread_count():
    """The native BN op splits its work by shape alone and adds the pieces in order: 1 thread and 2 threads give
    the same bits (what a resumed run on another machine needs)."""
    import torch

    from dearkd_fast.testing import require_native

    require_native()
    from dearkd_fast.kernels.native_ops import bn_moments

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 24, 40, 40, generator=g).to(memory_format=torch.channels_last),
          torch.randn(4, 8, 33, 35, generator=g).bfloat16()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bn_moments(xs)
        torch.set_num_threads(2)
        two = bn_moments(xs)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
