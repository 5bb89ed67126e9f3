"""The drop-in contracts: timm's model conventions for every registered model, the distilled output with
DeiT-style losses, checkpoints through timm's loader, and DDP over the alignment projections."""
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dearkd_fast  # noqa: F401  (registers the models)
from dearkd_fast import DearKDLoss, Teacher
from dearkd_fast.errors import InputError
from dearkd_fast.models.student import DearKDViT, load_student
from dearkd_fast.models.teacher import CifarResNet, load_teacher
from dearkd_fast.testing import make_teacher

SMALL = ["dearkd_micro_patch4_32", "dearkd_nano_patch4_32", "dearkd_tiny_patch4_32", "cifar_resnet8", "cifar_resnet9",
         "cifar_resnet20", "cifar_widenet"]
LARGE = ["dearkd_tiny_patch16_224", "dearkd_small_patch16_224", "dearkd_base_patch16_224", "cifar_resnet56"]


def _x(model, batch=2):
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


def test_every_model_is_registered_with_a_default_config():
    names = set(timm.list_models("dearkd_*") + timm.list_models("cifar_*"))
    assert names == set(SMALL + LARGE)
    assert set(timm.list_models(pretrained=False, name_matches_cfg=True)) >= names  # timm's tests see them all
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.input_size[0] == 3 and cfg.first_conv and cfg.classifier
        assert bool(cfg.fixed_input_size) == name.startswith("dearkd_")


@pytest.mark.parametrize("name", SMALL + LARGE)
def test_model_api_on_the_meta_device(name):
    """Structure of every model (no memory): timm's constructor kwargs, heads, pooling, groups, device/dtype."""
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(name, pretrained=True, device="meta")
    residual = name != "cifar_widenet"
    if not residual:
        with pytest.raises(InputError, match="drop_path_rate"):
            timm.create_model(name, drop_path_rate=0.1, device="meta")
    m = timm.create_model(name, num_classes=7, drop_rate=0.1, drop_path_rate=0.1 * residual, device="meta",
                          dtype=torch.float64)
    assert all(t.device.type == "meta" and t.dtype == torch.float64 for t in m.parameters())
    assert m.num_classes == 7 and m.head_hidden_size == m.num_features > 0 and m.in_chans == 3
    assert m.global_pool in ("token", "avg", "max")
    groups = timm.models._manipulate.group_parameters(m, m.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    named = dict(m.named_parameters())
    assert all(p in named for p in getattr(m, "no_weight_decay", set)())
    m.eval()
    m.reset_classifier(0)
    assert m.num_classes == 0 and all(isinstance(h, nn.Identity) for h in _heads(m))
    m.reset_classifier(3)
    assert all(h.weight.dtype == torch.float64 and h.weight.device.type == "meta" and not h.training for h in _heads(m))
    assert timm.create_model(name, num_classes=0, device="meta").num_classes == 0


def _heads(m):
    c = m.get_classifier()
    return c if isinstance(c, tuple) else (c,)


@pytest.mark.parametrize("name", SMALL)
def test_forward_features_head_and_pooling(name):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=6).eval()
    x = _x(m)
    feats = m.forward_features(x)
    assert isinstance(feats, torch.Tensor)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, m.head_hidden_size)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    headless = timm.create_model(name, num_classes=0).eval()
    headless.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(("head", "fc"))})
    torch.testing.assert_close(headless(x), pre)
    if isinstance(m, DearKDViT):
        assert m.num_prefix_tokens == 2 and feats.shape == (2, 2 + m.patch_embed.num_patches, m.num_features)
    else:
        m.reset_classifier(0, "")
        assert m(x).shape == feats.shape  # no pooling: the unpooled map


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_changes_nothing(name):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=4, drop_path_rate=0.0)
    x = _x(m)
    m.train()
    want = m(x)
    want.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    got = m(x)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("name", SMALL)
