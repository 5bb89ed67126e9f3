"""Never lose work: exact resume after SIGKILL (mid-epoch included), non-finite losses skipped and
counted, SIGINT checkpoints at the next step, and a live run's output folder refused to a second run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dearkd_fast import engine, train
from dearkd_fast.cli import OutputFolder
from dearkd_fast.testing import make_student, make_teacher

FLAGS = ["--data-fraction", "0.12", "--batch-size", "32", "--workers", "0", "--no-progress", "--warmup-epochs", "0",
         "--epochs", "3", "--stage1-epochs", "2", "--deterministic", "--checkpoint-every", "2", "--mixup", "0.2",
         "--model-ema", "--model-ema-decay", "0.9"]
UNTIMED = ("train_time_s", "images_per_s", "teacher_calls")

# the trainer in a child process, SIGKILLed (or sent SIGINT) at its N-th training step, after the forward
CHILD = """
import os, signal, sys
from dearkd_fast import engine, train
sig, at, argv = getattr(signal, sys.argv[1]), [int(a) for a in sys.argv[2].split(",")], sys.argv[3:]
orig, calls = engine.TrainStep.__call__, [0]
def call(self, x, y):
    calls[0] += 1
    for _ in range(at.count(calls[0])):
        os.kill(os.getpid(), sig)
    return orig(self, x, y)
