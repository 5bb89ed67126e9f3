"""The trainer end to end on small data, and its bad-input exits."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dearkd_fast.testing import write_image_folder
from dearkd_fast.train import main

TINY = ["--data-fraction", "0.12", "--batch-size", "32", "--teacher-epochs", "1", "--workers", "0", "--no-progress",
        "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(TINY + ["--epochs", "3", "--stage1-epochs", "2", "--output", str(out)])
    assert rc == 0
    return out


@pytest.mark.slow
def test_writes_every_output_with_promised_fields(tiny_run):
    for f in ("summary.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "teacher.pt"):
        assert (tiny_run / f).is_file(), f
    s = json.loads((tiny_run / "summary.json").read_text())
    for key in ("final_top1", "num_train_samples", "num_val_samples", "skipped_files", "stage_switch_epoch", "epochs",
                "teacher_top1"):
        assert key in s, key
    assert s["num_val_samples"] == 360 and s["skipped_files"] == 0
    assert s["num_train_samples"] == sum(max(1, round(0.12 * n)) for n in _digits_train_counts())
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert lines == s["epochs"] and len(lines) == 3
    for rec in lines:
        assert set(rec["train"]) >= {"loss", "ce", "lr"}


def _digits_train_counts():
    from dearkd_fast.data.folder import builtin_digits

    train, _ = builtin_digits()
    return [len(os.listdir(os.path.join(train, c))) for c in sorted(os.listdir(train))]


@pytest.mark.slow
def test_stage_switch_at_stage1_epochs(tiny_run):
    s = json.loads((tiny_run / "summary.json").read_text())
    assert s["stage_switch_epoch"] == 2
    assert [r["stage"] for r in s["epochs"]] == [1, 1, 2]
    # stage 1 has KD and alignment terms and runs the teacher; stage 2 never runs it
    assert all({"kd", "align"} <= set(r["train"]) and r["teacher_calls"] > 0 for r in s["epochs"][:2])
    assert "kd" not in s["epochs"][2]["train"] and s["epochs"][2]["teacher_calls"] == 0


@pytest.mark.slow
def test_every_epoch_draws_new_batches_teacher_and_student(tmp_path, monkeypatch):
    """Each epoch of the teacher and of the student starts from its own (seed, epoch) order and augmentation: a
    teacher fed the same batches every epoch sees each image with one crop only, and overfits."""
    from dearkd_fast import engine

    firsts, original = [], engine.train_one_epoch

    def spy(step, loader, **kw):
        firsts.append(next(iter(loader))[0].clone())
        return original(step, loader, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    assert main(TINY + ["--epochs", "2", "--stage1-epochs", "2", "--teacher-epochs", "2",
                        "--output", str(tmp_path / "o")]) == 0
    assert len(firsts) == 4  # teacher epochs 1, 2, then student epochs 1, 2
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[2], firsts[3])


@pytest.mark.slow
def test_teacher_checkpoint_is_self_contained(tiny_run):
    from dearkd_fast.models.teacher import load_teacher

    model, spec = load_teacher(str(tiny_run / "teacher.pt"))
    assert spec.arch == "cifar_resnet8" and spec.class_names == [str(i) for i in range(10)]
    assert spec.input_size == 32 and len(spec.mean) == 3 and spec.taps == ["layer1", "layer2"]
    model.eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.slow
def test_reuse_teacher_and_resume(tiny_run, tmp_path):
    out = tmp_path / "b"
    assert main(TINY + ["--epochs", "1", "--teacher-ckpt", str(tiny_run / "teacher.pt"), "--output", str(out)]) == 0
    assert not (out / "teacher.pt").exists()  # loaded, not retrained
    s1 = json.loads((out / "summary.json").read_text())
    # resume the finished 1-epoch run to 2 epochs: one more record, the first kept as it was
    assert main(TINY + ["--epochs", "2", "--stage1-epochs", "1", "--teacher-ckpt", str(tiny_run / "teacher.pt"),
                        "--output", str(out), "--resume"]) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert len(s2["epochs"]) == 2 and s2["epochs"][0] == s1["epochs"][0] and s2["epochs"][1]["stage"] == 2


@pytest.mark.slow
def test_amp_and_soft_kd(tmp_path):
    assert main(TINY + ["--epochs", "1", "--amp", "--distillation-type", "soft", "--tau", "2",
                        "--align-standardize", "--output", str(tmp_path / "o")]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["epochs"][0]["stage"] == 1 and s["args"]["amp"]


def _bad(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("dearkd_fast.train: error:")
    return err


@pytest.mark.slow
def test_bad_inputs_exit_2(tmp_path, capsys, tiny_run):
    out = ["--output", str(tmp_path / "o")]
    assert "does not exist" in _bad(capsys, ["--data", str(tmp_path / "missing")] + out)
    (tmp_path / "empty").mkdir()
    assert "no class folders" in _bad(capsys, ["--data", str(tmp_path / "empty")] + out)
    root = write_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    os.makedirs(os.path.join(root, "c"))
    err = _bad(capsys, ["--data", root] + out)
    assert os.path.join(root, "c") in err and "no usable images" in err
    for frac in ("0", "1.5"):
        assert "--data-fraction" in _bad(capsys, ["--data-fraction", frac] + out)
    assert "holds another run" in _bad(capsys, ["--output", str(tiny_run)])
    assert "unknown student model" in _bad(capsys, ["--model", "nope"] + out)
    assert "--bogus" in _bad(capsys, ["--bogus"] + out)
    # a teacher trained on 10 classes does not fit a 3-class folder
    root3 = write_image_folder(tmp_path / "d3", {"a": 4, "b": 4, "c": 4})
    err = _bad(capsys, ["--data", root3, "--teacher-ckpt", str(tiny_run / "teacher.pt"), "--batch-size", "4",
                        "--workers", "0"] + out)
    assert "10 classes" in err and "3" in err
    # same number of classes, other names: refused rather than mislabelled
    root10 = write_image_folder(tmp_path / "d10", {f"k{i}": 2 for i in range(10)})
    err = _bad(capsys, ["--data", root10, "--teacher-ckpt", str(tiny_run / "teacher.pt"), "--batch-size", "4",
                        "--workers", "0"] + out)
    assert "different names" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read" in _bad(capsys, ["--teacher-ckpt", str(tmp_path / "junk.pt"), "--workers", "0"] + out)
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.slow
def test_process_exit_code_and_single_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dearkd_fast.train", "--data", str(tmp_path / "nowhere"),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


@pytest.mark.parametrize("tool", ["train", "invert", "eval", "study", "native"])
def test_cli_doc_flag_table_is_the_configs(tool):
    """docs/cli.md's flag table of each tool is exactly what its config generates (python -m dearkd_fast.config)."""
    from dearkd_fast import config

    cls = config.TOOL_CONFIGS[tool]
    table = config.flag_table(cls)
    cli = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")).read()
    assert f"## {tool}\n\n`python -m dearkd_fast.{tool}`\n\n{table}" in cli
    parser = config.build_parser(cls, "x", "")
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert all(f"`{f}`" in table for f in flags)


