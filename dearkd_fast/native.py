"""The native CPU backend's library (kernels/native/): where it lives, building it, finding it.

    python -m dearkd_fast.native            build it for this torch and this CPU (the README's install line)

The library is compiled on the machine that runs it, after pip has installed torch: pip builds a package
before it installs the package's dependencies, and in an isolated build environment that would need a
second copy of torch (several GB for a CUDA build). It is kept under
$DEARKD_NATIVE_DIR (default ~/.cache/dearkd_fast/native) in a folder named by a key of the sources, the
torch version and the CPU's instruction-set flags, so a library is never loaded against other sources, another
torch or another CPU. Without CMake or a C++ compiler the package works as before: this tool says why
once, and backend "native" is absent from dearkd_fast.ops.available_backends().
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import kernels as _kernels
from .config import NativeConfig
from .data.folder import cache_root
from .errors import RunError

__all__ = ["SOURCES", "LIBRARY", "native_dir", "build_key", "library_path", "unavailable_reason", "missing_tools", "build",
           "main"]

PROG = "dearkd_fast.native"
DESCRIPTION = "Build the native CPU backend of dearkd_fast (C++ ops through CMake) for this torch and this CPU."
SOURCES = Path(_kernels.__file__).resolve().parent / "native"  # kernels/native, shipped inside the package
LIBRARY = "libdearkd_fast_native.so"
FAILED = "FAILED"  # in a key's folder: why the last build for that key failed (lookups say it; a build retries)


def native_dir() -> Path:
    return Path(os.environ.get("DEARKD_NATIVE_DIR") or os.path.join(cache_root(), "native"))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return os.uname().machine


@functools.cache
def build_key() -> str:
    """16 hex digits over the sources, torch's version and the CPU's flags (the library uses -march=native)."""
    h = hashlib.sha256()
    for p in sorted(SOURCES.iterdir()):
        if p.suffix in (".cpp", ".h") or p.name == "CMakeLists.txt":
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(torch.__version__.encode() + b"\0" + _cpu_flags().encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return native_dir() / build_key() / LIBRARY


def missing_tools() -> list[str]:
    """The build tools this machine lacks ("cmake", "c++" or $CXX)."""
    return [t for t in ("cmake", "c++") if shutil.which(os.environ.get("CXX", "c++") if t == "c++" else t) is None]


def _not_found(missing: list[str]) -> str:
    return f"{' and '.join(missing)} not found on PATH"


def unavailable_reason() -> str | None:
    """None when the library for this key is built; else one line saying why not and what to run."""
    if library_path().is_file():
        return None
    failed = library_path().parent / FAILED
    if failed.is_file():
        return f"its build failed: {failed.read_text(encoding='utf-8').strip()} (python -m {PROG} --force retries)"
    missing = missing_tools()
    if missing:
        return f"it cannot be built here: {_not_found(missing)}"
    return f"it is not built for these sources, this torch and this CPU: run python -m {PROG}"


def _run(cmd: list[str], log, bar=None) -> None:
    """Run cmd, its output to log; ninja's [i/n] and make's [ p%] lines move the bar."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log.write(line)
        if bar is not None:
            m = re.match(r"\[(\d+)/(\d+)\]", line) or re.match(r"\[\s*(\d+)%\]", line)
            if m:
                done, total = (int(m.group(1)), int(m.group(2))) if m.lastindex == 2 else (int(m.group(1)), 100)
                bar.total = total
                bar.n = done
                bar.refresh()
    if proc.wait() != 0:
        raise RunError(f"{' '.join(cmd[:2])} exited {proc.returncode}")


def build(force: bool = False, progress: bool = True) -> Path:
    """Build the library for this key (nothing when it exists and force is False); returns its path.

    The build runs in a fresh folder and the finished library is moved into place in one rename, so a
    concurrent or interrupted build never leaves a torn library. A failure is recorded (FAILED, with the
    build log's path) so later calls say why without rebuilding; RunError carries the same line."""
    target = library_path()
    if target.is_file() and not force:
        return target
    missing = missing_tools()
    if missing:
        raise RunError(f"cannot build the native backend: {_not_found(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    log_path = target.parent / "build.log"
    from tqdm import tqdm

    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    with open(log_path, "w", encoding="utf-8") as log, \
            tqdm(total=1, desc="dearkd_fast native: compiling", unit="step", disable=not progress) as bar:
        try:
            _run(["cmake", "-S", str(SOURCES), "-B", str(work), *generator, "-DCMAKE_BUILD_TYPE=Release",
                  f"-DPYTHON_EXECUTABLE={sys.executable}"], log)
            _run(["cmake", "--build", str(work), "--parallel", str(os.cpu_count() or 1)], log, bar)
        except (RunError, OSError) as e:
            why = f"{e}; the build log is {log_path}"
            (target.parent / FAILED).write_text(why + "\n", encoding="utf-8")
            shutil.rmtree(work, ignore_errors=True)
            raise RunError(f"cannot build the native backend: {why}") from None
    os.replace(work / LIBRARY, target)
    (target.parent / FAILED).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return target


def run(cfg: NativeConfig) -> None:
    try:
        path = build(force=cfg.force, progress=not cfg.no_progress)
    except RunError as e:
        if cfg.strict:
            raise
        print(f"{PROG}: {e}; dearkd_fast works without it (backend 'native' is absent)", file=sys.stderr)
        return
    print(f"{PROG}: {path}")


def main(argv: list[str] | None = None) -> int:
    from .cli import run_cli

    return run_cli(PROG, NativeConfig, DESCRIPTION, run, argv, again="rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