engine.TrainStep.__call__ = call
sys.exit(train.main(argv))
"""


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert train.main(["--data-fraction", "0.12", "--batch-size", "32", "--workers", "0", "--no-progress",
                       "--teacher-epochs", "1", "--epochs", "1", "--output", str(out)]) == 0
    return str(out / "teacher.pt")


def _child(tmp_path, name, sig, at, *extra):
    argv = FLAGS + ["--output", str(tmp_path / name), *extra]
    return subprocess.run([sys.executable, "-c", CHILD, sig, ",".join(map(str, at)), *argv], capture_output=True,
                          text=True, timeout=300)


def _same_run(a, b):
    """The same student and EMA weights, the same epoch records (EMA top-1 included) and final top-1."""
    for name in ("student.pt", "student_ema.pt"):
        wa = torch.load(a / name, weights_only=True)["model"]
        wb = torch.load(b / name, weights_only=True)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ema, model = (torch.load(a / n, weights_only=True)["model"] for n in ("student_ema.pt", "student.pt"))
    assert any(not torch.equal(ema[k], model[k]) for k in ema)  # the average is not the model
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    strip = [[{k: v for k, v in r.items() if k not in UNTIMED} for r in s["epochs"]] for s in (sa, sb)]
    assert strip[0] == strip[1] and sa["final_top1"] == sb["final_top1"]
    assert all(r["val_top1_ema"] is not None for r in sa["epochs"]) and sa["final_top1_ema"] == sb["final_top1_ema"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [8, 10])  # epoch 2, step 3 (mid-step, after a mid-epoch checkpoint); epoch 2's end
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, teacher_pt, kill_at):
    t = ["--teacher-ckpt", teacher_pt]
    assert train.main(FLAGS + t + ["--output", str(tmp_path / "full")]) == 0
    killed = _child(tmp_path, "killed", "SIGKILL", [kill_at], *t)
    assert killed.returncode == -signal.SIGKILL
    ck = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ck["global_step"] < 15 and "teacher" not in str(list(ck))
    if kill_at == 8:
        assert ck["epoch_state"] is not None and ck["epoch_state"]["step"] == 1  # a mid-epoch checkpoint
    assert train.main(FLAGS + t + ["--output", str(tmp_path / "killed"), "--resume"]) == 0
    _same_run(tmp_path / "full", tmp_path / "killed")


@pytest.mark.slow
def test_sigint_checkpoints_at_the_next_step_and_a_second_one_stops_at_once(tmp_path, teacher_pt):
    t = ["--teacher-ckpt", teacher_pt]
    first = _child(tmp_path, "int", "SIGINT", [7], *t)
    assert first.returncode == 130, first.stderr
    assert first.stderr.count("\n") == 1 and "stopped (Ctrl-C) at epoch 2, step 2" in first.stderr
    assert "--resume" in first.stderr
    ck = torch.load(tmp_path / "int" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["epoch_state"]["step"] == 2  # written at the step boundary after the signal
    assert train.main(FLAGS + t + ["--output", str(tmp_path / "int"), "--resume"]) == 0
    assert train.main(FLAGS + t + ["--output", str(tmp_path / "full")]) == 0
    _same_run(tmp_path / "full", tmp_path / "int")
    twice = _child(tmp_path, "twice", "SIGINT", [7, 7], *t)
    assert twice.returncode == 130 and "interrupted (Ctrl-C)" in twice.stderr
    torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=True)  # whole: the last atomic write
    assert not [f for f in os.listdir(tmp_path / "twice") if f.startswith(".tmp-") and "checkpoint" in f]


def test_a_non_finite_step_changes_nothing_and_is_counted():
    torch.manual_seed(0)
    teacher = make_teacher(5)
    student = make_student(5, teacher=teacher)
    crit = train.DearKDLoss(torch.nn.CrossEntropyLoss(), teacher)
    opt = engine.make_optimizer([{"params": list(student.parameters())}], 1e-3)
    step = engine.TrainStep(student, crit, opt, engine.cosine_schedule(opt, 0, 10), device=torch.device("cpu"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    step(x, y)
    before = [p.detach().clone() for p in student.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in student.parameters()]
    state = engine.EpochState.from_dict(None, torch.device("cpu"))
    loss = step(x * float("nan"), y)
    state.add(crit.last_terms, 4, step.finite)
    assert not torch.isfinite(loss) and not bool(step.finite)
    assert all(torch.equal(a, p) for a, p in zip(before, student.parameters()))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, student.parameters()))
    assert int(state.skipped) == 1 and float(state.seen) == 0 and all(float(v) == 0 for v in state.sums.values())


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, teacher_pt, monkeypatch, capsys):
    real = engine.TrainStep._forward_loss
    calls = []

    def poisoned(self, images, labels, bad=(3,)):
        calls.append(1)
        loss = real(self, images, labels)
        return loss * float("nan") if len(calls) in bad or len(calls) > 12 else loss

    monkeypatch.setattr(engine.TrainStep, "_forward_loss", poisoned)
    t = ["--teacher-ckpt", teacher_pt, "--checkpoint-every", "0"]
    assert train.main(FLAGS + t + ["--epochs", "2", "--stage1-epochs", "1", "--output", str(tmp_path / "one")]) == 0
    epochs = json.loads((tmp_path / "one" / "summary.json").read_text())["epochs"]
    assert [r["train"]["skipped_steps"] for r in epochs] == [1, 0]
    assert all(v == v for r in epochs for v in r["train"].values())  # the means hold no NaN
    calls.clear()
    rc = train.main(FLAGS + t + ["--max-bad-steps", "3", "--output", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "non-finite" in err
    ck = torch.load(tmp_path / "bad" / "checkpoint.pt", weights_only=True)  # the last good one: epoch 2's end
    assert ck["epoch"] == 1 and ck["epoch_state"] is None
    assert all(torch.isfinite(v).all() for v in ck["student"].values())


def test_a_live_runs_output_is_refused_and_a_dead_runs_is_not(tmp_path, capsys):
    out = tmp_path / "held"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dearkd_fast.cli import claim; "
                               f"claim({str(out)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.main(["--output", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "in use by a running job" in err and str(holder.pid) in err
    finally:
        holder.kill()  # a crash: the kernel drops the lock, nothing stale is left
        holder.wait()
    deadline = time.time() + 10
    OutputFolder.open(str(out), "dearkd_fast.train", resume=False, overwrite=False, resume_file="checkpoint.pt")
    assert time.time() < deadline
    from dearkd_fast.cli import release_claims

    release_claims()


# ---------------------------------------------------------------- torchrun: two Gloo processes on the CPU
RANK_DUMP = """
import os, sys, torch
from dearkd_fast import train
real = train.finalise
def finalise(cfg, out, s, *a, **k):
    torch.save(s.model.state_dict(), os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".pt"))
    return real(cfg, out, s, *a, **k)
train.finalise = finalise
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(tmp_path):
    """Two Gloo ranks end with identical weights and write one set of outputs (not compared with a one-process
    run: the two ranks draw other batches than one process would)."""
    script = tmp_path / "dump.py"
    script.write_text(RANK_DUMP)
    out = tmp_path / "out"
    argv = ["--data-fraction", "0.25", "--batch-size", "16", "--workers", "0", "--no-progress", "--teacher-epochs", "1",
            "--epochs", "2", "--stage1-epochs", "1", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path), *argv], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("model ") == 1 and "2 processes: batch 16 per process, 32 in all" in run.stdout
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(k.startswith("align_proj.") for k in a)
    for k in a:  # every parameter synchronised, the alignment projections included
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 32
    assert summary["num_val_samples"] == 360  # every validation image counted once over the two shards
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl", "run.json", "student.pt", "summary.json",
                                       "teacher.pt"]
    manifest = json.loads((out / "run.json").read_text())["files"]  # rank 0's manifest, whole
    assert sorted(manifest) == ["checkpoint.pt", "metrics.jsonl", "student.pt", "summary.json", "teacher.pt"]
    weights = torch.load(out / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], a[k]) for k in weights)


