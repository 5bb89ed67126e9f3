import pytest
import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import dearkd_fast  # noqa: F401
from dearkd_fast import reference
from dearkd_fast.losses import DearKDLoss, align_pairing, resize_to_grid
from dearkd_fast.models.teacher import Teacher, TeacherSpec, create_teacher_model
from dearkd_fast.testing import make_student, make_teacher


class CountingCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = 0

    def forward(self, *a):
        self.n += 1


def test_stage1_sums_terms_with_weights():
    torch.manual_seed(0)
    teacher = make_teacher()
    student = make_student(teacher=teacher)
    alpha, beta = 0.3, 2.5
    crit = DearKDLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha, beta=beta, backend="torch")
    assert student.align_taps == [0, 1] and [p.out_features for p in student.align_proj] == [32, 64]
    assert list(crit.parameters()) == [] and crit.state_dict() == {}  # the teacher is held, not owned
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    out = student(x)
    assert isinstance(out, tuple) and len(out) == 2  # (cls, dist), like timm's distilled DeiT
    loss = crit(x, out, y)
    t_logits, feats = teacher(x)
    ce = nn.functional.cross_entropy(out[0], y)
    kd = reference.kd_hard(out[1], t_logits)
    tokens = [tok for tok, *_ in out.align]
    align = sum(reference.feature_align_loss(tok, p.weight, p.bias, nn.functional.adaptive_avg_pool2d(feats[s], (8, 8)))
                for tok, p, s in zip(tokens, student.align_proj, student.align_taps))
    torch.testing.assert_close(loss, (1 - alpha) * ce + alpha * kd + beta * align)
    assert set(crit.last_terms) == {"ce", "kd", "align", "loss"}
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.align_proj.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_stage2_never_runs_teacher():
    teacher = make_teacher()
    student = make_student(teacher=teacher)
    counter = CountingCall()
    teacher.model.register_forward_hook(lambda *a: counter())
    crit = DearKDLoss(nn.CrossEntropyLoss(), teacher)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    crit(x, student(x), y)
    calls_stage1 = counter.n
    assert calls_stage1 >= 1
    crit.set_stage(2)
    before = (counter.n, teacher.calls)
    out = student(x)
    loss = crit(x, out, y)
    assert (counter.n, teacher.calls) == before
    want = 0.5 * nn.functional.cross_entropy(out[0], y) + 0.5 * nn.functional.cross_entropy(out[1], y)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError):
        crit.set_stage(3)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_kd_kinds(kind):
    teacher, student = make_teacher(), make_student()
    crit = DearKDLoss(nn.CrossEntropyLoss(), teacher, distillation_type=kind, alpha=1.0, beta=0.0, tau=2.0)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
    out = student(x)
    t_logits, _ = teacher(x)
    want = reference.kd_hard(out[1], t_logits) if kind == "hard" else reference.kd_soft(out[1], t_logits, 2.0)
    torch.testing.assert_close(crit(x, out, y), want)
    assert "align" not in crit.last_terms


def test_mixup_soft_targets():
    teacher = make_teacher()
    student = make_student(teacher=teacher)
    crit = DearKDLoss(SoftTargetCrossEntropy(), teacher)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5)
    x, y = mix(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    assert y.shape == (4, 5)
    loss = crit(x, student(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    crit.set_stage(2)
    assert torch.isfinite(crit(x, student(x), y))


def test_resize_to_grid_pools_down_and_interpolates_up():
    f = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(resize_to_grid(f, (2, 2)), nn.functional.avg_pool2d(f, 2))
    up = resize_to_grid(f[:, :, :2, :2], (4, 4))
    assert up.shape == (1, 1, 4, 4)
    torch.testing.assert_close(up, nn.functional.interpolate(f[:, :, :2, :2], size=(4, 4), mode="bilinear"))
    cl = resize_to_grid(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last), (4, 4))
    assert cl.shape == (2, 3, 4, 4)


def test_align_pairing_splits_evenly():
    assert align_pairing(4, 2) == [0, 0, 1, 1]
    assert align_pairing(2, 2) == [0, 1]
    assert align_pairing(3, 2) == [0, 0, 1]


def test_teacher_is_frozen_and_tapped():
    t = make_teacher()
    t.train()
    assert not t.model.training
    logits, feats = t(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and [f.shape[1:] for f in feats] == [(32, 32, 32), (64, 16, 16)]
    assert not logits.requires_grad


def test_teacher_renormalises_inputs_of_other_statistics():
    model = create_teacher_model("cifar_resnet8", 5).eval()
    spec = TeacherSpec("cifar_resnet8", 5, list("abcde"), 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    raw = torch.rand(2, 3, 32, 32)
    as_teacher = (raw - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    data_mean, data_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    as_data = (raw - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    want = model(as_teacher)
    got, _ = Teacher(model, spec, input_norm=(data_mean, data_std))(as_data)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    same, _ = Teacher(model, spec, input_norm=(spec.mean, spec.std))(as_teacher)
    torch.testing.assert_close(same, want)


def test_each_teacher_map_prepared_once_per_step(monkeypatch):
    """Four MHCA blocks over two taps: two resizes a step, not four."""
    import dearkd_fast.losses as losses

    teacher = make_teacher()
    student = timm.create_model("dearkd_tiny_patch4_32", num_classes=5, embed_dim=48, depth=4, num_heads=4, num_mhca=4,
                                align_channels=teacher.channels())
    student.set_distilled_training(True)
    crit = DearKDLoss(nn.CrossEntropyLoss(), teacher)
    assert student.align_taps == [0, 0, 1, 1]
    calls = []
    real = losses.resize_to_grid
    monkeypatch.setattr(losses, "resize_to_grid", lambda f, g: calls.append(f.shape) or real(f, g))
    x = torch.randn(2, 3, 32, 32)
    crit(x, student(x), torch.tensor([0, 1]))
    assert len(calls) == 2
