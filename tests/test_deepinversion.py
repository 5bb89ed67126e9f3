"""DeepInversionHook: the public hook's formula, through ops.bn_stat_loss."""
import pytest
import torch
import torch.nn as nn

from dearkd_fast import DeepInversionHook
from dearkd_fast.testing import public_bn_loss


def public_hook_formula(x, bn):
    return public_bn_loss(x, bn.running_mean.data, bn.running_var.data)


@pytest.mark.parametrize("channels_last", [False, True])
def test_hook_equals_public_formula(channels_last):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    hooks = [DeepInversionHook(net[1]), DeepInversionHook(net[4])]
    x = torch.randn(4, 3, 11, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    net(x)
    want = [public_hook_formula(net[0](x), net[1]), public_hook_formula(net[3](net[2](net[1](net[0](x)))), net[4])]
    for h, w in zip(hooks, want):
        torch.testing.assert_close(h.r_feature, w, rtol=1e-5, atol=1e-6)
    sum(h.r_feature for h in hooks).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for h in hooks:
        h.close()
    hooks[0].r_feature = None
    net(x)
    assert hooks[0].r_feature is None  # closed: no longer called


def test_hook_rejects_non_bn():
    with pytest.raises(ValueError, match="BatchNorm"):
        DeepInversionHook(nn.Conv2d(3, 3, 1))


# ---------------------------------------------------------------- the objective and the CLI
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dearkd_fast import invert, reference  # noqa: E402
from dearkd_fast.config import INVERSION, InvertConfig, from_argv  # noqa: E402
from dearkd_fast.losses import DeepInversionLoss, penultimate  # noqa: E402
from dearkd_fast.models.teacher import load_teacher  # noqa: E402

FAST = ["--no-progress", "--iterations", "80", "--low-res-iterations", "80"]


def test_objective_sums_weighted_terms():
    model, _ = _random_teacher()
    crit = DeepInversionLoss(model, r_bn=0.3, first_bn_mult=4.0, tv_l2=1e-3, tv_l1=0.5, l2=1e-2, bpid=2.0,
                             bpid_margin=1.0, bpid_lambda=0.5, backend="torch")
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    loss = crit(x, y)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    xs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for b in bns]
    logits, feats = penultimate(model, x)
    for h in hooks:
        h.remove()
    per_layer = torch.stack([reference.bn_stat_loss(a, b.running_mean, b.running_var) for a, b in zip(xs, bns)])
    bn = 4.0 * per_layer[0] + per_layer[1:].sum()
    tv2, tv1 = reference.tv_losses(x)
    want = (nn.functional.cross_entropy(logits, y) + 0.3 * bn + 1e-3 * tv2 + 0.5 * tv1 + 1e-2 * x.flatten(1).norm(dim=1).mean()
            + 2.0 * reference.bpid_loss(feats, logits, y, 1.0, 0.5))
    torch.testing.assert_close(loss, want)
    assert set(crit.last_terms) == {"ce", "bn", "tv_l2", "tv_l1", "l2", "bpid", "loss"}
    crit.close()


def _random_teacher():
    from dearkd_fast.models.teacher import create_teacher_model

    model = create_teacher_model("cifar_resnet8", 3).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return model, None


def _run_invert(tmp_path, teacher, name, *extra):
    out = tmp_path / name
    rc = invert.main(["--teacher-ckpt", teacher, "--images-per-class", "4", "--batch-size", "40", "--output", str(out),
                      *FAST, *extra])
    assert rc == 0
    return out, json.loads((out / "meta.json").read_text())


@pytest.mark.slow
def test_bn_statistics_term_falls(digits_teacher):
    model, spec = load_teacher(digits_teacher)
    crit = DeepInversionLoss(model.eval(), r_bn=1.0, backend="torch")
    cfg = from_argv(InvertConfig, ["--teacher-ckpt", digits_teacher, "--output", "x", "--iterations", "30"], "invert")
    s = cfg.synthesis(spec.arch, spec.num_classes, spec.input_size)
    assert (s.iterations, s.r_bn) == (30, INVERSION[("dearkd", "small")].r_bn)  # a flag where given, else the preset
    y = torch.arange(20) % 10
    crit(torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)), y)
    start = crit.last_terms["bn"].item()
    _, terms = invert.synthesize_batch(crit, y, s, spec, seed=0, device=torch.device("cpu"), progress=False, desc="t")
    assert terms["bn"] < 0.5 * start


