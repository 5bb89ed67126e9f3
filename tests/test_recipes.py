"""--config FILE (YAML; flags override it; bad keys and values refused by name; recorded for --resume), the
bundled recipes (each parses; the study's are its tiers, the CIFAR-10 teacher's is the study's teacher run;
the ImageNet ones are DeiT's recipe), and --teacher-weights."""
import json
import os

import pytest
import torch

from dearkd_fast import config, study, train
from dearkd_fast.config import STUDY_TIERS, StudyConfig, TrainConfig, from_argv
from dearkd_fast.errors import InputError
from dearkd_fast.train import main

TINY = ["--data-fraction", "0.12", "--batch-size", "32", "--teacher-epochs", "1", "--workers", "0", "--no-progress",
        "--warmup-epochs", "0"]


def _yaml(tmp_path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_file_values_apply_and_flags_override_them(tmp_path):
    path = _yaml(tmp_path, "lr: 5.0e-4\nteacher_epochs: 3\nmodel-ema: true\nalign-standardize: true\n"
                           "teacher-taps: [layer1, layer2]\nstage1-epochs: null\nhflip: 0.25\n")
    cfg = from_argv(TrainConfig, ["--config", path], "t")
    assert (cfg.lr, cfg.teacher_epochs, cfg.model_ema, cfg.align_standardize) == (5e-4, 3, True, True)
    assert cfg.teacher_taps == "layer1,layer2" and cfg.stage1_epochs is None and cfg.data.hflip == 0.25
    assert cfg.config == path
    over = from_argv(TrainConfig, ["--lr", "2e-3", "--config", path, "--teacher-epochs", "7"], "t")
    assert (over.lr, over.teacher_epochs, over.model_ema) == (2e-3, 7, True)  # given flags win, wherever they stand
    # false turns a default-on switch off; false on a default-off switch leaves it off
    study_cfg = from_argv(StudyConfig, ["--config", _yaml(tmp_path, "data-free: false\nno-progress: false\n", "s.yaml")],
                          "s")
    assert study_cfg.data_free is False and study_cfg.no_progress is False
    assert from_argv(StudyConfig, ["--config", str(tmp_path / "s.yaml"), "--data-free"], "s").data_free
    assert from_argv(TrainConfig, ["--config", _yaml(tmp_path, "", "empty.yaml")], "t") == TrainConfig(
        config=str(tmp_path / "empty.yaml"))


@pytest.mark.parametrize("text, words", [
    ("lr: 1e-3\nlearning-rate: 3\n", ["unknown key 'learning-rate'"]),
    ("teacher-epoch: 3\n", ["unknown key 'teacher-epoch'", "did you mean 'teacher-epochs'"]),
    ("config: other.yaml\n", ["unknown key 'config'"]),
    ("lr: fast\n", ["--lr", "invalid float value: 'fast'"]),
    ("teacher-opt: lamb\n", ["--teacher-opt", "invalid choice"]),
    ("amp: 1\n", ["key 'amp' takes true or false"]),
    ("lr: true\n", ["key 'lr' takes a value"]),
    ("lr: {a: 1}\n", ["key 'lr' takes a value or a list"]),
    ("- lr\n- 1\n", ["expected a mapping"]),
    ("lr: [1, 2\n", ["cannot be read (", "Error)"]),
])
def test_a_bad_file_is_refused_by_name_with_exit_2(tmp_path, capsys, text, words):
    path = _yaml(tmp_path, text)
    rc = main(["--config", path, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"--config '{path}'" in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_a_missing_file_or_recipe_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        from_argv(TrainConfig, ["--config", str(tmp_path / "nope.yaml")], "t")
    with pytest.raises(InputError, match="neither a file nor a bundled recipe .*dearkd-s-imagenet"):
        from_argv(TrainConfig, ["--config", "dearkd-xl-imagenet"], "t")
    with pytest.raises(InputError, match="--config: expected one argument"):
        from_argv(TrainConfig, ["--config"], "t")


@pytest.mark.slow
def test_a_run_from_a_file_resumes_with_it_and_refuses_a_changed_one(tmp_path, capsys):
    path = _yaml(tmp_path, "epochs: 1\nstage1-epochs: 1\nlr: 2.0e-3\nalign-standardize: true\n")
    out = str(tmp_path / "run")
    assert main(TINY + ["--config", path, "--output", out]) == 0
    args = json.loads(open(os.path.join(out, "summary.json")).read())["args"]
    assert args["config"] == path and args["lr"] == 2e-3 and args["align_standardize"]  # recorded, resolved
    _yaml(tmp_path, "epochs: 1\nstage1-epochs: 1\nlr: 1.0e-3\nalign-standardize: true\n")
    assert main(TINY + ["--config", path, "--output", out, "--resume", "--epochs", "2"]) == 2
    assert "--lr 0.002 -> 0.001" in capsys.readouterr().err  # the changed file's value, named
    # the same values from another file (a copy elsewhere) resume: what counts is what the run was started with
    copy = _yaml(tmp_path, "epochs: 1\nstage1-epochs: 1\nlr: 2.0e-3\nalign-standardize: true\n", "copy.yaml")
    assert main(TINY + ["--config", copy, "--output", out, "--resume", "--epochs", "2"]) == 0
    s = json.loads(open(os.path.join(out, "summary.json")).read())
    assert len(s["epochs"]) == 2 and s["args"]["lr"] == 2e-3


def _recipes(prefix: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(config.RECIPES_DIR) if f.startswith(prefix) and f.endswith(".yaml"))


def test_every_bundled_recipe_parses_into_its_tool():
    names = _recipes("")
    assert set(_recipes("study-")) == {f"study-{t}" for t in STUDY_TIERS}
    assert {"cifar10-teacher", "dearkd-ti-imagenet", "dearkd-s-imagenet", "dearkd-b-imagenet"} <= set(names)
    for name in names:
        cls = StudyConfig if name.startswith("study-") else TrainConfig
        assert from_argv(cls, ["--config", name], "x").config == name


@pytest.mark.parametrize("tier", sorted(STUDY_TIERS))
def test_study_recipe_is_its_tier(tier):
    cfg = from_argv(StudyConfig, ["--config", f"study-{tier}"], "s")
    assert cfg.tier == tier and cfg.settings == STUDY_TIERS[tier]
    assert from_argv(StudyConfig, ["--config", f"study-{tier}", "--seeds", "9"], "s").settings.seeds == 9


def test_cifar10_teacher_recipe_is_the_study_teacher_run(tmp_path):
    scfg = from_argv(StudyConfig, ["--tier", "cpu-long"], "s")
    sizes = study.Sizes(num_train=50000, num_classes=10, final={f: 1 for f in scfg.settings.fractions},
                        tuning={f: 1 for f in scfg.settings.fractions})
    teacher_run = next(r for r in study.plan(scfg, str(tmp_path), sizes) if r.name == "teacher")
    from_study = config.flat(from_argv(TrainConfig, teacher_run.argv, "t"))
    from_recipe = config.flat(from_argv(TrainConfig, ["--config", "cifar10-teacher"], "t"))
    keys = [k for k in from_study if k.startswith("teacher") or k in ("data", "val_fraction", "epochs", "batch_size",
                                                                       "amp", "amp_dtype", "data_fraction")]
    assert {k: from_recipe[k] for k in keys} == {k: from_study[k] for k in keys}


@pytest.mark.parametrize("size, model", [("ti", "dearkd_tiny_patch16_224"), ("s", "dearkd_small_patch16_224"),
                                         ("b", "dearkd_base_patch16_224")])
def test_imagenet_recipes_are_deits(size, model):
    cfg = from_argv(TrainConfig, ["--config", f"dearkd-{size}-imagenet"], "t")
    assert cfg.model == model and cfg.teacher == "regnety_160" and cfg.epochs == 300
    assert train.effective_lr(cfg, world_size=8) == pytest.approx(1e-3)  # 5e-4 x 1024 / 512, DeiT's scaling
    d = cfg.data
    assert (d.randaug, d.reprob, d.remode, d.aug_repeats) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 3)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.weight_decay, cfg.warmup_epochs) == (0.8, 1.0, 0.1, 0.05, 5)
    assert cfg.drop_path == 0.1 and cfg.model_ema and cfg.model_ema_decay == 0.99996
    assert cfg.distillation_type == "hard" and cfg.run.amp


@pytest.mark.slow
def test_teacher_weights_load_a_state_dict_as_the_teacher(tmp_path, capsys):
    import timm

    torch.manual_seed(3)
    sd = timm.create_model("cifar_resnet8", num_classes=10).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    out = tmp_path / "o"
    assert main(TINY + ["--epochs", "1", "--teacher-weights", str(tmp_path / "w.pth"), "--output", str(out)]) == 0
    from dearkd_fast.models.teacher import load_teacher

    model, spec = load_teacher(str(out / "teacher.pt"))  # the run's teacher: those weights, not trained ones
    assert spec.arch == "cifar_resnet8" and spec.input_size == 32
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    # weights of another net, or with --teacher-ckpt too: refused before any work
    torch.save(timm.create_model("cifar_resnet20", num_classes=10).state_dict(), tmp_path / "other.pth")
    for extra, words in ((["--teacher-weights", str(tmp_path / "other.pth")], "does not fit cifar_resnet8"),
                         (["--teacher-weights", str(tmp_path / "w.pth"), "--teacher-ckpt", str(out / "teacher.pt")],
                          "not both")):
        assert main(TINY + extra + ["--output", str(tmp_path / "bad")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