@pytest.mark.slow
def test_torchrun_invert_splits_the_batches(tmp_path, teacher_pt):

    argv = ["--teacher-ckpt", teacher_pt, "--images-per-class", "3", "--batch-size", "10", "--iterations", "5",
            "--low-res-iterations", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "dearkd_fast.invert", *argv, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    # the one-process run with the same thread count as each rank: a conv's float sums depend on the threads
    one_run = subprocess.run([sys.executable, "-m", "dearkd_fast.invert", *argv, "--output", str(tmp_path / "one")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert one_run.returncode == 0, one_run.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "progress.json").read_text()) for d in ("one", "two"))
    assert one["done"].keys() == two["done"].keys() == {"0", "1", "2"}  # each batch once, over both ranks
    for c in range(10):
        for f in sorted(os.listdir(tmp_path / "one" / str(c))):
            assert (tmp_path / "one" / str(c) / f).read_bytes() == (tmp_path / "two" / str(c) / f).read_bytes()
    manifest = json.loads((tmp_path / "two" / "run.json").read_text())["files"]
    assert sum(f.endswith(".png") for f in manifest) == 30  # rank 0 recorded the other rank's images too


@pytest.mark.slow
def test_the_newest_checkpoints_are_kept(tmp_path, teacher_pt):
    out = tmp_path / "k"
    assert train.main(FLAGS + ["--teacher-ckpt", teacher_pt, "--keep-checkpoints", "2", "--output", str(out)]) == 0
    kept = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-"))
    assert kept == ["checkpoint-000000014.pt", "checkpoint-000000015.pt"]  # every 2 steps and epoch ends; 15 steps
    assert os.path.samefile(out / "checkpoint.pt", out / kept[-1])  # checkpoint.pt is the newest
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 15
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    manifest = json.loads((out / "run.json").read_text())["files"]  # so --overwrite removes them
    assert {"checkpoint.pt", *kept} <= set(manifest)


@pytest.mark.slow
def test_restart_at_once_after_sigkill_with_loader_workers(tmp_path, teacher_pt):
    """A run whose DataLoader workers (forked children) outlive it for a moment: SIGKILLed after a mid-epoch
    checkpoint and restarted at once (the scheduler's way: within 100 ms) with --resume, it is accepted and
    ends bit-identical to an uninterrupted run."""
    t = ["--teacher-ckpt", teacher_pt, "--loader", "torch", "--workers", "2"]
    assert train.main(FLAGS + t + ["--output", str(tmp_path / "full")]) == 0
    # at the kill, a forked child that outlives the run by 30 s holds every inherited descriptor, as a loader
    # worker busy decoding does (the workers themselves usually notice their parent's death within a second)
    argv = FLAGS + ["--output", str(tmp_path / "killed"), *t]
    linger = CHILD.replace("        os.kill(os.getpid(), sig)",
                           "        if os.fork() == 0:\n"
                           "            import time; os.close(1); os.close(2); time.sleep(30); os._exit(0)\n"
                           "        os.kill(os.getpid(), sig)")
    killed = subprocess.run([sys.executable, "-c", linger, "SIGKILL", "8", *argv], capture_output=True, text=True,
                            timeout=300)
    t_dead = time.monotonic()
    assert killed.returncode == -signal.SIGKILL
    again = subprocess.Popen([sys.executable, "-m", "dearkd_fast.train", *FLAGS, *t, "--output", str(tmp_path / "killed"),
                              "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert time.monotonic() - t_dead < 0.1  # restarted at once
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    _same_run(tmp_path / "full", tmp_path / "killed")


def test_a_lock_held_by_a_dead_pid_says_so(tmp_path):
    """A lock whose recorded holder is dead but which another process still holds (a child that inherited it, say):
    the message says the recorded pid is dead and what to do, never 'a running job'."""
    from dearkd_fast import cli
    from dearkd_fast.errors import InputError

    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.lockf(fd, fcntl.LOCK_EX); os.pwrite(fd, b'999999999', 0); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / cli.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError) as e:
            cli.claim(str(tmp_path))
        msg = str(e.value)
        assert "999999999" in msg and "dead" in msg and "running job" not in msg and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    cli.claim(str(tmp_path))  # free again once the holder is gone
    cli.release_claims()