@pytest.mark.slow
def test_inversion_hits_targets_and_writes_imagefolder(tmp_path, digits_teacher):
    out, meta = _run_invert(tmp_path, digits_teacher, "a")
    assert meta["teacher_accuracy"] >= 90.0 and meta["num_images"] == 40
    for key in ("settings", "seed", "bn_loss_final", "intra_class_distance", "final_terms"):
        assert key in meta
    assert sorted(os.listdir(out)) == sorted([str(c) for c in range(10)] + ["meta.json", "progress.json", "run.json"])
    for c in range(10):
        files = sorted(os.listdir(out / str(c)))
        assert files == [f"{i:05d}.png" for i in range(4)]
        with Image.open(out / str(c) / files[0]) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"


@pytest.mark.slow
def test_bpid_spreads_classes_and_keeps_them(tmp_path, digits_teacher):
    _, off = _run_invert(tmp_path, digits_teacher, "off", "--bpid", "0")
    _, on = _run_invert(tmp_path, digits_teacher, "on", "--bpid", "10")
    assert on["intra_class_distance"] > off["intra_class_distance"]
    assert on["teacher_accuracy"] >= 90.0


def _images(folder):
    return {os.path.relpath(os.path.join(r, f), folder): np.asarray(Image.open(os.path.join(r, f)))
            for r, _, fs in os.walk(folder) for f in fs if f.endswith(".png")}


@pytest.mark.slow
def test_resume_after_kill_redoes_nothing_and_leaves_no_partial_file(tmp_path, digits_teacher, monkeypatch):
    args = ["--teacher-ckpt", digits_teacher, "--images-per-class", "3", "--batch-size", "10", "--no-progress",
            "--iterations", "3"]
    assert invert.main(args + ["--output", str(tmp_path / "whole")]) == 0
    whole = _images(tmp_path / "whole")
    assert len(whole) == 30

    real_synth, real_save = invert.synthesize_batch, invert.save_images
    calls = []

    def synth(*a, **k):
        calls.append(a[4])  # the batch seed
        return real_synth(*a, **k)

    def save_then_die(x, ids, output, spec, s):  # the second batch dies after two of its ten images
        if len(calls) == 2:
            real_save(x[:2], ids[:2], output, spec, s)
            with open(os.path.join(output, spec.class_names[0], ".tmp-00009.png-abc"), "wb") as f:
                f.write(b"\x89PNG half")  # a torn temporary write
            raise KeyboardInterrupt
        real_save(x, ids, output, spec, s)

    monkeypatch.setattr(invert, "synthesize_batch", synth)
    monkeypatch.setattr(invert, "save_images", save_then_die)
    out = tmp_path / "killed"
    assert invert.main(args + ["--output", str(out)]) == 130
    assert json.loads((out / "progress.json").read_text())["done"].keys() == {"0"}
    calls.clear()
    monkeypatch.setattr(invert, "save_images", real_save)
    assert invert.main(args + ["--output", str(out), "--resume"]) == 0
    assert calls == [1, 2]  # batch 0 not redone; batches 1 and 2 once each
    got = _images(out)
    assert got.keys() == whole.keys()
    assert all(np.array_equal(got[k], whole[k]) for k in got)  # same images as the uninterrupted run
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