def test_features_only_and_forward_intermediates(name):
    m = timm.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, 32, 32)
    outs = m(x)
    assert len(outs) == len(m.feature_info.channels()) >= 3
    for o, c, r in zip(outs, m.feature_info.channels(), m.feature_info.reduction()):
        assert o.shape[1] == c and 32 // r - 1 <= o.shape[-1] <= 32 // r  # unpadded stems lose a pixel
    full = timm.create_model(name).eval()
    final, inter = full.forward_intermediates(x, indices=2)
    assert len(inter) == 2 and all(t.dim() == 4 for t in inter)
    torch.testing.assert_close(final, full.forward_features(x))
    only = full.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(only[0], full.forward_intermediates(x, intermediates_only=True)[0])


@pytest.mark.parametrize("name", ["dearkd_micro_patch4_32", "cifar_resnet8"])
def test_torchscript_and_fx(name):
    from timm.models import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5).eval()
    x = _x(m, 1)
    want = m(x)
    torch.testing.assert_close(torch.jit.script(m)(x), want)
    _, eval_nodes = get_graph_node_names(m.eval())
    fx = create_feature_extractor(m, [eval_nodes[-1]]).eval()
    got = fx(x)
    torch.testing.assert_close(next(iter(got.values())), want)
    scripted = torch.jit.script(fx)  # FX, then TorchScript
    torch.testing.assert_close(next(iter(scripted(x).values())), want)


class DeiTStyleDistillationLoss(nn.Module):
    """A test double with DeiT's documented DistillationLoss contract: (base_criterion, teacher_model,
    distillation_type, alpha, tau); a tuple output is unpacked as (outputs, outputs_kd); hard distillation is
    the CE of the distillation head against the teacher's argmax."""

    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion, self.teacher_model = base_criterion, teacher_model
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def test_distilled_output_works_with_deit_and_plain_losses():
    torch.manual_seed(0)
    teacher = make_teacher(5)
    student = timm.create_model("dearkd_micro_patch4_32", num_classes=5, align_channels=teacher.channels()).train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    plain = student(x)
    assert isinstance(plain, torch.Tensor)  # not distilled: plain logits, so any CrossEntropyLoss works
    nn.CrossEntropyLoss()(plain, y).backward()
    student.set_distilled_training(True)
    out = student(x)
    deit = DeiTStyleDistillationLoss(nn.CrossEntropyLoss(), teacher.model, "hard", 0.5, 1.0)
    ours = DearKDLoss(nn.CrossEntropyLoss(), teacher.model, "hard", 0.5, 1.0, beta=0.0)  # a raw module teacher
    torch.testing.assert_close(ours(x, out, y), deit(x, out, y))
    assert ours.teacher.taps == ["layer1", "layer2"]  # found automatically
    none = DearKDLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    torch.testing.assert_close(none(x, plain, y), nn.functional.cross_entropy(plain, y))
    with pytest.raises(ValueError, match="teacher_model"):
        DearKDLoss(nn.CrossEntropyLoss(), None, "hard", 0.5, 1.0)
    bare = timm.create_model("dearkd_micro_patch4_32", num_classes=5)  # no alignment projections
    crit = DearKDLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0)
    crit.set_stage(1, bare)  # given the model, set_stage switches on distilled training
    assert bare.distilled_training
    assert torch.isfinite(crit(x, bare(x), y)) and set(crit.last_terms) == {"ce", "kd", "loss"}


def test_alignment_sized_for_another_teacher_is_refused():
    teacher = make_teacher(5)
    student = timm.create_model("dearkd_micro_patch4_32", num_classes=5, align_channels=[7, 9])
    student.set_distilled_training(True)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="channels"):
        DearKDLoss(nn.CrossEntropyLoss(), teacher)(x, student(x), torch.tensor([0, 1]))


