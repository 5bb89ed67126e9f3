"""The fast training step: one compiled graph, kernels fed the autocast dtype, no per-step host sync."""
import json

import pytest
import torch

from dearkd_fast import engine, ops, reference, train
from dearkd_fast.losses import DearKDLoss
from dearkd_fast.testing import make_student, make_teacher

QUICK = ["--data-fraction", "0.12", "--batch-size", "32", "--teacher-epochs", "1", "--workers", "0", "--no-progress",
         "--warmup-epochs", "0"]


def _step(amp=False, amp_dtype=torch.bfloat16):
    torch.manual_seed(0)
    teacher = make_teacher(10)
    student = make_student(10, teacher=teacher)
    crit = DearKDLoss(torch.nn.CrossEntropyLoss(), teacher)
    opt = engine.make_optimizer([{"params": list(student.parameters())}], 1e-3)
    return engine.TrainStep(student, crit, opt, engine.cosine_schedule(opt, 0, 10), device=torch.device("cpu"),
                            amp=amp, amp_dtype=amp_dtype)


@pytest.mark.parametrize("amp", [False, True])
def test_the_whole_step_is_one_graph(amp):
    """Student forward, DearKD loss and the teacher it runs trace into one graph, in both stages."""
    import torch._dynamo

    step = _step(amp)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for stage in (1, 2):
        step.criterion.set_stage(stage)
        explanation = torch._dynamo.explain(step._forward_loss)(x, y)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_alignment_op_receives_the_autocast_dtype(monkeypatch):
    seen = []
    real = reference.feature_align_loss

    def spy(tokens, weight, bias, target):
        seen.append((tokens.dtype, weight.dtype, bias.dtype, target.dtype))
        return real(tokens, weight, bias, target)

    monkeypatch.setattr(reference, "feature_align_loss", spy)
    t = torch.randn(2, 16, 8, requires_grad=True)
    w, b = torch.randn(5, 8, requires_grad=True), torch.randn(5, requires_grad=True)
    target = torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.feature_align_loss(t, w, b, target, backend="torch")
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)] and loss.dtype == torch.float32
    loss.backward()
    assert t.grad.dtype == torch.float32 and w.grad is not None  # the cast is differentiable back to fp32
    ops.feature_align_loss(t, w, b, target, backend="torch")
    assert seen[-1] == (torch.float32,) * 4  # no autocast: as given


def test_no_host_sync_inside_the_epoch(monkeypatch):
    """Without a progress bar the loop never waits for the device: no .item(), .cpu(), .tolist(), bool() of a
    tensor or torch.cuda.synchronize() in the epoch (outside the CPU optimizer's own step); only the epoch
    means are read, with one .item() each at the end."""
    step = _step()
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(5)]
    calls, inside_optimizer = [], []
    real_step = step.optimizer.step

    def counted(name, real):
        def wrapper(*a, **k):
            if not inside_optimizer:
                calls.append(name)
            return real(*a, **k)
        return wrapper

    for name in ("item", "cpu", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))

    def optimizer_step(*a, **k):  # CPU AdamW reads its step counters; the fused CUDA AdamW does not
        inside_optimizer.append(1)
        try:
            return real_step(*a, **k)
        finally:
            inside_optimizer.pop()

    monkeypatch.setattr(step.optimizer, "step", optimizer_step)
    stats = engine.train_one_epoch(step, loader, progress=False)
    # at the end only: one .item() per averaged term, one for the sample count, one for "skipped_steps"
    assert calls == ["item"] * len(stats) and stats["skipped_steps"] == 0


def test_bn_metadata_is_built_once_per_set_of_layers():
    """The fused paths' per-channel layer ids are built once per set of shapes (kernels/glue.py), not per call."""
    from dearkd_fast.kernels import glue
    from dearkd_fast.testing import require_native

    require_native()
    xs = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    rms, rvs = [torch.zeros(3), torch.zeros(5)], [torch.ones(3), torch.ones(5)]
    glue.layer_metadata.cache_clear()
    for _ in range(3):
        ops.bn_stat_losses(xs, rms, rvs, backend="native")
    info = glue.layer_metadata.cache_info()
    assert info.misses == 1 and info.hits >= 2


def test_fp16_step_uses_a_gradient_scaler():
    step = _step(amp=True, amp_dtype=torch.float16)
    assert step.scaler is not None and _step(amp=True).scaler is None  # bf16 needs none
    before = [p.detach().clone() for p in step.model.parameters()]
    for _ in range(3):
        loss = step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss) and step.scaler.get_scale() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, step.model.parameters()))


@pytest.mark.slow
def test_teacher_offloaded_in_stage_2(tmp_path, monkeypatch):
    from dearkd_fast.models.teacher import Teacher

    offloads = []
    real = Teacher.offload
    monkeypatch.setattr(Teacher, "offload", lambda self: offloads.append(1) or real(self))
    out = tmp_path / "o"
    assert train.main(QUICK + ["--epochs", "2", "--stage1-epochs", "1", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in s["epochs"]] == [1, 2] and s["epochs"][1]["teacher_calls"] == 0 and offloads


@pytest.mark.slow
def test_fp16_run_keeps_the_scaler_state(tmp_path):
    out = tmp_path / "o"
    assert train.main(["--data-fraction", "0.05", "--batch-size", "16", "--epochs", "1", "--stage1-epochs", "0",
                       "--workers", "0", "--no-progress", "--amp", "--amp-dtype", "float16", "--output", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0
