"""Hostile input: nothing deleted, nothing executed, nothing relabelled; bad input is one line and exit 2,
a failure at run time one line and exit 1 with the traceback in the run's error.log."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dearkd_fast import invert, train
from dearkd_fast.config import IMAGENET_MEAN, IMAGENET_STD
from dearkd_fast.data.folder import scan_image_folder
from dearkd_fast.testing import folder_data, write_image_folder

QUICK = ["--data-fraction", "0.12", "--batch-size", "32", "--teacher-epochs", "1", "--workers", "0", "--no-progress",
         "--warmup-epochs", "0"]


def expect(capsys, tool, argv, code, fragment):
    """Run a tool in-process; check the exit code and that stderr is one line holding `fragment`."""
    rc = tool.main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.count("\n") == 1 and fragment in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run with its own teacher (about 15 s)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert train.main(QUICK + ["--epochs", "1", "--output", str(out)]) == 0
    return out


# ---------------------------------------------------------------- every argument checked before any work

TRAIN_BAD = [
    (["--lr", "nan"], "--lr must be a finite number"), (["--lr", "inf"], "--lr"), (["--seed", "-1"], "--seed"),
    (["--device", "bogus"], "--device"), (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "x"],
                                          "--device"),
    (["--smoothing", "1.5"], "--smoothing"), (["--randaug", "bogus"], "--randaug"),
    (["--randaug", "rand-m9-mstd0.5", "--dali"], "mstd"), (["--model", "resnet18"], "not a DearKD student"),
    (["--output", ""], "--output"), (["--max-norm", "-1"], "--max-norm"), (["--tau", "-1"], "--tau"),
    (["--beta", "-0.5"], "--beta"), (["--beta", "nan"], "--beta"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--hflip", "2"], "--hflip"), (["--alpha", "1.5"], "--alpha"),
    (["--teacher", "nope"], "unknown teacher"), (["--teacher", "tv:nope"], "unknown torchvision teacher"),
    (["--teacher-taps", "layer9"], "--teacher-taps"), (["--epochs", "2", "--stage1-epochs", "3"], "--stage1-epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers"), (["--mixup", "-1"], "--mixup"),
    (["--resume", "--overwrite"], "exclude"), (["--bogus"], "--bogus"), (["--epochs", "two"], "invalid int"),
    (["--distillation-type", "x"], "invalid choice"), (["--backend", "cuda"], "invalid choice"),
]


@pytest.mark.parametrize("argv,fragment", TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_refuses_bad_arguments(tmp_path, capsys, argv, fragment):
    out = tmp_path / "o"
    expect(capsys, train, ["--output", str(out)] + argv if "--output" not in argv else argv, 2, fragment)
    assert not out.exists() or not os.listdir(out)  # refused before any work


INVERT_BAD = [
    (["--r-bn", "nan"], "--r-bn"), (["--lr", "inf"], "--lr"), (["--iterations", "0"], "--iterations"),
    (["--resolution", "1"], "--resolution"), (["--tv-l2", "-1"], "--tv-l2"), (["--jitter", "-3"], "--jitter"),
    (["--class-names", "../x,b"], "cannot be a folder name"), (["--class-names", "/abs/x,b"], "cannot be a folder name"),
    (["--class-names", "a,a"], "appears twice"), (["--class-names", ",b"], "cannot be a folder name"),
    (["--class-names", "a"], "--class-names gives 1 names"), (["--preset", "huge"], "--preset"),
    (["--num-classes", "0"], "--num-classes"), (["--teacher", "vit_tiny_patch16_224"], "BatchNorm2d"),
    (["--teacher", "nope"], "unknown teacher"),
]


@pytest.mark.parametrize("argv,fragment", INVERT_BAD, ids=[" ".join(a) for a, _ in INVERT_BAD])
def test_invert_refuses_bad_arguments(tmp_path, capsys, argv, fragment):
    flags = {"--teacher": "cifar_resnet8", "--num-classes": "2", "--output": str(tmp_path / "o")}
    flags.update(zip(argv[::2], argv[1::2]))
    argv = [x for kv in flags.items() for x in kv] + ["--no-progress"]
    expect(capsys, invert, argv, 2, fragment)
    assert not (tmp_path / "o").exists() or not [f for f in os.listdir(tmp_path / "o") if f != "run.json"]


# ---------------------------------------------------------------- nothing deleted that the tools did not write

def test_invert_overwrite_never_deletes_a_users_folder(tmp_path, capsys):
    user = write_image_folder(tmp_path / "photos", {"0": 2, "1": 2}, ext="png")
    mine = tmp_path / "photos" / "0" / "00000.png"
    Image.new("RGB", (8, 8)).save(mine)
    before = sorted(str(p) for p in (tmp_path / "photos").rglob("*"))
    for flag, fragment in (([], "not empty"), (["--overwrite"], "no file in it is known"), (["--resume"], "no progress")):
        err = expect(capsys, invert, ["--teacher", "cifar_resnet8", "--num-classes", "2", "--output", user,
                                      "--no-progress"] + flag, 2, fragment)
        assert "--overwrite" not in err.replace("--output", "")  # never suggests destroying the folder
    assert sorted(str(p) for p in (tmp_path / "photos").rglob("*")) == before


def test_train_never_overwrites_files_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text("my notes")
    for flag in ([], ["--overwrite"]):
        expect(capsys, train, ["--output", str(out), "--no-progress"] + flag, 2, "no file in it is known")
    assert (out / "summary.json").read_text() == "my notes"


@pytest.mark.slow
def test_overwrite_removes_only_the_manifests_files(tmp_path, finished):
    out = tmp_path / "again"
    assert train.main(QUICK + ["--epochs", "1", "--output", str(out)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tool"] == "dearkd_fast.train" and {"summary.json", "checkpoint.pt", "teacher.pt"} <= set(manifest["files"])
    (out / "notes.txt").write_text("mine")
    assert train.main(QUICK + ["--epochs", "1", "--output", str(out), "--overwrite",
                               "--teacher-ckpt", str(finished / "teacher.pt")]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "teacher.pt").exists()  # the stale teacher went


# ---------------------------------------------------------------- nothing executed

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacher", "student", "checkpoint", "weights"])
def test_crafted_checkpoints_run_nothing(tmp_path, capsys, kind, finished):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "dearkd_fast.teacher/2", "spec": _Payload(str(marker))}, evil)
    if kind == "teacher":
        expect(capsys, train, QUICK + ["--teacher-ckpt", str(evil), "--output", str(tmp_path / "o")], 2, "cannot be read")
    elif kind == "student":
        expect(capsys, invert, ["--teacher-ckpt", str(finished / "teacher.pt"), "--adi", "1", "--student-ckpt", str(evil),
                                "--iterations", "1", "--output", str(tmp_path / "o"), "--no-progress"], 2, "cannot be read")
    elif kind == "weights":
        expect(capsys, invert, ["--teacher", "cifar_resnet8", "--teacher-weights", str(evil), "--iterations", "1",
                                "--output", str(tmp_path / "o"), "--no-progress"], 2, "cannot be read")
    else:
        out = tmp_path / "r"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(evil.read_bytes())
        expect(capsys, train, QUICK + ["--epochs", "1", "--output", str(out), "--resume"], 2, "cannot be read")
    assert not marker.exists()


def test_teacher_checkpoint_missing_a_field(tmp_path, capsys):
    bad = tmp_path / "t.pt"
    torch.save({"format": "dearkd_fast.teacher/2", "spec": {"arch": "cifar_resnet8", "num_classes": 10}, "model": {}},
               bad)
    expect(capsys, train, QUICK + ["--teacher-ckpt", str(bad), "--output", str(tmp_path / "o")], 2, "spec")


# ---------------------------------------------------------------- --resume refuses what would be inconsistent

@pytest.mark.slow
@pytest.mark.parametrize("change,fragment", [
    (["--lr", "0.01"], "--lr"), (["--model", "dearkd_tiny_patch4_32"], "--model"), (["--data-fraction", "0.2"], "fraction"),
    (["--epochs", "3"], "--stage1-epochs 1"), (["--teacher-ckpt", "T"], "--teacher-ckpt"),
])
def test_resume_refuses_changed_flags(tmp_path, capsys, finished, change, fragment):
    change = [str(finished / "teacher.pt") if a == "T" else a for a in change]
    argv = [a for a in QUICK] + ["--epochs", "1", "--output", str(finished), "--resume"]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    expect(capsys, train, argv, 2, fragment)


@pytest.mark.slow
def test_truncated_checkpoint_and_leftovers(tmp_path, capsys, finished):
    out = tmp_path / "t"
    out.mkdir()
    for f in ("run.json", "checkpoint.pt", "teacher.pt"):
        (out / f).write_bytes((finished / f).read_bytes())
    full = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(full[: len(full) // 2])
    (out / ".tmp-checkpoint.pt-abc").write_bytes(b"x" * 100)  # a kill during a write left this
    expect(capsys, train, QUICK + ["--epochs", "1", "--output", str(out), "--resume"], 2, "cannot be read")
    assert not (out / ".tmp-checkpoint.pt-abc").exists()  # the next run in the folder removed it


# ---------------------------------------------------------------- the scan: each real file once, nothing relabelled

def test_scan_links_fifos_and_loops(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    outside = write_image_folder(tmp_path / "elsewhere", {"x": 1})
    os.symlink(os.path.join(root, "a"), os.path.join(root, "a", "loop"))              # a loop
    os.symlink(root, os.path.join(root, "a", "up"))                                     # the parent: would relabel b
    os.symlink(os.path.join(root, "b", "000.jpg"), os.path.join(root, "a", "b0.jpg"))   # b's image under a
    os.symlink(os.path.join(outside, "x", "000.jpg"), os.path.join(root, "a", "out.jpg"))  # outside the root
    os.symlink(os.path.join(root, "nowhere.jpg"), os.path.join(root, "b", "dangling.jpg"))
    os.mkfifo(os.path.join(root, "b", "fifo.jpg"))                                       # would hang a decoder
    os.symlink(os.path.join(root, "a", "000.jpg"), os.path.join(root, "a", "again.jpg"))  # the same file twice
    scan = scan_image_folder(root, progress=False)
    names = sorted((os.path.basename(p), c) for p, c in scan.samples)
    assert names == [("000.jpg", 0), ("000.jpg", 1), ("001.jpg", 0), ("001.jpg", 1)] or \
        sorted(os.path.realpath(p) for p, _ in scan.samples) == sorted(
            os.path.realpath(os.path.join(root, c, f)) for c in "ab" for f in ("000.jpg", "001.jpg"))
    assert all(c == (0 if "/a/" in p else 1) for p, c in scan.samples)
    assert {os.path.basename(p) for p in scan.skipped} >= {"loop", "up", "b0.jpg", "out.jpg", "dangling.jpg", "fifo.jpg"}


def test_a_link_to_itself_is_skipped_and_counted(tmp_path, capsys):
    """A class folder holding a symlink to itself, and a class entry that is one (ELOOP): passed over and
    counted, and the trainer runs (exit 0), never a traceback."""
    root = write_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    os.symlink("self", os.path.join(root, "a", "self"))
    os.symlink("selfclass", os.path.join(root, "selfclass"))
    scan = scan_image_folder(root, progress=False)
    assert scan.classes == ["a", "b"] and len(scan.samples) == 6
    assert "self" in {os.path.basename(p) for p in scan.skipped}
    out = tmp_path / "o"
    assert train.main(["--data", root, "--val-data", root, "--batch-size", "2", "--epochs", "1", "--teacher-epochs", "1",
                       "--workers", "0", "--no-progress", "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["skipped_files"] >= 1


def test_a_teacher_of_another_input_size_is_refused_before_any_work(tmp_path, capsys):
    err = expect(capsys, train, QUICK + ["--teacher", "vit_tiny_patch16_224", "--output", str(tmp_path / "o")], 2,
                 "does not take the 32 px images")
    assert "vit_tiny_patch16_224" in err and not (tmp_path / "o").exists()


def test_a_teacher_checkpoint_with_too_few_class_names(tmp_path, capsys, finished):
    ck = torch.load(finished / "teacher.pt", weights_only=True)
    ck["spec"]["class_names"] = ck["spec"]["class_names"][:-1]
    bad = tmp_path / "short.pt"
    torch.save(ck, bad)
    expect(capsys, invert, ["--teacher-ckpt", str(bad), "--iterations", "1", "--output", str(tmp_path / "o"),
                            "--no-progress"], 2, "9 class names for its 10 classes")
    expect(capsys, train, QUICK + ["--teacher-ckpt", str(bad), "--output", str(tmp_path / "t")], 2, "class names")


def test_one_image_per_class_and_tiny_fraction(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {"a": 1, "b": 1})
    expect(capsys, train, ["--data", root, "--output", str(tmp_path / "o"), "--no-progress", "--workers", "0"], 2,
           "no validation images")
    expect(capsys, train, ["--data-fraction", "0.001", "--dali", "--output", str(tmp_path / "p"), "--no-progress"], 2,
           "fewer than --batch-size")


# ---------------------------------------------------------------- both loaders: the same geometry and values

def _denorm(x):
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.float() * s + m


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_large_and_tiny_images_are_resized_at_train_time(tmp_path, loader):
    root = tmp_path / "d"
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(2):
            big = np.zeros((100, 200, 3), np.uint8)
            big[:, 100:] = 255  # left half black, right half white
            Image.fromarray(big).save(root / c / f"big{i}.png")
            Image.new("RGB", (10, 10), (128, 128, 128)).save(root / c / f"tiny{i}.png")
    data = folder_data(str(root), loader, val_source=str(root), pad_crop=True, hflip=0.0, batch_size=8)
    x, _ = next(iter(data.train))
    means = _denorm(x).mean(dim=(1, 2, 3))
    # every sample shows the whole image: half black + half white, or the grey tile (never a one-colour patch)
    assert ((means - 0.5).abs() < 0.2).all(), means


def test_16bit_and_palette_images_decode_alike_on_both_loaders(tmp_path):
    root = tmp_path / "d"
    os.makedirs(root / "a")
    os.makedirs(root / "b")
    ramp = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(ramp).save(root / "a" / "g16.png")
    pal = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 200).astype(np.uint8)).convert("P")
    pal.save(root / "b" / "pal.png")
    out = {}
    for loader in ("torch", "dali"):
        data = folder_data(str(root), loader, val_source=str(root), batch_size=1)
        out[loader] = torch.cat([x for x, _ in data.val])
    torch.testing.assert_close(_denorm(out["torch"]), _denorm(out["dali"]), atol=1.5 / 255, rtol=0)
    assert _denorm(out["torch"])[0].max() > 0.9 and _denorm(out["torch"])[0].min() < 0.1  # not saturated to white


# ---------------------------------------------------------------- failures at run time: one line, the cause named

def test_an_image_vanishing_mid_run_is_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    data = folder_data(root, "torch", val_source=root, batch_size=2)
    gone = os.path.join(root, "a", "001.jpg")
    os.remove(gone)
    n = sum(len(y) for _, y in data.val)
    assert n == 7 and data.val.missing == {gone} and gone in data.all_skipped()


@pytest.mark.slow
def test_disk_full_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch, finished):
    import dearkd_fast.checkpoint as ck

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.os, "fsync", full)
    out = tmp_path / "o"
    err = expect(capsys, train, QUICK + ["--epochs", "1", "--teacher-ckpt", str(finished / "teacher.pt"),
                                         "--output", str(out)], 1, "No space left on device")
    assert str(out) in err and "error.log" in err and "Traceback" in (out / "error.log").read_text()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def _read_only_cache(monkeypatch, cache):
    """Every write under `cache` fails with EROFS (root ignores file modes, so the test refuses them itself)."""
    import tempfile

    def guard(fn):
        def wrapped(*a, **k):
            path = str(k.get("dir") or (a[0] if a else ""))
            if os.path.abspath(path).startswith(str(cache)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return fn(*a, **k)
        return wrapped

    for mod, name in ((os, "makedirs"), (tempfile, "mkstemp"), (tempfile, "mkdtemp")):
        monkeypatch.setattr(mod, name, guard(getattr(mod, name)))


def test_a_read_only_cache_is_one_line_or_costs_only_a_rebuild(tmp_path, capsys, monkeypatch):
    """A built-in set that must be written into a read-only cache: one line naming the cache, exit 2. A folder of
    the user's with a read-only cache: the run goes on (the resident loader decodes from memory and says so once)."""
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    cache = tmp_path / "ro-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    _read_only_cache(monkeypatch, cache)
    err = expect(capsys, train, QUICK + ["--output", str(tmp_path / "o")], 2, "cannot write the digits cache")
    assert str(cache) in err
    out = tmp_path / "mine"
    assert train.main(["--data", root, "--val-data", root, "--loader", "resident", "--batch-size", "2", "--epochs", "1",
                       "--teacher-epochs", "1", "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    assert "cannot write the decoded cache" in capsys.readouterr().out and (out / "summary.json").is_file()


@pytest.mark.slow
def test_a_study_whose_disk_fills_mid_table_keeps_every_finished_run(tmp_path, capsys, monkeypatch):
    """The disk fills while the study writes its tables: one line naming the file, exit 1; every finished run's
    summary stays, and the same command afterwards writes the tables without running anything again."""
    import dearkd_fast.checkpoint as ck
    from dearkd_fast import study
    from tests.test_study import TINY

    root = tmp_path / "s"
    flags = TINY + ["--no-data-free", "--output", str(root)]
    real_write = study.write_outputs

    def full_disk_then_write(root_, table):  # every run is done; from here on the disk is full
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ck.os, "fsync", full)
        real_write(root_, table)

    monkeypatch.setattr(study, "write_outputs", full_disk_then_write)
    rc = study.main(flags)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "No space left on device" in err and str(root) in err, err
    monkeypatch.undo()
    runs = sorted(os.listdir(root / "runs"))
    finished = [r for r in runs if (root / "runs" / r / "summary.json").is_file()]
    assert finished == runs and len(runs) == 1 + len(study.METHODS)
    before = {r: (root / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    assert study.main(flags) == 0
    assert {r: (root / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs} == before
    assert (root / "table.json").is_file()


def test_diverged_inversion_writes_no_image(tmp_path, capsys, monkeypatch):
    def nan_batch(crit, targets, s, spec, seed, device, progress, desc):
        return torch.full((len(targets), 3, s.resolution, s.resolution), float("nan")), {"loss": float("nan"), "bn": 1.0}

    monkeypatch.setattr(invert, "synthesize_batch", nan_batch)
    out = tmp_path / "o"
    expect(capsys, invert, ["--teacher", "cifar_resnet8", "--num-classes", "2", "--output", str(out), "--no-progress"], 1,
           "diverged")
    assert not list(out.rglob("*.png")) and not (out / "meta.json").exists()


@pytest.mark.slow
def test_sigterm_is_one_line_and_no_orphans(tmp_path):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "dearkd_fast.train", "--workers", "2", "--output", str(out),
                          "--no-progress", "--teacher-epochs", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd()})
    for line in p.stdout:  # wait until training has started (loader workers are up)
        if line.startswith("teacher epoch"):
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip().count("\n") == 0 and "SIGTERM" in err, err
    time.sleep(1)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout
    assert children == ""


# ---------------------------------------------------------------- shared caches and file modes

def test_concurrent_cache_build_never_removes_a_published_folder(tmp_path):
    from dearkd_fast.data.folder import _complete, _publish

    final = tmp_path / "digits"
    final.mkdir()
    (final / ".complete").write_text("")
    (final / "train").mkdir()  # another run published first and may be reading it
    late = tmp_path / ".digits-late"
    late.mkdir()
    _publish(str(late), str(final))
    assert (final / "train").is_dir() and not late.exists() and _complete(str(final))
    half = tmp_path / "half"
    half.mkdir()  # a killed older build left this incomplete folder
    new = tmp_path / ".half-new"
    (new / "train").mkdir(parents=True)
    _publish(str(new), str(half))
    assert (half / "train").is_dir() and _complete(str(half))


def test_outputs_respect_the_umask(tmp_path):
    from dearkd_fast.checkpoint import atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_json({"a": 1}, str(tmp_path / "x.json"))
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "x.json").st_mode & 0o777) == 0o640


