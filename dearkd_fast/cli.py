"""What both command-line tools share: one-line errors, exit codes, the log of a failure, the output folder.

Exit 0 on success; 2 on an InputError (the user can fix it: one line); 1 on anything else (one
line on stderr, the traceback in `<output>/error.log`; DEARKD_DEBUG=1 re-raises); 130 on Ctrl-C,
143 on SIGTERM (one line each).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable

from .checkpoint import TMP_PREFIX, atomic_write_json, remove_temporaries
from .config import from_argv
from .errors import InputError, Stopped, Terminated

__all__ = ["run_cli", "OutputFolder", "MANIFEST"]


MANIFEST = "run.json"
MANIFEST_FORMAT = "dearkd_fast.run/1"
LOCK = ".dearkd.lock"  # POSIX-locked by the live run writing into a folder; the lock dies with that process
_held_locks: list[tuple[int, str]] = []


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def claim(root: str) -> None:
    """Hold the folder's lock for the rest of this run; InputError when a live run holds it.

    The lock is a POSIX record lock (fcntl F_SETLK), owned by this process alone: forked children (loader
    workers, DALI and compile helpers) do not inherit it, and the kernel drops it the moment this process dies,
    so a run restarted right after a SIGKILL is accepted and no lock is ever stale. A run that ends removes the
    lock file, so a folder is left as the run found it (plus what it wrote)."""
    import fcntl

    path = os.path.join(root, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if _alive(holder):
            raise InputError(f"output folder '{root}' is in use by a running job (pid {holder}); wait for it or "
                             "choose another --output") from None
        raise InputError(f"output folder '{root}' is locked, but the run that took it (pid {holder}) is dead: another "
                         f"process holds {path} (see `fuser {path}`); stop it, or choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held_locks.append((fd, path))


def release_claims(keep: int = 0) -> None:
    """Drop the folder locks this process took after its first `keep` ones (the end of a run in this process;
    a study keeps its own while the runs inside it come and go)."""
    while len(_held_locks) > keep:
        fd, path = _held_locks.pop()
        try:
            os.unlink(path)  # still held: nobody else is inside this folder
        except OSError:
            pass
        os.close(fd)


class OutputFolder:
    """A tool's --output folder and its manifest (run.json): the files this tool wrote there. Only those
    are ever replaced or deleted; --overwrite without a manifest of the same tool touches nothing."""

    def __init__(self, root: str, tool: str, files: list[str] | None = None):
        self.root, self.tool, self.files = root, tool, list(files or [])

    @classmethod
    def open(cls, root: str, tool: str, *, resume: bool, overwrite: bool, resume_file: str,
             own_names: tuple[str, ...] = (), exclusive: bool = False) -> OutputFolder:
        """Check --output for this run and claim it; InputError names why not. A folder with a manifest of
        this tool needs --resume or --overwrite (unless the run wrote nothing); a folder without one may
        be written into only if it holds none of `own_names` (and, when `exclusive`, nothing at all)."""
        if os.path.exists(root) and not os.path.isdir(root):
            raise InputError(f"--output '{root}' is a file")
        if os.path.isdir(root):
            claim(root)  # before anything is read: a live run in this folder is refused outright
        listing = [f for f in (os.listdir(root) if os.path.isdir(root) else [])
                   if not f.startswith(TMP_PREFIX) and f != LOCK]
        manifest = _read_manifest(root) if MANIFEST in listing else None
        if manifest is not None and not manifest["files"] and not resume:  # a claim on which nothing was written
            listing, manifest = [f for f in listing if f != MANIFEST], None
        if manifest is not None and manifest.get("tool") != tool:
            raise InputError(f"output folder '{root}' holds a run of {manifest.get('tool')}; choose another --output")
        if resume:
            if not os.path.isfile(os.path.join(root, resume_file)):
                raise InputError(f"--resume: no {resume_file} in '{root}'")
            out = cls(root, tool, manifest["files"] if manifest else [resume_file])
        elif manifest is not None:
            if not overwrite:
                raise InputError(f"output folder '{root}' holds another run of {tool}; pass --resume to continue it "
                                 "or --overwrite to replace it")
            out = cls(root, tool, manifest["files"])
            out.remove_own_files()
        elif listing and (exclusive or any(n in listing for n in own_names)):
            what = "holds files of a run without run.json" if resume_file in listing else "is not empty"
            raise InputError(f"output folder '{root}' {what}, so no file in it is known to be this tool's; "
                             "choose a new or empty --output" + (" (or --resume)" if resume_file in listing else ""))
        else:
            out = cls(root, tool)
        if not os.path.isdir(root):
            os.makedirs(root, exist_ok=True)
            claim(root)
        remove_temporaries(root, recursive=True)
        out.save()
        return out

    def path(self, relpath: str) -> str:
        """The path of an output file, recorded in the manifest as this tool's (before it is written)."""
        self.record([relpath])
        return os.path.join(self.root, relpath)

    def record(self, relpaths: list[str]) -> None:
        new = [p for p in relpaths if p not in self.files]
        if new:
            self.files += new
            self.save()

    def save(self) -> None:
        atomic_write_json({"format": MANIFEST_FORMAT, "tool": self.tool, "files": self.files},
                          os.path.join(self.root, MANIFEST))

    def remove_own_files(self) -> None:
        """Delete the files the manifest lists (regular files inside the folder only), then forget them."""
        real_root = os.path.realpath(self.root)
        for rel in self.files:
            path = os.path.realpath(os.path.join(self.root, rel))
            if os.path.commonpath([real_root, path]) == real_root and os.path.isfile(path) and not os.path.islink(
                    os.path.join(self.root, rel)):
                os.remove(path)
        self.files = []