@pytest.mark.slow
def test_compile_and_amp_end_to_end(tmp_path):
    """--compile (torch.compile of the student) trains through both stages with --amp (slow: one compile)."""
    out = tmp_path / "c"
    assert main(TINY + ["--epochs", "2", "--stage1-epochs", "1", "--compile", "--amp", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in s["epochs"]] == [1, 2] and s["args"]["compile"]
    assert all(torch.isfinite(torch.tensor(r["train"]["loss"])) for r in s["epochs"])


@pytest.mark.slow
def test_readme_dropin_snippet_runs(tiny_run):
    """The README's DeiT-style snippet, executed as written (teacher path and a batch filled in)."""
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace("runs/x/teacher.pt", str(tiny_run / "teacher.pt"))
    scope = {"images": torch.randn(2, 3, 32, 32), "labels": torch.tensor([1, 2])}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["criterion"].stage == 2


def test_beta_decay_schedule():
    from dearkd_fast.config import TrainConfig

    cfg = TrainConfig(epochs=6, stage1_epochs=4, beta=2.0, beta_decay=True)
    assert [cfg.beta_at(e) for e in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert [TrainConfig(epochs=6, beta=2.0).beta_at(e) for e in range(6)] == [2.0] * 6


@pytest.mark.slow
def test_ablation_flags_reach_the_loss_and_the_student(tmp_path):
    """--beta-decay weights each stage-1 epoch's alignment by its own beta (the epoch means add up as the loss
    does); --num-mhca 0 with --align-blocks builds plain attention with projections on the named blocks."""
    out = tmp_path / "decay"
    assert main(TINY + ["--epochs", "3", "--stage1-epochs", "2", "--beta", "2", "--beta-decay", "--output",
                        str(out)]) == 0
    records = json.loads((out / "summary.json").read_text())["epochs"]
    for rec, beta in zip(records[:2], (2.0, 1.0)):
        t = rec["train"]
        assert t["loss"] == pytest.approx(0.5 * t["ce"] + 0.5 * t["kd"] + beta * t["align"], rel=1e-4)
    out = tmp_path / "plain"
    assert main(TINY + ["--epochs", "1", "--num-mhca", "0", "--align-blocks", "0,2,3", "--output", str(out)]) == 0
    from dearkd_fast.checkpoint import load_checkpoint
    from dearkd_fast.models.student import MHCA

    ck = load_checkpoint(str(out / "checkpoint.pt"))  # weights_only: a crafted file runs nothing
    keys = [k for k in ck["student"] if k.startswith("align_proj.") and k.endswith(".weight")]
    assert len(keys) == 3
    import timm

    m = timm.create_model("dearkd_micro_patch4_32", num_mhca=0, num_classes=10)
    assert not any(isinstance(b.attn, MHCA) for b in m.blocks)
    m.set_distilled_training(True)
    m.set_alignment([32, 64], [0, 2, 3])
    m.load_state_dict(ck["student"])  # the run's student is that network, strictly


@pytest.mark.slow
def test_ablation_flags_refuse_bad_values(tmp_path, capsys):
    out = ["--output", str(tmp_path / "o")]
    assert "has blocks 0-5, not 9" in _bad(capsys, ["--align-blocks", "0,9"] + out)
    assert "--align-blocks must be comma-separated" in _bad(capsys, ["--align-blocks", "a"] + out)
    assert "distinct" in _bad(capsys, ["--align-blocks", "1,1"] + out)
    assert "no block to align" in _bad(capsys, ["--num-mhca", "0"] + out)
    assert "--num-mhca must be >= 0" in _bad(capsys, ["--num-mhca", "-1"] + out)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_main_job_learns(tmp_path, capsys):
    """The README's main job, as written (defaults, --amp --dali): a change that stops the teacher or the student
    learning fails here (the digits student ends near 95 %, the teacher near 99 %; a few minutes on 2 cores)."""
    assert main(["--amp", "--dali", "--no-progress", "--output", str(tmp_path / "main")]) == 0
    s = json.loads((tmp_path / "main" / "summary.json").read_text())
    assert s["teacher_top1"] >= 95.0 and s["final_top1"] >= 90.0, (s["teacher_top1"], s["final_top1"])
    import re

    table = capsys.readouterr().out
    assert f"student dearkd_micro_patch4_32 final          {s['final_top1']:.2f}%" in table
    assert re.search(r"\nelapsed \d+s on cpu\n", table), table[-200:]