def test_non_utf8_names_train_on_torch_and_are_counted_under_dali(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    odd = os.path.join(root, "a", os.fsdecode(b"\xff\xfe.jpg"))
    with open(odd, "wb") as f:
        f.write(open(os.path.join(root, "a", "000.jpg"), "rb").read())
    torch_data = folder_data(root, "torch", val_source=root, batch_size=2)
    dali_data = folder_data(root, "dali", val_source=root, batch_size=2)
    assert torch_data.num_train == 9 and odd not in torch_data.all_skipped()
    assert dali_data.num_train == 8 and odd in dali_data.all_skipped()
    assert sum(len(y) for _, y in dali_data.val) == 8


def test_a_file_vanishing_under_dali_is_named(tmp_path):
    from dearkd_fast.errors import RunError

    root = write_image_folder(tmp_path / "d", {"a": 40, "b": 40})
    data = folder_data(root, "dali", val_source=root, batch_size=4)
    for i in range(1, 40):
        os.remove(os.path.join(root, "a", f"{i:03d}.jpg"))
    with pytest.raises(RunError, match="DALI could not read '.*/a/0"):
        for _ in range(3):
            for _batch in data.train:
                pass


def test_default_class_names_sort_as_labels(tmp_path):
    """A teacher given by name with 12 classes gets folders 00..11 (str(i) would sort 10 before 2)."""
    out = tmp_path / "o"
    assert invert.main(["--teacher", "cifar_resnet8", "--num-classes", "12", "--images-per-class", "1",
                        "--batch-size", "12", "--iterations", "1", "--no-progress", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"{i:02d}" for i in range(12)]
    assert sorted(p.name for p in (out / "07").iterdir()) == ["00000.png"]
