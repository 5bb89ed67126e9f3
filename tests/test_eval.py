"""python -m dearkd_fast.eval scores a student.pt as its run did; --finetune starts a run on a new data set from a
trained student with fresh heads; --drop-path and --model-ema reach the student."""
import json
import os
import shutil

import pytest
import timm
import torch

from dearkd_fast import eval as evaluate
from dearkd_fast import train
from dearkd_fast.config import TrainConfig, from_argv
from dearkd_fast.data.folder import builtin_digits

TINY = ["--data-fraction", "0.12", "--batch-size", "32", "--teacher-epochs", "1", "--workers", "0", "--no-progress",
        "--warmup-epochs", "0", "--amp"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert train.main(TINY + ["--epochs", "2", "--stage1-epochs", "1", "--model-ema", "--model-ema-decay", "0.5",
                              "--output", str(out)]) == 0
    return out


@pytest.mark.slow
def test_eval_scores_a_checkpoint_as_its_run_did(run, tmp_path, capsys):
    summary = json.loads((run / "summary.json").read_text())
    for ckpt, key in (("student.pt", "final_top1"), ("student_ema.pt", "final_top1_ema")):
        out = tmp_path / f"{ckpt}.json"
        argv = ["--checkpoint", str(run / ckpt), "--batch-size", "64", "--amp", "--workers", "0", "--no-progress",
                "--json", str(out)]
        assert evaluate.main(argv) == 0
        res = json.loads(out.read_text())
        assert res["top1"] == summary[key] and res["num_samples"] == summary["num_val_samples"] == 360
        assert res["images_per_s"] > 0 and "top-1" in capsys.readouterr().out
    assert summary["final_top1_ema"] is not None and summary["epochs"][-1]["val_top1_ema"] == summary["final_top1_ema"]


def _three_classes(root):
    """An ImageFolder of 3 new classes (10 digits images each): another data set for --finetune."""
    train_dir, _ = builtin_digits()
    for name, src in zip(("a", "b", "c"), sorted(os.listdir(train_dir))[:3]):
        os.makedirs(root / name)
        for f in sorted(os.listdir(os.path.join(train_dir, src)))[:10]:
            shutil.copy(os.path.join(train_dir, src, f), root / name / f)
    return root


@pytest.mark.slow
def test_finetune_starts_from_the_students_weights_with_fresh_heads(run, tmp_path, capsys):
    data = _three_classes(tmp_path / "new")
    base = ["--data", str(data), "--batch-size", "8", "--workers", "0", "--no-progress", "--epochs", "1",
            "--stage1-epochs", "0", "--finetune", str(run / "student.pt")]
    cfg = from_argv(TrainConfig, base + ["--output", str(tmp_path / "ft")], "x", "")
    s = train.build_student(cfg, 3, None, 1, torch.device("cpu"))
    trained = torch.load(run / "student.pt", weights_only=True)["model"]
    mine = s.model.state_dict()
    heads = ("head.", "head_dist.")
    assert all(torch.equal(mine[k], v) for k, v in trained.items() if not k.startswith(heads))
    assert mine["head.weight"].shape[0] == 3 and trained["head.weight"].shape[0] == 10
    assert train.main(base + ["--output", str(tmp_path / "ft")]) == 0
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["num_classes"] == 3
    capsys.readouterr()
    # another model than the checkpoint's, a missing file, a checkpoint of other classes for eval: one line, exit 2
    for argv in (base[:-1] + [str(tmp_path / "missing.pt")], base + ["--model", "dearkd_nano_patch4_32"]):
        assert train.main(argv + ["--output", str(tmp_path / "bad")]) == 2
        assert "--finetune" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(run / "student.pt"), "--data", str(data), "--workers", "0",
                          "--no-progress"]) == 2
    assert "classes" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt"), "--no-progress"]) == 2


def test_drop_path_and_ema_flags_reach_the_student_or_are_refused(tmp_path, capsys):
    cfg = from_argv(TrainConfig, ["--drop-path", "0.2", "--model-ema", "--output", str(tmp_path / "o")], "x", "")
    s = train.build_student(cfg, 10, None, 1, torch.device("cpu"))
    assert s.model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2) and s.ema is not None
    assert all(torch.equal(a, b) for a, b in zip(s.ema.module.state_dict().values(), s.model.state_dict().values()))
    assert timm.create_model(cfg.model).blocks[-1].drop_path.__class__.__name__ == "Identity"  # the model's default
    for bad in (["--drop-path", "1.5"], ["--model-ema-decay", "1"], ["--model-ema-decay", "nan"]):
        assert train.main(bad + ["--output", str(tmp_path / "b")]) == 2, bad
        err = capsys.readouterr().err
        assert bad[0] in err and len(err.strip().splitlines()) == 1
