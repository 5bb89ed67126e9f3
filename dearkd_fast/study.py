"""python -m dearkd_fast.study: does DearKD do what the paper claims? One resumable command.

The grid (docs/study.md): one CNN teacher trained once on the whole training split, then students that
share architecture, epochs, augmentation and optimizer:

    scratch           no teacher (stage 2 from the first epoch: CE on both heads)
    deit              hard distillation through the distillation token; no alignment, no stage 2
    dearkd            early-feature alignment + distillation token in stage 1, then stage 2
    dearkd-no-stage2  dearkd without stage 2

over data fractions x seeds, plus the data-free rows: DearKD on images synthesised from the same teacher
with and without BPID (and without stage 2), evaluated on the real validation split.

Every run is the trainer's (or the inverter's) own command, run in this process: `<output>/runs/<run>/`
holds the trainer's output (`summary.json`, `metrics.jsonl`, ...; the inverter's images go to its `images/`),
`log.txt` (what the tool printed) and `command.txt` (the exact command line of each invocation). A finished
run is never redone and a stopped one continues from its checkpoint, so rerunning the same command continues
an interrupted study; a run already started with another command line (other settings) is refused.
At the end: `table.md`, `table.json` (top-1 mean +- std over seeds, epochs, wall time, machine) and the
plots `accuracy_vs_fraction.png` and `val_curves.png`. Exit 0 / 2 (bad input) / 1 / 130 / 143 as the tools.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import timm
import torch
from tqdm import tqdm

from . import invert, train
from .checkpoint import atomic_write, atomic_write_json
from .cli import LOCK, claim, run_cli
from .config import DataConfig, StudyConfig, StudyTier, stage_switch
from .data.folder import HOLDOUT, balanced_subset, builtin_name, data_name, holdout_split, resolve_data, scan_image_folder
from .errors import InputError, RunError, Stopped

__all__ = ["METHODS", "Run", "plan", "main"]

PROG = "dearkd_fast.study"
DESCRIPTION = "The study of DearKD's claims: scratch / DeiT-style / DearKD / DearKD without stage 2 over data " \
              "fractions and seeds, and data-free DearKD with and without BPID; tables and plots."
STATE = "study.json"
STATE_FORMAT = "dearkd_fast.study/1"
# tool -> (the file a finished run leaves, the file a stopped run continues from)
MARKERS = {"train": ("summary.json", "checkpoint.pt"), "invert": ("meta.json", "progress.json")}

def _switch(epochs: int) -> int:
    """DearKD's stage-1 epochs: the trainer's default (2/3, rounded up), but at least one epoch of stage 2."""
    return max(1, min(stage_switch(epochs, None), epochs - 1)) if epochs > 1 else epochs


class Method(NamedTuple):
    """A row of the grid: its trainer flags given the epochs E, and whether it is taught."""

    flags: Callable[[int], list[str]]
    uses_teacher: bool


class DataFreeRow(NamedTuple):
    """A data-free row: whether its images were synthesised with BPID, its trainer flags given E."""

    bpid: bool
    flags: Callable[[int], list[str]]


# the module docstring says what each method is
METHODS: dict[str, Method] = {
    "scratch": Method(lambda e: ["--stage1-epochs", "0"], False),
    "deit": Method(lambda e: ["--beta", "0", "--stage1-epochs", str(e)], True),
    "dearkd": Method(lambda e: ["--stage1-epochs", str(_switch(e))], True),
    "dearkd-no-stage2": Method(lambda e: ["--stage1-epochs", str(e)], True),
}
DATA_FREE: dict[str, DataFreeRow] = {
    "data-free dearkd, BPID": DataFreeRow(True, lambda e: ["--stage1-epochs", str(_switch(e))]),
    "data-free dearkd, no BPID": DataFreeRow(False, lambda e: ["--stage1-epochs", str(_switch(e))]),
    "data-free dearkd no-stage2, BPID": DataFreeRow(True, lambda e: ["--stage1-epochs", str(e)]),
}


@dataclass(frozen=True)
class Candidate:
    """A setting tried for a method while tuning: a learning rate and the method's own trainer flags."""

    lr: float
    flags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join([f"--lr {self.lr:g}", *self.flags])


def _grid(*variants: tuple[str, ...]) -> list[Candidate]:
    return [Candidate(lr, v) for lr in (1e-3, 2e-3) for v in variants]