@pytest.mark.slow
def test_invert_bad_inputs_exit_2(tmp_path, digits_teacher, capsys):
    def bad(argv, text):
        assert invert.main(argv) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err

    bad(["--output", str(tmp_path / "o")], "--teacher-ckpt")
    bad(["--teacher-ckpt", str(tmp_path / "none.pt"), "--output", str(tmp_path / "o")], "does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    bad(["--teacher-ckpt", digits_teacher, "--output", str(tmp_path / "full")], "not empty")
    bad(["--teacher-ckpt", digits_teacher, "--output", str(tmp_path / "o"), "--adi", "1"], "needs a student")
    bad(["--teacher-ckpt", digits_teacher, "--output", str(tmp_path / "o"), "--class-names", "a,b"], "--class-names")
    # a teacher without BatchNorm cannot be inverted: the user's mistake, so exit 2 (it was exit 1)
    bad(["--teacher", "vit_tiny_patch16_224", "--num-classes", "10", "--output", str(tmp_path / "o")], "BatchNorm2d")
    bad(["--teacher-ckpt", digits_teacher, "--output", str(tmp_path / "o"), "--preset", "huge"], "--preset")
    out = tmp_path / "r"
    assert invert.main(["--teacher-ckpt", digits_teacher, "--images-per-class", "1", "--batch-size", "10",
                        "--iterations", "1", "--no-progress", "--output", str(out)]) == 0
    capsys.readouterr()
    bad(["--teacher-ckpt", digits_teacher, "--images-per-class", "1", "--batch-size", "10", "--iterations", "2",
         "--no-progress", "--output", str(out), "--resume"], "settings differ")


@pytest.mark.slow
def test_train_on_synthetic_evaluate_on_real(tmp_path, digits_teacher):
    from dearkd_fast.train import main

    syn, meta = _run_invert(tmp_path, digits_teacher, "syn", "--iterations", "5", "--amp")
    assert meta["settings"]["amp"]
    out = tmp_path / "df"
    assert main(["--data", str(syn), "--val-data", "digits", "--teacher-ckpt", digits_teacher, "--epochs", "2",
                 "--stage1-epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_train_samples"] == 40 and s["num_val_samples"] == 360  # real digits


@pytest.mark.slow
def test_overwrite_replaces_only_what_invert_wrote(tmp_path, digits_teacher):
    base = ["--teacher-ckpt", digits_teacher, "--batch-size", "10", "--iterations", "1", "--no-progress"]
    out = tmp_path / "o"
    assert invert.main(base + ["--images-per-class", "2", "--output", str(out)]) == 0
    (out / "0" / "notes.txt").write_text("mine")
    assert invert.main(base + ["--images-per-class", "1", "--output", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out / "0")) == ["00000.png", "notes.txt"]  # the stale 00001.png is gone
    assert json.loads((out / "meta.json").read_text())["num_images"] == 10


@pytest.mark.slow
def test_adi_competition_against_a_student(tmp_path, digits_teacher):
    student = os.path.join(os.path.dirname(digits_teacher), "student.pt")
    out, meta = _run_invert(tmp_path, digits_teacher, "adi", "--iterations", "2", "--adi", "1", "--student-ckpt", student)
    assert 0.0 <= meta["final_terms"]["adi"] <= 1.0 and meta["settings"]["adi"] == 1.0


# ---------------------------------------------------------------- teachers, targets and students from elsewhere
def _cfg(*argv):
    return from_argv(InvertConfig, [*argv, "--output", "o"], "invert")


def test_teacher_weights_plain_or_wrapped_state_dict(tmp_path, capsys):
    from dearkd_fast.models.teacher import create_teacher_model

    torch.manual_seed(0)
    src = create_teacher_model("cifar_resnet8", 3)
    plain, wrapped, wrong = tmp_path / "plain.pt", tmp_path / "wrapped.pt", tmp_path / "wrong.pt"
    torch.save(src.state_dict(), plain)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, wrapped)
    torch.save(create_teacher_model("cifar_resnet20", 3).state_dict(), wrong)
    for f in (plain, wrapped):
        model, spec = invert.load_inversion_teacher(_cfg("--teacher", "cifar_resnet8", "--teacher-weights", str(f)))
        assert spec.num_classes == 3 and spec.class_names == ["0", "1", "2"]  # the weights' own class count
        for k, v in src.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v)
    rc = invert.main(["--teacher", "cifar_resnet8", "--teacher-weights", str(wrong), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not fit" in err


def test_pretrained_teachers_read_the_local_cache_only(tmp_path, monkeypatch, capsys):
    """Nothing downloads: a missing file is a one-line error saying where to put it; a present one loads."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--teacher", "tv:mobilenet_v3_small", "--pretrained", "--output", str(tmp_path / "o"), "--no-progress"]
    assert invert.main(argv) == 2
    err = capsys.readouterr().err
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    assert err.count("\n") == 1 and weights.url in err and str(path) in err
    torch.manual_seed(1)
    published = torchvision.models.mobilenet_v3_small().state_dict()
    path.parent.mkdir(parents=True)
    torch.save(published, path)
    model, spec = invert.load_inversion_teacher(_cfg("--teacher", "tv:mobilenet_v3_small", "--pretrained"))
    assert spec.num_classes == 1000 and spec.class_names[:2] == ["000", "001"] and spec.class_names[-1] == "999"
    torch.testing.assert_close(model.state_dict()["classifier.3.weight"], published["classifier.3.weight"])
    assert invert.main(["--teacher", "resnet18", "--pretrained", "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Hugging Face cache" in err and "--teacher-weights" in err


@pytest.mark.slow
def test_targets_and_an_adi_student_from_timm(tmp_path, digits_teacher):
    weights = tmp_path / "student_weights.pt"
    torch.save(torch.load(digits_teacher, weights_only=True)["model"], weights)  # a cifar_resnet8 of 10 classes
    out, meta = _run_invert(tmp_path, digits_teacher, "t", "--targets", "2,5", "--adi", "1", "--student",
                            "cifar_resnet8", "--student-weights", str(weights), "--iterations", "3",
                            "--low-res-iterations", "0")
    assert meta["targets"] == [2, 5] and meta["num_images"] == 8 and "adi" in meta["final_terms"]
    assert sorted(p for p in os.listdir(out) if os.path.isdir(out / p)) == ["2", "5"]
    assert sorted(os.listdir(out / "5")) == [f"{i:05d}.png" for i in range(4)]
