"""python -m dearkd_fast.study on `digits` with a tiny grid: the outputs exist, a rerun redoes nothing, the
methods really differ (read from their summaries), an interrupted run is continued, other settings are refused."""
import json
import os
import re

import pytest

from dearkd_fast import study
from dearkd_fast.config import STUDY_TIERS

pytestmark = pytest.mark.slow  # runs the tools end to end
TINY = ["--data", "digits", "--fractions", "0.5", "--seeds", "1", "--epochs", "2", "--teacher-epochs", "1",
        "--batch-size", "32", "--val-fraction", "0.5", "--workers", "0", "--synthetic-per-class", "2",
        "--synthetic-epochs", "2", "--invert-iterations", "2", "--device", "cpu", "--no-progress"]


def runs_of(root):
    return sorted(os.listdir(os.path.join(root, "runs")))


def summary(root, run):
    with open(os.path.join(root, "runs", run, "summary.json")) as f:
        return json.load(f)


def mtimes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f in ("summary.json", "meta.json", "checkpoint.pt", "teacher.pt"):
                out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("study") / "digits-cpu")
    assert study.main(TINY + ["--output", root]) == 0
    return root


def test_writes_tables_plots_and_every_runs_summary_and_command(tiny_study):
    root = tiny_study
    for name in ("table.md", "table.json", "accuracy_vs_fraction.png", "val_curves.png"):
        assert os.path.getsize(os.path.join(root, name)) > 0, name
    for name in ("accuracy_vs_fraction.png", "val_curves.png"):
        with open(os.path.join(root, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(root, "table.json")) as f:
        table = json.load(f)
    grid = {r["method"]: r for r in table["rows"] if not r["data_free"]}
    assert set(grid) == set(study.METHODS)
    for r in grid.values():
        assert r["fraction"] == 0.5 and r["epochs"] == 2 and len(r["top1"]) == 1
        assert r["top1_mean"] == pytest.approx(r["top1"][0], abs=0.01) and r["wall_s"][0] > 0
        assert len(r["curves"][0]) == 2
    assert {r["method"] for r in table["rows"] if r["data_free"]} == set(study.DATA_FREE)
    assert 0 <= table["teacher"]["top1"] <= 100 and table["machine"]["cores"] >= 1
    # the teacher run is the trainer with --epochs 0: teacher.pt and a summary, no student
    t = summary(root, "teacher")
    assert t["teacher_top1"] == table["teacher"]["top1"] and t["final_top1"] is None and t["epochs"] == []
    assert os.path.isfile(os.path.join(root, "runs", "teacher", "teacher.pt"))
    assert not os.path.exists(os.path.join(root, "runs", "teacher", "student.pt"))
    with open(os.path.join(root, "table.md")) as f:
        md = f.read()
    assert "| dearkd |" in md and "50% data" in md
    # one seed per row: every claim is read against the spread it has (none), and the table says so
    assert {c["claim"] for c in table["claims"]} == {c[0] for c in study.CLAIMS}
    assert all(c["verdict"].startswith("within the seed spread") for c in table["claims"] if c["se"] == 0)
    assert "| DearKD > DeiT-style | 50% data |" in md
    # every run names the code it ran at (a commit, inside a git checkout as CI's)
    assert set(table["commits"]) == set(runs_of(root)) and len(set(table["commits"].values())) == 1
    if os.path.isdir(os.path.join(os.path.dirname(__file__), "..", ".git")):
        assert re.fullmatch(r"[0-9a-f]{7}(-dirty)?", table["commits"]["teacher"])
        assert f"Code: {table['commits']['teacher']} ({len(table['commits'])} runs)." in md
    runs = sorted(os.listdir(os.path.join(root, "runs")))
    assert len(runs) == 1 + len(study.METHODS) + 2 + len(study.DATA_FREE)
    for run in runs:
        with open(os.path.join(root, "runs", run, "command.txt")) as f:
            cmd = f.read().strip()
        assert " -m dearkd_fast." in cmd and os.path.join(root, "runs", run) in cmd
        done = "images/meta.json" if run.startswith("synthetic") else "summary.json"
        assert os.path.isfile(os.path.join(root, "runs", run, done)), run


def test_methods_really_differ(tiny_study):
    root = tiny_study
    scratch, deit = summary(root, "scratch-f0.5-s0"), summary(root, "deit-f0.5-s0")
    dearkd, no2 = summary(root, "dearkd-f0.5-s0"), summary(root, "dearkd-no-stage2-f0.5-s0")
    # scratch: no teacher was built or called, stage 2 from the first epoch
    assert scratch["teacher"] is None and scratch["stage_switch_epoch"] == 0
    assert all(e["stage"] == 2 and e["teacher_calls"] == 0 and "kd" not in e["train"] for e in scratch["epochs"])
    # DeiT-style: distillation token, no alignment term, never switches
    assert deit["args"]["beta"] == 0 and deit["teacher"] is not None
    assert all(e["stage"] == 1 and "kd" in e["train"] and "align" not in e["train"] for e in deit["epochs"])
    # DearKD: alignment in stage 1, then stage 2 (no teacher calls)
    stages = [e["stage"] for e in dearkd["epochs"]]
    assert stages == [1, 2] and "align" in dearkd["epochs"][0]["train"] and dearkd["epochs"][1]["teacher_calls"] == 0
    # without stage 2: alignment throughout, never switches
    assert all(e["stage"] == 1 and "align" in e["train"] for e in no2["epochs"])
    # every student shares architecture, epochs, batch and optimizer
    keys = ("model", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "data_fraction", "hflip")
    assert len({tuple(s["args"][k] for k in keys) for s in (scratch, deit, dearkd, no2)}) == 1
    # the teacher is trained once and shared
    ckpts = {s["args"]["teacher_ckpt"] for s in (deit, dearkd, no2)}
    assert ckpts == {os.path.join(root, "runs", "teacher", "teacher.pt")}
    # data-free: students train on the synthesised images (with and without BPID) and validate on real digits
    bpid, nobpid = summary(root, "df-dearkd-bpid-s0"), summary(root, "df-dearkd-no-bpid-s0")
    assert bpid["args"]["data"].endswith(os.path.join("synthetic-bpid", "images"))
    assert nobpid["args"]["data"].endswith(os.path.join("synthetic-nobpid", "images"))
    assert bpid["args"]["val_data"] == "digits" and bpid["num_train_samples"] == 20
    metas = [json.load(open(os.path.join(root, "runs", f"synthetic-{k}", "images", "meta.json"))) for k in ("bpid", "nobpid")]
    assert metas[0]["settings"]["bpid"] > 0 and metas[1]["settings"]["bpid"] == 0


def test_rerun_redoes_nothing_and_continues_an_interrupted_run(tiny_study, capsys):
    root = tiny_study
    before = mtimes(root)
    capsys.readouterr()
    assert study.main(TINY + ["--output", root]) == 0
    assert "0 to do" in capsys.readouterr().out
    assert mtimes(root) == before
    # a run that stopped after its checkpoint and before its summary is continued with --resume, alone
    os.remove(os.path.join(root, "runs", "scratch-f0.5-s0", "summary.json"))
    assert study.main(TINY + ["--output", root]) == 0
    assert "1 to do" in capsys.readouterr().out
    with open(os.path.join(root, "runs", "scratch-f0.5-s0", "command.txt")) as f:
        assert f.read().strip().splitlines()[-1].endswith("--resume")
    after = mtimes(root)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {os.path.join(root, "runs", "scratch-f0.5-s0", "summary.json")}


def test_lost_teacher_weights_are_remade_only_when_a_run_still_reads_them(tiny_study, capsys):
    """A clone of a study folder has no weights (they are not committed): a rerun with nothing to do trains
    nothing; one with a student left to train first trains the teacher again, by its own command."""
    root = tiny_study
    teacher = os.path.join(root, "runs", "teacher", "teacher.pt")
    os.remove(teacher)
    capsys.readouterr()
    assert study.main(TINY + ["--output", root]) == 0
    assert "0 to do" in capsys.readouterr().out and not os.path.exists(teacher)
    os.remove(os.path.join(root, "runs", "dearkd-f0.5-s0", "summary.json"))
    assert study.main(TINY + ["--output", root]) == 0
    assert "1 to do" in capsys.readouterr().out
    assert os.path.isfile(teacher) and os.path.isfile(os.path.join(root, "runs", "dearkd-f0.5-s0", "summary.json"))
    with open(os.path.join(root, "runs", "teacher", "command.txt")) as f:
        assert f.read().strip().splitlines()[-1].endswith("--overwrite")
    with open(os.path.join(root, study.STATE)) as f:
        state = json.load(f)
    assert state["replaced_s"]["teacher"] > 0 and state["wall_s"]["teacher"] > 0  # the lost run's time set apart
    with open(os.path.join(root, "table.json")) as f:
        assert json.load(f)["replaced_wall_s"] == pytest.approx(state["replaced_s"]["teacher"], abs=0.1)


def test_other_settings_in_the_same_folder_are_refused(tiny_study, capsys):
    before = mtimes(tiny_study)
    assert study.main([a if a != "2" else "3" for a in TINY] + ["--output", tiny_study]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "epochs" in err and len(err.strip().splitlines()) == 1
    assert mtimes(tiny_study) == before


def test_bad_study_flags_exit_2(tmp_path, capsys):
    for bad in (["--fractions", "0,0.5"], ["--fractions", "a"], ["--seeds", "0"], ["--tier", "tpu"]):
        assert study.main(["--data", "digits", "--output", str(tmp_path / "s")] + bad) == 2, bad
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    assert study.main(TINY + ["--output", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


# the study in a child process; with KILL_IN_PLOT=1 it SIGKILLs itself while writing the plots
STUDY_CHILD = """
import os, signal, sys
from dearkd_fast import study
if os.environ.get("KILL_IN_PLOT") == "1":
    study.plot = lambda root, table: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(study.main(sys.argv[1:]))
"""


def _phase(root):
    """What the study is doing now, read from its folder: teacher, student, inversion or None."""
    runs = os.path.join(root, "runs")
    if not os.path.isdir(runs):
        return None
    for name in sorted(os.listdir(runs)):
        d = os.path.join(runs, name)
        if not os.path.isfile(os.path.join(d, "log.txt")):
            continue
        if name.startswith("synthetic-"):
            if not os.path.isfile(os.path.join(d, "images", "meta.json")):
                return "inversion"
        elif not os.path.isfile(os.path.join(d, "summary.json")):
            return "teacher" if name == "teacher" else ("df-student" if name.startswith("df-") else "student")
    return None


def test_a_study_killed_anywhere_and_restarted_at_once_ends_with_the_same_numbers(tmp_path):
    """SIGKILL inside teacher training, a student run, an inversion, a data-free student and the plots, each time
    restarted at once with the same command: the same table.json numbers as an uninterrupted study under
    --deterministic, no torn file, and no run started afresh twice."""
    import random
    import subprocess
    import sys
    import time

    flags = TINY + ["--deterministic"]
    whole = str(tmp_path / "whole")
    assert study.main(flags + ["--output", whole]) == 0
    root = str(tmp_path / "killed")
    rng = random.Random(0)
    argv = [sys.executable, "-c", STUDY_CHILD, *flags, "--output", root]
    kills = 0
    for phase in ("teacher", "student", "inversion", "df-student", "plot"):
        env = {**os.environ, "KILL_IN_PLOT": "1" if phase == "plot" else "0"}
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if phase != "plot":
            deadline = time.monotonic() + 240
            while _phase(root) != phase and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _phase(root) == phase, (phase, p.poll())
            time.sleep(rng.uniform(0.2, 1.5))  # a random moment inside that phase
            p.kill()
        p.wait(timeout=300)
        assert p.returncode == -9, (phase, p.returncode, p.stderr.read()[-500:])
        kills += 1
    assert subprocess.run(argv, env={**os.environ, "KILL_IN_PLOT": "0"}, capture_output=True, timeout=600).returncode == 0

    def numbers(folder):
        with open(os.path.join(folder, "table.json")) as f:
            t = json.load(f)
        rows = sorted((r["method"], r["fraction"] or 0, tuple(r["top1"]), tuple(map(tuple, r["curves"])))
                      for r in t["rows"])
        synth = {k: {m: v[m] for m in v if m != "wall_s"} for k, v in t["synthetic"].items()}
        return t["teacher"]["top1"], rows, synth

    assert numbers(root) == numbers(whole)
    for name in ("table.md", "table.json", "accuracy_vs_fraction.png", "val_curves.png"):
        assert os.path.getsize(os.path.join(root, name)) > 0
    fresh_starts = continuations = 0
    for name in os.listdir(os.path.join(root, "runs")):
        with open(os.path.join(root, "runs", name, "command.txt")) as f:
            lines = [ln for ln in f if ln.strip()]
        starts = [ln for ln in lines if "--resume" not in ln and "--overwrite" not in ln]
        assert len(starts) == 1, (name, lines)  # every run started once; later lines continue it
        fresh_starts += 1
        continuations += len(lines) - 1
    assert fresh_starts == len(os.listdir(os.path.join(whole, "runs"))) and continuations <= kills
    assert not [f for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


LONG = ["--tier", "cpu-long", "--data", "digits", "--fractions", "0.5", "--seeds", "1", "--steps", "30",
        "--teacher-epochs", "1", "--batch-size", "32", "--val-fraction", "0.5", "--workers", "0", "--no-data-free",
        "--device", "cpu", "--no-progress"]


def test_cpu_long_tunes_on_a_hold_out_never_reading_the_test_split(tmp_path, monkeypatch):
    """The cpu-long tier shrunk to digits: every candidate of TUNING is trained and validated on images held out of
    the training split (the test split is not scanned or loaded by any tuning run, and is by the final runs);
    each method's final runs use its best candidate; every student at a fraction takes the same steps."""
    from dearkd_fast import train
    from dearkd_fast.data.folder import builtin_digits

    train_dir, test_dir = builtin_digits()
    seen: dict[str, dict] = {}  # run -> {"scanned": roots, "val": validation files}
    current = {"run": None}
    real_execute, real_build = study._execute, train.build_data

    def execute(run, root, extra, state):
        current["run"] = run.name
        seen.setdefault(run.name, {"scanned": set(), "val": []})
        return real_execute(run, root, extra, state)

    import dearkd_fast.data as data_mod
    scan = data_mod.scan_image_folder

    def scanning(root, *a, **kw):
        if current["run"]:
            seen[current["run"]]["scanned"].add(os.path.realpath(root))
        return scan(root, *a, **kw)

    def building(*a, **kw):
        bundle = real_build(*a, **kw)
        seen[current["run"]]["val"] += [p for p, _ in bundle.val_files]
        return bundle

    monkeypatch.setattr(study, "_execute", execute)
    monkeypatch.setattr(data_mod, "scan_image_folder", scanning)
    monkeypatch.setattr(train, "build_data", building)
    root = str(tmp_path / "long")
    assert study.main(LONG + ["--output", root]) == 0
    with open(os.path.join(root, "table.json")) as f:
        table = json.load(f)

    test_root = os.path.realpath(test_dir)
    tuning = [n for n in seen if n.startswith("tune-")]
    assert len(tuning) == sum(len(c) for c in study.TUNING.values()) == len(table["tuning"])
    for name in tuning:
        assert test_root not in seen[name]["scanned"], name
        assert seen[name]["val"] and all(os.path.realpath(p).startswith(os.path.realpath(train_dir) + os.sep)
                                         for p in seen[name]["val"]), name
        assert summary(root, name)["args"]["val_data"] == "holdout"
    # the ablations: DearKD's chosen candidate with one change each, on the same hold-out
    ablations = [n for n in seen if n.startswith("ablate-")]
    assert len(ablations) == len(study.ABLATIONS) == len(table["ablations"])
    chosen = next(r for r in table["tuning"] if r["method"] == "dearkd" and r["chosen"])
    for name, row in zip(ablations, table["ablations"]):
        assert test_root not in seen[name]["scanned"] and summary(root, name)["args"]["val_data"] == "holdout"
        assert row["candidate"].startswith(chosen["candidate"]) and row["candidate"] != chosen["candidate"]
    args = [summary(root, n)["args"] for n in ablations]
    assert [a["beta_decay"] for a in args] == [True, False, False, False, False, False]
    assert args[1]["align_blocks"] == "0,1,2,3" and (args[2]["num_mhca"], args[2]["align_blocks"]) == (0, "0")
    e = args[4]["epochs"]
    assert (args[3]["stage1_epochs"], args[4]["stage1_epochs"]) == (max(1, e // 3), e)
    assert (args[5]["distillation_type"], args[5]["tau"]) == ("soft", 3.0) and args[4]["distillation_type"] == "hard"
    with open(os.path.join(root, "table.md")) as f:
        assert "Ablations" in f.read()
    finals = [n for n in seen if n != "teacher" and not n.startswith(("tune-", "ablate-"))]
    assert len(finals) == len(study.METHODS)
    for name in finals:
        assert test_root in seen[name]["scanned"]
        assert all(os.path.realpath(p).startswith(test_root + os.sep) for p in seen[name]["val"])
    # the hold-out is disjoint from what the tuning runs train on, and the same for every candidate
    s = summary(root, tuning[0])
    assert s["num_train_samples"] < summary(root, "scratch-f0.5-s0")["num_train_samples"]
    # each method's best candidate (by hold-out top-1) is the one its final runs use
    for method, cands in study.TUNING.items():
        rows = [r for r in table["tuning"] if r["method"] == method]
        best = max(rows, key=lambda r: r["holdout_top1"])
        assert [r["chosen"] for r in rows].count(True) == 1 and best["chosen"]
        cand = cands[[r["candidate"] for r in rows].index(best["candidate"])]
        for final in [method] + [m for m, src in study.TUNED_AS.items() if src == method]:
            args = summary(root, f"{final}-f0.5-s0")["args"]
            assert args["lr"] == cand.lr, final
            assert args["align_standardize"] == ("--align-standardize" in cand.flags)
            assert args["distillation_type"] == ("soft" if "soft" in cand.flags else "hard")
            assert args["smoothing"] == (0.1 if "--smoothing" in cand.flags else 0.0)
    # the same optimiser steps (at least --steps) for every student, the strong teacher's recipe for the teacher
    steps = {r["method"]: r["steps"] for r in table["rows"]}
    assert len(set(steps.values())) == 1 and min(steps.values()) >= 30
    t = summary(root, "teacher")["args"]
    assert t["teacher"] == STUDY_TIERS["cpu-long"].teacher and t["teacher_recipe"] == "fast" and t["batch_size"] == 512
    with open(os.path.join(root, "table.md")) as f:
        md = f.read()
    assert "Tuning" in md and "hold-out" in md and md.count("| **") == len(study.TUNING)