# a tier with tune=True first trains every candidate at its smallest fraction (seed 0) and validates it on a
# hold-out of the training split; each method's final runs use its best. The same number of candidates per
# method: none is tuned harder. DearKD without stage 2 and the data-free rows take DearKD's choice.
TUNING: dict[str, list[Candidate]] = {
    "scratch": _grid((), ("--smoothing", "0.1")),
    "deit": _grid((), ("--distillation-type", "soft", "--tau", "3")),
    "dearkd": _grid((), ("--align-standardize",)),
}
TUNED_AS = {"dearkd-no-stage2": "dearkd"}
# a tier with ablate=True then trains, on the same hold-out, fraction and seed, DearKD's chosen candidate with one
# change each: variant -> its extra trainer flags given (epochs E, student depth, the student's MHCA blocks).
# Standardised against raw teacher maps is already a tuning axis (TUNING). They inform; the finals do not use them.
ABLATIONS: dict[str, Callable[[int, int, int], tuple[str, ...]]] = {
    "alignment weight decayed to 0 within stage 1": lambda e, depth, k: ("--beta-decay",),
    "every block aligned": lambda e, depth, k: ("--align-blocks", ",".join(map(str, range(depth)))),
    "plain attention, the same alignment": lambda e, depth, k: ("--num-mhca", "0", "--align-blocks",
                                                                ",".join(map(str, range(k)))),
    "stage 1 for a third of the epochs": lambda e, depth, k: ("--stage1-epochs", str(max(1, e // 3))),
    "no stage 2": lambda e, depth, k: ("--stage1-epochs", str(e)),
    # DeiT-style's tuning may pick soft distillation, DearKD's grid tunes standardisation instead: this asks
    # whether a gap between them is the alignment's or the distillation's
    "soft distillation, tau 3": lambda e, depth, k: ("--distillation-type", "soft", "--tau", "3"),
}


@dataclass
class Run:
    """One invocation of a tool inside the study: its folder under runs/, its argv, its weight in the
    progress bar (images it processes, roughly) and what it stands for in the table: a student's `candidate`
    is the setting it trains with, and a `tuning` run is validated on the hold-out."""

    name: str
    tool: str  # "train" or "invert"
    argv: list[str]
    cost: float
    method: str | None = None
    fraction: float | None = None
    seed: int | None = None
    candidate: Candidate | None = None
    tuning: bool = False
    ablation: str | None = None  # the ABLATIONS variant this hold-out run stands for

    def command(self, extra: list[str]) -> str:
        return shlex.join([sys.executable, "-m", f"dearkd_fast.{self.tool}", *self.argv, *extra])


@dataclass(frozen=True)
class Sizes:
    """Training images of the study's set: the whole split, at each fraction for the final runs, and at each
    fraction once the tuning hold-out is taken out; and the classes."""

    num_train: int
    num_classes: int
    final: dict
    tuning: dict


def _frac(f: float) -> str:
    return f"{f:g}"


def _steps(t: StudyTier, frac: float | None) -> int | None:
    """The tier's optimiser steps of a student at fraction `frac` (None: a data-free student, the first count)."""
    if not t.steps:
        return None
    return t.steps[0] if frac is None or len(t.steps) == 1 else t.steps[t.fractions.index(frac)]


def _schedule(t: StudyTier, frac: float | None, n_train: int, batch_size: int,
              default_epochs: int) -> tuple[int, int, int]:
    """(epochs, warm-up epochs, --eval-every) of a student on n_train images: with the tier's `steps`, enough
    epochs for that many optimiser steps and a warm-up of 5 % of them; else the tier's epochs and warm-up."""
    steps = _steps(t, frac)
    if steps:
        epochs = max(2, math.ceil(steps / max(1, n_train // batch_size)))
        warmup = max(t.warmup_epochs, round(0.05 * epochs))
    else:
        epochs, warmup = default_epochs, t.warmup_epochs
    return epochs, warmup, (max(1, epochs // t.evals) if t.evals else 1)


def _seeds(t: StudyTier, method: str) -> int:
    """Seeds of a method's row: the tier's, fewer for the rows without stage 2 where the tier says so."""
    return min(t.seeds, t.no_stage2_seeds or t.seeds) if "no-stage2" in method else t.seeds


def plan(cfg: StudyConfig, root: str, sizes: Sizes, chosen: dict[str, Candidate] | None = None) -> list[Run]:
    """Every run of the study in the order they run: the teacher, the tuning runs (a tier with tune), then the
    final grid with each method's chosen candidate (`chosen`; without it, a tuned tier plans no final run),
    the inversions before their students."""
    t = cfg.settings
    runs_dir = os.path.join(root, "runs")
    teacher_ckpt = os.path.join(runs_dir, "teacher", "teacher.pt")
    models = ["--model", t.model, "--teacher", t.teacher]

    def trainer(head: list[str], batch_size: int, name: str, lr: float, schedule: tuple[int, int, int], *flags: str,
                val_fraction: float | None = None) -> list[str]:
        """The trainer's argv of a run: its data and models, what every run shares, its schedule (epochs, warm-up,
        --eval-every), its own flags, its folder."""
        epochs, warmup, every = schedule
        return head + ["--batch-size", str(batch_size), "--lr", f"{lr:g}", "--warmup-epochs", str(warmup),
                       "--val-fraction", f"{val_fraction or t.val_fraction:g}", "--workers", str(t.workers), "--amp",
                       "--device", cfg.device, "--no-progress", *(["--deterministic"] if cfg.deterministic else []),
                       "--epochs", str(epochs), *(["--eval-every", str(every)] if every > 1 else []), *flags,
                       "--output", os.path.join(runs_dir, name)]

    def student(head: list[str], name: str, n_train: int, frac: float, seed: int, method: str,
                cand: Candidate) -> Run:
        flags, uses_teacher = METHODS[method]
        schedule = _schedule(t, frac, n_train, t.batch_size, t.epochs)
        argv = trainer(head, t.batch_size, name, cand.lr, schedule, "--data-fraction", _frac(frac), "--seed", str(seed),
                       *flags(schedule[0]), *cand.flags, *(["--teacher-ckpt", teacher_ckpt] if uses_teacher else []))
        return Run(name, "train", argv, cost=schedule[0] * n_train, method=method, fraction=frac, seed=seed,
                   candidate=cand)

    real = ["--data", cfg.data] + models
    teacher_argv = trainer(real, t.teacher_batch_size or t.batch_size, "teacher", t.lr, (0, t.warmup_epochs, 1),
                           "--teacher-epochs", str(t.teacher_epochs), *t.teacher_flags,
                           val_fraction=t.teacher_val_fraction)
    runs = [Run("teacher", "train", teacher_argv, cost=t.teacher_epochs * sizes.num_train)]
    if t.tune:
        frac = min(t.fractions)
        for method, cands in TUNING.items():
            for i, cand in enumerate(cands):
                r = student(real + ["--val-data", HOLDOUT], f"tune-{method}-{i}", sizes.tuning[frac], frac, 0, method,
                            cand)
                runs.append(dataclasses.replace(r, tuning=True))
        if chosen is None:
            return runs
    default = Candidate(t.lr)
    pick = {m: (chosen or {}).get(TUNED_AS.get(m, m), default) for m in METHODS}
    if t.tune and t.ablate:
        frac, (depth, k) = min(t.fractions), _student_shape(t.model)
        for i, (variant, extra) in enumerate(ABLATIONS.items()):
            e = _schedule(t, frac, sizes.tuning[frac], t.batch_size, t.epochs)[0]
            cand = dataclasses.replace(pick["dearkd"], flags=pick["dearkd"].flags + extra(e, depth, k))
            r = student(real + ["--val-data", HOLDOUT], f"ablate-{i}", sizes.tuning[frac], frac, 0, "dearkd", cand)
            runs.append(dataclasses.replace(r, ablation=variant))
    for frac in t.fractions:
        for seed in range(t.seeds):
            for method in METHODS:
                if seed >= _seeds(t, method):
                    continue
                runs.append(student(real, f"{method}-f{_frac(frac)}-s{seed}", sizes.final[frac], frac, seed, method,
                                    pick[method]))
    if cfg.data_free:
        for bpid in (True, False):
            name = f"synthetic-{'bpid' if bpid else 'nobpid'}"
            argv = ["--teacher-ckpt", teacher_ckpt, "--images-per-class", str(t.synthetic_per_class),
                    "--iterations", str(t.invert_iterations), "--low-res-iterations", str(t.invert_iterations),
                    "--amp", "--device", cfg.device, "--no-progress"] + (["--bpid", "0"] if not bpid else [])
            argv += ["--output", os.path.join(runs_dir, name, "images")]  # the inverter wants a folder of its own
            runs.append(Run(name, "invert", argv,
                            cost=2 * t.invert_iterations * t.synthetic_per_class * sizes.num_classes))
        n_synth = t.synthetic_per_class * sizes.num_classes
        batch = min(t.synthetic_batch_size, n_synth)
        cand = pick["dearkd"]
        for method, (bpid, flags) in DATA_FREE.items():
            for seed in range(_seeds(t, method)):
                synth = os.path.join(runs_dir, f"synthetic-{'bpid' if bpid else 'nobpid'}", "images")
                name = method.replace("data-free ", "df-").replace(", ", "-").replace(" ", "-").lower() + f"-s{seed}"
                head = ["--data", synth, "--val-data", _val_spec(cfg.data), *models, "--teacher-ckpt", teacher_ckpt]
                schedule = _schedule(t, None, n_synth, batch, t.synthetic_epochs)
                argv = trainer(head, batch, name, cand.lr, schedule, "--seed", str(seed), *flags(schedule[0]),
                               *cand.flags)
                runs.append(Run(name, "train", argv,
                                cost=schedule[0] * (n_synth + 0.2 * sizes.num_train * t.val_fraction),
                                method=method, seed=seed, candidate=cand))
    return runs


def _student_shape(model: str) -> tuple[int, int]:
    """(blocks, MHCA blocks) of a student, built on the meta device."""
    with torch.device("meta"):
        m = timm.create_model(model)
    return len(m.blocks), m.num_mhca


def choose(runs: list[Run]) -> dict[str, Candidate]:
    """Each tuned method's candidate with the best hold-out top-1 at the end of its run (the first on a tie)."""
    best: dict[str, tuple[float, Candidate]] = {}
    for r in runs:
        if r.tuning:
            top1 = _summary(r)["final_top1"]
            if r.method not in best or top1 > best[r.method][0]:
                best[r.method] = (top1, r.candidate)
    return {m: c for m, (_, c) in best.items()}


def _val_spec(data: str) -> str:
    """--val-data for students trained on synthetic images: the real validation split of --data."""
    if builtin_name(data):
        return data  # a built-in name as --val-data is that set's validation split
    raise InputError(f"--data-free needs a built-in data set (cifar10, digits) for its real validation split; "
                     f"pass --no-data-free with '{data}'")


def _status(run: Run) -> tuple[bool, list[str]]:
    """(finished, the flags that continue it): a summary (or meta.json) means done; a checkpoint (or
    progress.json) is resumed; a started folder without one is replaced."""
    folder = _tool_output(run)
    done, resumable = MARKERS[run.tool]
    if os.path.isfile(os.path.join(folder, done)):
        return True, []
    if os.path.isfile(os.path.join(folder, resumable)):
        return False, ["--resume"]
    if os.path.isfile(os.path.join(folder, "run.json")):
        return False, ["--overwrite"]
    return False, []


def _lost_inputs(run: Run, runs: list[Run]) -> list[Run]:
    """The finished runs whose output `run` reads (--teacher-ckpt, --data) but which is gone from disk, as
    after a clone of a study folder (weights and images are not committed): they are to be run again."""
    reads = [run.argv[i + 1] for i, a in enumerate(run.argv[:-1]) if a in ("--teacher-ckpt", "--data")]
    lost = [p for p in reads if not os.path.exists(p)]
    return [r for r in runs if r is not run and _status(r)[0]
            and any(_inside(p, _tool_output(r)) for p in lost)]


def _inside(path: str, folder: str) -> bool:
    folder = os.path.abspath(folder)
    return os.path.commonpath([folder, os.path.abspath(path)]) == folder


def _tool_output(run: Run) -> str:
    return run.argv[run.argv.index("--output") + 1]


def _execute(run: Run, root: str, extra: list[str], state: dict) -> None:
    """Run one tool invocation in this process, its output in the run's log.txt, and add the wall seconds it
    took to the state (also when it fails or is stopped; with --overwrite the time of the output it replaces
    moves to the state's replaced_s). InputError / RunError with the tool's own one-line
    message when it fails; Stopped when it was stopped."""
    folder = os.path.join(root, "runs", run.name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "command.txt"), "a", encoding="utf-8") as f:
        f.write(run.command(extra) + "\n")
    tool = train if run.tool == "train" else invert
    if "--overwrite" in extra and run.name in state["wall_s"]:  # the output it had is replaced: its time with it
        replaced = state.setdefault("replaced_s", {})
        replaced[run.name] = round(replaced.get(run.name, 0.0) + state["wall_s"].pop(run.name), 1)
    state.setdefault("commits", {})[run.name] = code_commit()
    t0 = time.time()
    try:
        with open(os.path.join(folder, "log.txt"), "a", encoding="utf-8", buffering=1) as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = tool.main(run.argv + extra)
    finally:
        state["wall_s"][run.name] = round(state["wall_s"].get(run.name, 0.0) + time.time() - t0, 1)
        atomic_write_json(state, os.path.join(root, STATE))
    if rc == 0:
        return
    last = _last_line(os.path.join(folder, "log.txt"))
    if rc in (130, 143):
        raise Stopped(signal.SIGINT if rc == 130 else signal.SIGTERM, f"in run {run.name}")
    if rc == 2:
        raise InputError(f"run {run.name} failed (exit 2): {last}")
    raise RunError(f"run {run.name} failed (exit {rc}): {last}")


def code_commit() -> str | None:
    """The commit of the code that runs (short hash, '-dirty' when the package's files differ from it), or None
    outside a git checkout: the study records it for every run it executes."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dearkd_fast", "kernels"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _last_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _check_commands(root: str, runs: list[Run]) -> None:
    """InputError unless every run already started in `root` was started with the command planned now."""
    for r in runs:
        cmd = os.path.join(root, "runs", r.name, "command.txt")
        if os.path.isfile(cmd):
            with open(cmd, encoding="utf-8") as f:
                first = f.readline().strip()
            if shlex.split(first)[1:] != shlex.split(r.command([]))[1:]:  # the interpreter may differ
                raise InputError(f"'{root}' holds a study with other settings (run {r.name} was started as "
                                 f"'{first}'); rerun it with its own flags or choose another --output")


def _open_study(cfg: StudyConfig, root: str, runs: list[Run]) -> dict:
    """Claim the study folder and read its state (settings, wall seconds per run). Every run already started
    there must have been started with the command planned now: a folder holding a study of other settings,
    or anything else, is refused (InputError). Settings that only change runs not yet started may change."""
    os.makedirs(root, exist_ok=True)
    claim(root)
    path = os.path.join(root, STATE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
        if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT
                and isinstance(state.get("wall_s"), dict)):
            raise InputError(f"'{path}' is not a study state file; choose another --output")
        _check_commands(root, runs)
    elif any(n != LOCK for n in os.listdir(root)):
        raise InputError(f"--output '{root}' is not empty and holds no study; choose a new or empty folder")
    else:
        state = {"format": STATE_FORMAT, "wall_s": {}}
    state["settings"] = {"data": cfg.data, "tier": cfg.tier, "data_free": cfg.data_free, "device": cfg.device,
                         **dataclasses.asdict(cfg.settings)}
    atomic_write_json(state, path)
    return state


def _sizes(cfg: StudyConfig) -> Sizes:
    """The training images of the final and the tuning runs at each fraction, counted as the trainer draws them
    (the progress bar's weights, the schedules of a tier with `steps`), and the classes."""
    source = resolve_data(cfg.data, None, progress=not cfg.no_progress)
    scan = scan_image_folder(source.train_dir, progress=not cfg.no_progress)
    held_out = holdout_split(scan.samples, DataConfig.holdout, 0)[0]
    pool = scan.samples if source.val_dir is not None else held_out
    fracs = cfg.settings.fractions
    return Sizes(len(scan.samples), len(scan.classes), {f: len(balanced_subset(pool, f, 0)) for f in fracs},
                 {f: len(balanced_subset(held_out, f, 0)) for f in fracs})


def run(cfg: StudyConfig) -> dict:
    root = cfg.folder
    sizes = _sizes(cfg)
    first = plan(cfg, root, sizes)  # a tuned tier: the teacher and the tuning runs; else every run
    state = _open_study(cfg, root, first)
    estimate = plan(cfg, root, sizes, chosen={})  # every run (the costs do not depend on the choice)
    done = {r.name for r in first if _status(r)[0]}
    tuned = cfg.settings.tune and all(r.name in done for r in first)
    runs = plan(cfg, root, sizes, choose(first)) if tuned else first
    _check_commands(root, runs)
    done |= {r.name for r in runs if _status(r)[0]}
    print(f"study {cfg.tier} tier on {cfg.data}: {len(estimate)} runs, {len(done)} done, {len(estimate) - len(done)} "
          f"to do -> {root}", flush=True)
    bar = tqdm(total=sum(r.cost for r in estimate), initial=sum(r.cost for r in estimate if r.name in done),
               unit="img", unit_scale=True, disable=cfg.no_progress, desc="study", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
    with bar:
        while True:
            for r in runs:
                finished, extra = _status(r)
                if finished:
                    continue
                for provider in _lost_inputs(r, runs):  # weights stay out of git: a fresh checkout remakes them
                    bar.set_postfix_str(f"runs {len(done)}/{len(estimate)}, now {provider.name} (its output is gone)")
                    _execute(provider, root, ["--overwrite"], state)
                bar.set_postfix_str(f"runs {len(done)}/{len(estimate)}, now {r.name}")
                _execute(r, root, extra, state)
                done.add(r.name)
                bar.update(r.cost)
                bar.set_postfix_str(f"runs {len(done)}/{len(estimate)}")
            if runs is not first or not cfg.settings.tune:
                break
            runs = plan(cfg, root, sizes, choose(first))  # tuning done: the final runs with each method's choice
            _check_commands(root, runs)
    table = collect(cfg, root, runs, state)
    write_outputs(root, table)
    print(table["markdown"])
    return table


# ---------------------------------------------------------------------------------------------- results


def _summary(run: Run) -> dict:
    with open(os.path.join(_tool_output(run), MARKERS[run.tool][0]), encoding="utf-8") as f:
        return json.load(f)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def machine() -> dict:
    """Where the study ran: CPU, cores, GPU (if any) and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def collect(cfg: StudyConfig, root: str, runs: list[Run], state: dict) -> dict:
    """The table: per method x fraction the final top-1 of every seed, its mean and std, the epochs and the
    wall time; the teacher; the data-free rows; the machine."""
    t = cfg.settings
    teacher = _summary(runs[0])
    rows = []
    groups: dict[tuple, list[Run]] = {}
    for r in runs[1:]:
        if r.method is not None and not r.tuning and r.ablation is None:
            groups.setdefault((r.method, r.fraction), []).append(r)
    for (method, frac), members in groups.items():
        sums = [_summary(r) for r in members]
        top1 = [s["final_top1"] for s in sums]
        mean, std = _mean_std(top1)
        rows.append({"method": method, "fraction": frac, "data_free": frac is None,
                     "seeds": [r.seed for r in members], "top1": top1, "top1_mean": round(mean, 2),
                     "top1_std": round(std, 2), "stage1_top1": [s["stage1_top1"] for s in sums],
                     "epochs": len(sums[0]["epochs"]), "stage_switch_epoch": sums[0]["stage_switch_epoch"],
                     "num_train_samples": sums[0]["num_train_samples"],
                     "batch_size": sums[0]["batch_size_per_process"],
                     "num_val_samples": sums[0]["num_val_samples"],
                     "wall_s": [state["wall_s"].get(r.name) for r in members],
                     "steps": len(sums[0]["epochs"]) * (sums[0]["num_train_samples"] // sums[0]["batch_size_per_process"]),
                     "settings": members[0].candidate.label if members[0].candidate else "",
                     "curves": [_curve(s) for s in sums],
                     "runs": [r.name for r in members]})
    chosen = choose(runs) if t.tune else {}
    tuning = []
    for r in (r for r in runs if r.tuning):
        s = _summary(r)
        tuning.append({"method": r.method, "candidate": r.candidate.label, "fraction": r.fraction, "run": r.name,
                       "holdout_top1": s["final_top1"], "num_val_samples": s["num_val_samples"],
                       "chosen": chosen.get(r.method) == r.candidate})
    ablations = [{"variant": r.ablation, "candidate": r.candidate.label, "fraction": r.fraction, "run": r.name,
                  "holdout_top1": _summary(r)["final_top1"]} for r in runs if r.ablation is not None]
    synth = {}
    for r in runs:
        if r.tool == "invert":
            m = _summary(r)
            synth[r.name] = {k: m.get(k) for k in ("num_images", "teacher_accuracy", "intra_class_distance")
                             if k in m} | {"wall_s": state["wall_s"].get(r.name)}
    table = {"tier": cfg.tier, "data": cfg.data, "settings": {**dataclasses.asdict(t), "fractions": list(t.fractions)},
             "teacher": {"arch": t.teacher, "top1": teacher["teacher_top1"], "epochs": t.teacher_epochs,
                         "wall_s": state["wall_s"].get("teacher")},
             "rows": rows, "tuning": tuning, "ablations": ablations, "synthetic": synth,
             "total_wall_s": round(sum(v for v in state["wall_s"].values() if v), 1),
             "replaced_wall_s": round(sum(state.get("replaced_s", {}).values()), 1),
             "commits": {r.name: state.get("commits", {}).get(r.name) for r in runs},
             "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    table["claims"] = claims(table)
    table["markdown"] = markdown(table)
    return table


def _curve(summary: dict) -> list[list]:
    """[[optimiser steps so far, validation top-1], ...] at every validated epoch of a run."""
    per_epoch = summary["num_train_samples"] // summary["batch_size_per_process"]
    return [[(e["epoch"] + 1) * per_epoch, e["val_top1"]] for e in summary["epochs"] if e["val_top1"] is not None]


def _commits_line(table: dict) -> str:
    """' Code: commit X (N runs), ...' from the commits the runs were executed at (unknown: before it was kept)."""
    counts: dict[str, int] = {}
    for c in table.get("commits", {}).values():
        counts[c or "not recorded"] = counts.get(c or "not recorded", 0) + 1
    return (" Code: " + ", ".join(f"{c} ({n} runs)" for c, n in counts.items()) + ".") if counts else ""


def markdown(table: dict) -> str:
    s, m = table["settings"], table["machine"]
    fracs = s["fractions"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    length = f"{s['steps']} optimiser steps per run" if s.get("steps") else f"{s['epochs']} epochs"
    lines = [f"# DearKD study: {data_name(table['data'])}, {table['tier']} tier", "",
             f"Student `{s['model']}`, {length}, batch {s['batch_size']}, AdamW, bf16 autocast; "
             f"teacher `{table['teacher']['arch']}` trained once for {table['teacher']['epochs']} epochs on the whole "
             f"training split: top-1 {table['teacher']['top1']:.2f}%. Top-1 (%) of the last epoch on "
             f"{table['rows'][0]['num_val_samples'] if table['rows'] else '?'} validation images "
             f"(class-balanced share {s['val_fraction']:g}), mean ± std over seeds (n per cell). "
             f"Machine: {where}; {table['date']}; all runs together {table['total_wall_s'] / 60:.1f} min"
             + (f" (and {table['replaced_wall_s'] / 60:.1f} min of runs whose output was lost and remade)"
                if table.get("replaced_wall_s") else "") + "." + _commits_line(table), "",
             "| method | " + " | ".join(f"{100 * f:g}% data" for f in fracs) + " | settings | epochs | wall s/run |",
             "|---|" + "---|" * len(fracs) + "---|---|---|"]
    grid = [r for r in table["rows"] if not r["data_free"]]
    for method in METHODS:
        cells, walls, epochs, settings = [], [], [], ""
        for f in fracs:
            r = next((r for r in grid if r["method"] == method and r["fraction"] == f), None)
            cells.append(f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} (n={len(r['top1'])})" if r else "-")
            if r:
                walls += [w for w in r["wall_s"] if w]
                epochs.append(str(r["epochs"]))
                settings = f"`{r['settings']}`" if r.get("settings") else ""
        wall = f"{statistics.fmean(walls):.0f}" if walls else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {settings} | {', '.join(epochs)} | {wall} |")
    if table.get("claims"):
        lines += claims_markdown(table)
    if table.get("tuning"):
        tuning = table["tuning"]
        lines += ["", f"Tuning: every candidate trained at {100 * tuning[0]['fraction']:g}% data (seed 0) and "
                  f"validated on {tuning[0]['num_val_samples']} images held out of the training split (the test "
                  f"split is not read); each method's best (**bold**) is used above, DearKD's also without stage 2 "
                  f"and data-free.", "", "| method | candidate | hold-out top-1 |", "|---|---|---|"]
        for r in tuning:
            cell = f"**{r['holdout_top1']:.2f}**" if r["chosen"] else f"{r['holdout_top1']:.2f}"
            lines.append(f"| {r['method']} | `{r['candidate']}` | {cell} |")
    if table.get("ablations"):
        base = next(r for r in table["tuning"] if r["method"] == "dearkd" and r["chosen"])
        deit = next((r for r in table["tuning"] if r["method"] == "deit" and r["chosen"]), None)
        lines += ["", f"Ablations of DearKD's chosen candidate (`{base['candidate']}`: **{base['holdout_top1']:.2f}** "
                  f"on the hold-out" + (f"; DeiT-style's best {deit['holdout_top1']:.2f}" if deit else "")
                  + "), one change each, the same hold-out, fraction and seed (one seed: compare with the seed "
                  "spread above):", "", "| variant | flags | hold-out top-1 | vs chosen |", "|---|---|---|---|"]
        for r in table["ablations"]:
            extra = r["candidate"].removeprefix(base["candidate"]).strip()
            lines.append(f"| {r['variant']} | `{extra}` | {r['holdout_top1']:.2f} | "
                         f"{r['holdout_top1'] - base['holdout_top1']:+.2f} |")
    df = [r for r in table["rows"] if r["data_free"]]
    if df:
        lines += ["", f"Data-free (students trained only on images synthesised from the teacher, "
                  f"{s['synthetic_per_class']} per class; batch {df[0]['batch_size']}):", "",
                  "| method | top-1 (real validation) | epochs | wall s/run |", "|---|---|---|---|"]
        for r in df:
            w = [x for x in r["wall_s"] if x]
            lines.append(f"| {r['method']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} (n={len(r['top1'])}) | "
                         f"{r['epochs']} | {statistics.fmean(w):.0f} |" if w else f"| {r['method']} | "
                         f"{r['top1_mean']:.2f} | {r['epochs']} | |")
        for name, v in table["synthetic"].items():
            bits = ", ".join(f"{k} {v[k]:.3g}" if isinstance(v[k], float) else f"{k} {v[k]}" for k in v if v[k] is not None)
            lines.append(f"\n`{name}`: {bits}")
    return "\n".join(lines) + "\n"


# the paper's claims as (statement, the row that should lead, the row it should lead, at each fraction?)
CLAIMS = [("DearKD > DeiT-style", "dearkd", "deit", True), ("DeiT-style > scratch", "deit", "scratch", True),
          ("DearKD > scratch", "dearkd", "scratch", True), ("stage 2 helps", "dearkd", "dearkd-no-stage2", True),
          ("BPID helps data-free", "data-free dearkd, BPID", "data-free dearkd, no BPID", False)]


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """(mean of a - mean of b, its standard error from the seed spreads). A row of one seed has no spread of
    its own and borrows the other row's."""
    sa = a["top1_std"] if len(a["top1"]) > 1 else b["top1_std"]
    sb = b["top1_std"] if len(b["top1"]) > 1 else a["top1_std"]
    return a["top1_mean"] - b["top1_mean"], math.sqrt(sa ** 2 / len(a["top1"]) + sb ** 2 / len(b["top1"]))


def _verdict(d: float, se: float) -> str:
    """Holds / reversed when the gap passes two standard errors; else within the seed spread."""
    if se > 0 and abs(d) > 2 * se:
        return "holds" if d > 0 else "reversed"
    return "within the seed spread" + (" (leans yes)" if d > 0 else " (leans no)" if d < 0 else "")


def claims(table: dict) -> list[dict]:
    """Each of the paper's claims the table can test: where (a fraction, or data-free), the gap of means with
    its standard error and the verdict; and whether DearKD's gain over DeiT-style is largest at the smallest
    fraction."""
    rows = {(r["method"], r["fraction"]): r for r in table["rows"]}
    out = []
    for statement, a, b, per_fraction in CLAIMS:
        for frac in (table["settings"]["fractions"] if per_fraction else [None]):
            if (a, frac) in rows and (b, frac) in rows:
                d, se = _gap(rows[a, frac], rows[b, frac])
                out.append({"claim": statement, "fraction": frac, "gap": round(d, 2), "se": round(se, 2),
                            "verdict": _verdict(d, se)})
    gains = [c for c in out if c["claim"] == "DearKD > DeiT-style"]
    if len(gains) > 1:
        small, large = gains[0], gains[-1]
        d, se = small["gap"] - large["gap"], math.hypot(small["se"], large["se"])
        out.append({"claim": "DearKD's gain over DeiT-style is largest at the smallest fraction", "fraction": None,
                    "gap": round(d, 2), "se": round(se, 2), "verdict": _verdict(d, se)})
    return out


def claims_markdown(table: dict) -> list[str]:
    lines = ["", "Against the paper (gap of means ± its standard error from the seed spreads; a claim holds, or is "
             "reversed, when the gap passes two standard errors):", "", "| claim | where | gap (points) | verdict |",
             "|---|---|---|---|"]
    for c in table["claims"]:
        where = f"{100 * c['fraction']:g}% data" if c["fraction"] is not None else (
            "data-free" if "data-free" in c["claim"] else "smallest against largest")
        lines.append(f"| {c['claim']} | {where} | {c['gap']:+.2f} ± {c['se']:.2f} | {c['verdict']} |")
    return lines


def write_outputs(root: str, table: dict) -> None:
    """table.md, table.json and the two plots, each written atomically."""
    with atomic_write(os.path.join(root, "table.md"), "w") as f:
        f.write(table["markdown"])
    atomic_write_json({k: v for k, v in table.items() if k != "markdown"}, os.path.join(root, "table.json"))
    plot(root, table)


def plot(root: str, table: dict) -> None:
    """accuracy_vs_fraction.png (mean +- std per method, the teacher as a line) and val_curves.png
    (validation top-1 per epoch, mean over seeds, one panel per fraction and one for the data-free rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    grid = [r for r in table["rows"] if not r["data_free"]]
    fracs = table["settings"]["fractions"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        rs = sorted((r for r in grid if r["method"] == method), key=lambda r: r["fraction"])
        if rs:
            ax.errorbar([100 * r["fraction"] for r in rs], [r["top1_mean"] for r in rs],
                        yerr=[r["top1_std"] for r in rs], marker="o", capsize=3, label=method)
    ax.axhline(table["teacher"]["top1"], color="gray", ls="--", lw=1, label=f"teacher {table['teacher']['arch']}")
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in fracs], [f"{100 * f:g}%" for f in fracs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("share of the training split")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{data_name(table['data'])} ({table['tier']} tier): accuracy vs data")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, os.path.join(root, "accuracy_vs_fraction.png"))
    plt.close(fig)

    panels = [(f"{100 * f:g}% data", [r for r in grid if r["fraction"] == f]) for f in fracs]
    df = [r for r in table["rows"] if r["data_free"]]
    if df:
        panels.append(("data-free", df))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (title, rs) in zip(axes[0], panels):
        for r in rs:
            n = min(len(c) for c in r["curves"])
            steps = [p[0] for p in r["curves"][0][:n]]
            mean = [statistics.fmean(c[i][1] for c in r["curves"]) for i in range(n)]
            ax.plot(steps, mean, marker=".", label=r["method"])
            if 0 < r["stage_switch_epoch"] < r["epochs"]:
                per_epoch = r["num_train_samples"] // r["batch_size"]
                ax.axvline(r["stage_switch_epoch"] * per_epoch, color="gray", ls=":", lw=0.8)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("validation top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, os.path.join(root, "val_curves.png"))
    plt.close(fig)


def _save(fig, path: str) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, StudyConfig, DESCRIPTION, run, argv, again="rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
