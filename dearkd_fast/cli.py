"""What both command-line tools share: one-line errors, exit codes, the log of a failure, the output guard.

Exit 0 on success; 2 on an InputError (the user can fix it: one line); 1 on anything else (one
line on stderr, the traceback in `<output>/error.log`; DEARKD_DEBUG=1 re-raises); 130 on Ctrl-C.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from typing import Callable

from .config import from_argv
from .errors import InputError

__all__ = ["run_cli", "check_output"]


def check_output(output: str, run_files: tuple[str, ...], resume: bool, overwrite: bool, resume_file: str) -> None:
    """Refuse an output folder that holds another run, unless resuming or overwriting."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"--output '{output}' is a file")
    existing = [f for f in run_files if os.path.exists(os.path.join(output, f))]
    if existing and not (resume or overwrite):
        raise InputError(f"output folder '{output}' holds another run ({existing[0]}); pass --resume or --overwrite")
    if resume and not os.path.isfile(os.path.join(output, resume_file)):
        raise InputError(f"--resume: no {resume_file} in '{output}'")


def _log_failure(prog: str, output: str | None) -> str:
    """Append the current traceback to <output>/error.log (a temporary file when there is no folder)."""
    text = f"--- {prog} {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n"
    if output and os.path.isdir(output):
        path = os.path.join(output, "error.log")
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return path
    fd, path = tempfile.mkstemp(prefix="dearkd_fast-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def run_cli(prog: str, config_cls: type, description: str, run: Callable, argv: list[str] | None) -> int:
    """Parse argv into config_cls, run it, and sort any error by the tree (errors.py) into an exit code."""
    cfg = None
    try:
        cfg = from_argv(config_cls, argv, f"python -m {prog}", description)
        run(cfg)
        return 0
    except InputError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - outside the InputError branch everything is a run-time failure
        if os.environ.get("DEARKD_DEBUG"):
            raise
        log = _log_failure(prog, getattr(cfg, "output", None))
        print(f"{prog}: failed: {type(e).__name__}: {_one_line(e)} (traceback in {log})", file=sys.stderr)
        return 1
