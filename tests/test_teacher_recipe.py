"""--teacher-recipe fast: patch whitening, the prepared net, lookahead, the folded logit scale, and its refusals."""
import torch
import torch.nn.functional as F

from dearkd_fast import teacher_recipe
from dearkd_fast.config import IMAGENET_MEAN as MEAN
from dearkd_fast.config import IMAGENET_STD as STD
from dearkd_fast.data.resident import ResidentLoader
from dearkd_fast.errors import InputError
from dearkd_fast.models.cifar import cifar_resnet8, cifar_widenet
from dearkd_fast.testing import folder_data
from tests.test_train import _bad, main


def _resident(n=64, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = F.avg_pool2d(torch.rand(n, 3, size + 2, size + 2, generator=g), 3, 1)  # correlated neighbours
    images = (smooth * 255).round().to(torch.uint8)
    labels = torch.arange(n) % 10
    return ResidentLoader(images, labels, batch_size=16, train=True, mean=MEAN, std=STD, seed=seed)


def test_whitening_filters_whiten_the_patches():
    x = _resident()._normalise(_resident().images)
    w = teacher_recipe.whitening_filters(x, 2, eps=1e-10)
    assert w.shape == (24, 3, 2, 2) and torch.equal(w[12:], -w[:12])
    y = F.conv2d(x.double(), w[:12].double()).permute(1, 0, 2, 3).reshape(12, -1)
    moment = y @ y.T / y.shape[1]
    torch.testing.assert_close(moment, torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    raw = torch.linalg.eigvalsh(patches.T @ patches / patches.shape[0])
    assert raw.max() > 20 * raw.min()  # the patches were far from white


def test_fast_recipe_prepares_the_net_and_folds_the_logit_scale():
    torch.manual_seed(0)
    loader = _resident()
    model = cifar_widenet(num_classes=10)
    recipe = teacher_recipe.fast_recipe(model, loader, lr=0.1, weight_decay=1e-3, epochs=2, whiten_images=64)
    torch.testing.assert_close(model.conv1.weight, teacher_recipe.whitening_filters(loader._normalise(loader.images), 2))
    assert not model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad
    conv2 = model.layer2[0][4]  # the second 3x3 conv of a ConvGroup: the identity at first
    x = torch.randn(2, conv2.in_channels, 5, 5)
    torch.testing.assert_close(conv2(x), x)
    assert recipe.total_steps == 2 * len(loader) and recipe.loader.reflect and recipe.loader.alternate_flip
    lrs = [g["lr"] for g in recipe.optimizer.param_groups]
    assert max(lrs) == 64 * min(lrs)  # BN biases at 64x, everything at the warm-up's start
    fc_before = model.fc.weight.detach().clone()
    recipe.finish()
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    head = features @ model.fc.weight.T
    torch.testing.assert_close(model(x), head)
    torch.testing.assert_close(model.fc.weight / recipe.logit_scale, fc_before)  # the scale lives in fc now


def test_finish_measures_the_bn_statistics_of_the_final_weights():
    torch.manual_seed(1)
    loader = _resident()
    model = cifar_widenet(num_classes=10)
    recipe = teacher_recipe.fast_recipe(model, loader, lr=0.1, weight_decay=0.0, epochs=3, whiten_images=64,
                                        bn_images=32)
    stale = torch.full_like(model.bn1.running_mean, 7.0)
    model.bn1.running_mean.copy_(stale)  # what training left: statistics of other weights
    recipe.loader.set_epoch(3)  # the epoch after the last: the batches finish() reads
    batches = [x for x, _ in list(recipe.loader)[:2]]  # 2 batches of 16 = bn_images
    with torch.no_grad():
        stem = [model.conv1(x) for x in batches]
    recipe.finish()
    expect_mean = torch.stack([y.mean((0, 2, 3)) for y in stem]).mean(0)
    expect_var = torch.stack([y.var((0, 2, 3), unbiased=True) for y in stem]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean, expect_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.bn1.running_var, expect_var, atol=1e-5, rtol=1e-4)
    assert model.bn1.momentum == 0.1 and model.bn1.num_batches_tracked.item() == 2


def test_lookahead_pulls_the_weights_to_a_slow_copy():
    loader = _resident()
    model = cifar_widenet(num_classes=10)
    recipe = teacher_recipe.fast_recipe(model, loader, lr=0.1, weight_decay=0.0, epochs=5, whiten_images=64)
    p = model.fc.weight
    start = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    recipe.after_step(4)  # not a lookahead step
    torch.testing.assert_close(p, start + 1)
    step = 5
    d = 0.95 ** 5 * (step / recipe.total_steps) ** 3
    recipe.after_step(step)
    torch.testing.assert_close(p, start + (1 - d))
    with torch.no_grad():
        p.add_(1.0)
    recipe.after_step(recipe.total_steps)  # the last step hands over the slow copy (d = 1)
    torch.testing.assert_close(p, start + (1 - d))


def test_fast_recipe_refuses_what_it_cannot_prepare():
    loader = _resident()
    for model in (cifar_resnet8(num_classes=10),):
        try:
            teacher_recipe.fast_recipe(model, loader, lr=0.1, weight_decay=0.0, epochs=1)
        except InputError as e:
            assert "stem conv1" in str(e)
        else:
            raise AssertionError("a 3x3 stem was accepted")
    torch_loader = folder_data("digits", "torch", batch_size=16, workers=0).train
    try:
        teacher_recipe.fast_recipe(cifar_widenet(num_classes=10), torch_loader, lr=0.1, weight_decay=0.0, epochs=1)
    except InputError as e:
        assert "resident loader" in str(e)
    else:
        raise AssertionError("the torchvision loader was accepted")


def test_trainer_trains_a_fast_teacher_and_refuses_a_bad_teacher(tmp_path, capsys):
    from dearkd_fast.models.teacher import load_teacher

    out = tmp_path / "t"
    assert main(["--teacher", "cifar_widenet", "--teacher-recipe", "fast", "--teacher-epochs", "2", "--teacher-lr",
                 "0.5", "--teacher-smoothing", "0.2", "--epochs", "0", "--batch-size", "128", "--no-progress",
                 "--output", str(out)]) == 0
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["teacher_top1"] > 50  # digits, 2 epochs: far above the 10 % of chance
    model, spec = load_teacher(str(out / "teacher.pt"), num_classes=10)
    assert model.conv1.weight.shape == (24, 3, 2, 2) and spec.arch == "cifar_widenet"
    err = _bad(capsys, ["--teacher", "cifar_resnet8", "--teacher-recipe", "fast", "--teacher-epochs", "1",
                        "--epochs", "0", "--no-progress", "--output", str(tmp_path / "bad")])
    assert "stem conv1" in err
    assert not (tmp_path / "bad" / "summary.json").exists()