@pytest.mark.slow
def test_checkpoints_round_trip_through_timm(digits_teacher, tmp_path):
    run = os.path.dirname(digits_teacher)
    for path, kind in ((os.path.join(run, "student.pt"), "student"), (digits_teacher, "teacher")):
        ck = torch.load(path, weights_only=True)
        assert isinstance(ck["model"], dict) and all(isinstance(v, torch.Tensor) for v in ck["model"].values())
        if kind == "student":
            ours, meta = load_student(path)
            arch, n = meta["arch"], meta["num_classes"]
            assert not any(k.startswith("align_proj") for k in ck["model"])
        else:
            ours, spec = load_teacher(path)
            arch, n = spec.arch, spec.num_classes
        model = timm.create_model(arch, num_classes=n)
        timm.models.load_checkpoint(model, path, strict=True)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model.eval()(x), ours.eval()(x))
    train_ck = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert "criterion" not in train_ck and not any("teacher" in k for k in train_ck["student"])
    assert any(k.startswith("align_proj.") for k in train_ck["student"])  # the projections train with the student


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, find_unused: bool):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on both ranks
    teacher = make_teacher(5)
    student = timm.create_model("dearkd_micro_patch4_32", num_classes=5, align_channels=teacher.channels())
    model = DDP(student, find_unused_parameters=find_unused)
    crit = DearKDLoss(nn.CrossEntropyLoss(), teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # different data on each rank
    for step in range(4):
        crit.set_stage(1 if step < 2 else 2, model)  # stage 2: the projections get no loss gradient
        x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
        loss = crit(x, model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({k: v for k, v in student.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_keeps_projections_identical_across_ranks(tmp_path, find_unused):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), find_unused), nprocs=2,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    torch.manual_seed(0)
    teacher = make_teacher(5)
    start = timm.create_model("dearkd_micro_patch4_32", num_classes=5, align_channels=teacher.channels()).state_dict()
    moved = [k for k in a if k.startswith("align_proj.") and not torch.equal(a[k], start[k])]
    assert len(moved) == 4  # both projections' weights and biases trained, identically on both ranks


def test_teacher_of_a_bare_module_gets_a_spec():
    t = Teacher(CifarResNet(1, (8, 16, 32), num_classes=4))
    assert t.spec.num_classes == 4 and t.taps == ["layer1", "layer2"] and t.channels(32) == [8, 16]


def _same_weights(a: nn.Module, b: nn.Module, skip: tuple = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.startswith(skip)]
    return set(keys) == {k for k in sb if not k.startswith(skip)} and all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.mark.parametrize("name", ["dearkd_nano_patch4_32", "cifar_resnet8"])
def test_pretrained_loads_the_given_source_through_timms_loader(name, tmp_path):
    """pretrained=True with a local source, as timm users pass one: our student.pt / teacher.pt as
    pretrained_cfg_overlay=dict(file=...) (the file's class count, strictly), timm's train.py route
    (--pretrained-path: num_classes=-1, a new head of the asked size, every other tensor exact), and a
    `local-dir:` folder written by timm's save_for_hf. No source: one line saying what to pass."""
    from dearkd_fast.data import InputSpec
    from dearkd_fast.errors import CheckpointError, InputError
    from dearkd_fast.models.student import save_student
    from dearkd_fast.models.teacher import TeacherSpec, save_teacher

    trained = timm.create_model(name, num_classes=7)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))  # not what a fresh model would draw
    path = str(tmp_path / "weights.pt")
    if name.startswith("dearkd_"):
        save_student(trained, name, list("abcdefg"), InputSpec(), path)
    else:
        save_teacher(trained, TeacherSpec(name, 7, list("abcdefg"), 32, (0.5,) * 3, (0.5,) * 3), path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert loaded.num_classes == 7 and _same_weights(trained, loaded)
    assert _same_weights(trained, timm.create_model(name, pretrained=True, num_classes=7,
                                                    pretrained_cfg_overlay=dict(file=path)))
    heads = ("head", "fc")
    adapted = timm.create_model(name, pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    assert adapted.num_classes == 3 and _same_weights(trained, adapted, skip=heads)
    head = "head.weight" if name.startswith("dearkd_") else "fc.weight"
    assert not torch.equal(adapted.state_dict()[head], trained.state_dict()[head][:3])  # a new head
    timm.models.save_for_hf(trained, str(tmp_path / "hf"))
    assert _same_weights(trained, timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True))
    with pytest.raises(InputError, match="no published weights exist; give a source"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pt")))