class PeerFolder(OutputFolder):
    """The output folder as a process other than rank 0 sees it under torchrun: paths, but never the
    manifest (rank 0 claimed the folder and keeps run.json)."""

    def record(self, relpaths: list[str]) -> None:
        pass

    def save(self) -> None:
        pass


def _read_manifest(root: str) -> dict:
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), list):
            raise ValueError
        return m
    except (OSError, ValueError, AttributeError):
        raise InputError(f"'{os.path.join(root, MANIFEST)}' is not a dearkd_fast run manifest; choose another "
                         "--output") from None


def _log_failure(prog: str, output: str | None) -> str:
    """Append the current traceback to <output>/error.log (a temporary file when there is no folder or
    it cannot be written)."""
    text = f"--- {prog} {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n"
    if output and os.path.isdir(output):
        path = os.path.join(output, "error.log")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="dearkd_fast-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(prog: str, config_cls: type, description: str, run: Callable, argv: list[str] | None,
            again: str = "continue with --resume") -> int:
    """Parse argv into config_cls, run it, and sort any error by the tree (errors.py) into an exit code:
    0 done, 2 InputError, 1 anything else (traceback in error.log), 130 Ctrl-C, 143 SIGTERM (`again` says
    how to continue)."""
    cfg = None
    held = len(_held_locks)  # locks of an enclosing run in this process (a study) stay held
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        cfg = from_argv(config_cls, argv, f"python -m {prog}", description)
        run(cfg)
        return 0
    except InputError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        how = "SIGTERM" if e.signum == signal.SIGTERM else "Ctrl-C"
        print(f"{prog}: stopped ({how}) {e.where}: checkpoint.pt is written; {again}", file=sys.stderr)
        return 143 if e.signum == signal.SIGTERM else 130
    except (KeyboardInterrupt, Terminated) as e:
        how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"{prog}: interrupted ({how}); every file written so far is whole: {again}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # noqa: BLE001 - outside the InputError branch everything is a run-time failure
        if os.environ.get("DEARKD_DEBUG"):
            raise
        log = _log_failure(prog, getattr(cfg, "output", None))
        print(f"{prog}: failed: {type(e).__name__}: {_one_line(e)} (traceback in {log})", file=sys.stderr)
        return 1
    finally:
        release_claims(held)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """While active: a first SIGINT or SIGTERM only sets `signum` (the loop checkpoints at its next step
    boundary and raises Stopped); a second SIGINT stops at once (KeyboardInterrupt; every file is written
    atomically, so nothing is torn), a second SIGTERM too (Terminated)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        raise (Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())

    def __enter__(self) -> StopRequest:
        if _main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
