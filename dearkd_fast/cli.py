"""What both command-line tools share: one-line errors, exit codes, the output-folder guard."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

__all__ = ["UsageError", "Parser", "run_cli", "check_output", "pick_device"]


class UsageError(ValueError):
    """A bad flag or flag combination: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise UsageError(message)


def check_output(output: str, run_files: tuple[str, ...], resume: bool, overwrite: bool, resume_file: str) -> None:
    """Refuse an output folder that holds another run, unless resuming or overwriting."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output '{output}' is a file")
    existing = [f for f in run_files if os.path.exists(os.path.join(output, f))]
    if existing and not (resume or overwrite):
        raise UsageError(f"output folder '{output}' holds another run ({existing[0]}); pass --resume or --overwrite")
    if resume and not os.path.isfile(os.path.join(output, resume_file)):
        raise UsageError(f"--resume: no {resume_file} in '{output}'")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return device


def run_cli(prog: str, parser: argparse.ArgumentParser, validate: Callable, run: Callable, argv: list[str] | None) -> int:
    """Parse, validate, run. Exit 0 on success, 2 on bad input (one line), 1 on a run-time failure
    (one line; the traceback with DEARKD_DEBUG=1), 130 on Ctrl-C."""
    from . import ops
    from .data.folder import DataError
    from .models.teacher import TeacherCheckpointError

    try:
        args = parser.parse_args(argv)
        validate(args)
        run(args)
        return 0
    except (UsageError, DataError, TeacherCheckpointError, ops.BackendError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a run-time failure
        if os.environ.get("DEARKD_DEBUG"):
            raise
        print(f"{prog}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
