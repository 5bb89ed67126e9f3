"""DearKDTask, DearKD as a timm training task: the trainer's loss in both stages, and a loop written the way timm's
train.py drives a task (compile, EMA, timm's CheckpointSaver, resume_task_checkpoint) through a stage switch."""
import copy

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver

from dearkd_fast import DearKDTask, train
from dearkd_fast.config import TrainConfig
from dearkd_fast.errors import InputError
from dearkd_fast.models.teacher import save_teacher
from dearkd_fast.testing import make_teacher

MODEL = "dearkd_nano_patch4_32"


def _batch(seed=0, n=6, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("flags", [{}, {"distillation_type": "soft", "tau": 2.0, "alpha": 0.3, "beta": 0.5,
                                        "align_standardize": True}])
def test_task_loss_is_the_trainers_in_both_stages(flags):
    torch.manual_seed(0)
    teacher = make_teacher(5)
    cfg = TrainConfig(model=MODEL, **flags)
    ours = train.build_student(cfg, 5, teacher, steps_per_epoch=1, device=torch.device("cpu"))
    task = DearKDTask(copy.deepcopy(ours.model), teacher, stage1_epochs=1, alpha=cfg.alpha, beta=cfg.beta,
                      tau=cfg.tau, distillation_type=cfg.distillation_type, standardize_target=cfg.align_standardize)
    assert {n for n, _ in task.get_trainable_module().named_parameters() if n.startswith("align_proj")}  # trainable
    x, y = _batch()
    for epoch, stage in ((0, 1), (1, 2)):
        ours.criterion.set_stage(stage)
        task.set_epoch(epoch)
        expected = ours.criterion(x, ours.model(x), y)
        calls = teacher.calls
        result = task(x, y)
        assert task.stage == stage and torch.equal(result["loss"], expected)
        assert set(result) == {"loss", "output"} | set(ours.criterion.last_terms) - {"loss"}
        assert result["output"].shape == (6, 5)
        assert (teacher.calls - calls) == (1 if stage == 1 else 0)  # stage 2 never runs the teacher
        assert ("align" in result) == (stage == 1) and ("ce_dist" in result) == (stage == 2)


def test_task_refuses_a_student_without_alignment():
    with pytest.raises(InputError, match="DearKD student"):
        DearKDTask(timm.create_model("cifar_resnet8", num_classes=5), make_teacher(5), stage1_epochs=1)


def _timm_loop(task, optimizer, saver, epochs, batches, start=0):
    """The loop of timm's train.py, reduced: per epoch set the stage, train, update EMA, validate, checkpoint."""
    for epoch in range(start, epochs):
        task.set_epoch(epoch)
        task.train()
        for i, (x, y) in enumerate(batches):
            result = task(x, y)
            optimizer.zero_grad()
            result["loss"].backward()
            optimizer.step()
            task.update_ema(step=epoch * len(batches) + i)
        task.eval()
        with torch.no_grad():
            x, y = batches[0]
            top1 = (task.get_eval_model()(x).argmax(-1) == y).float().mean().item() * 100
        saver.save_checkpoint(epoch, metric=top1)


@pytest.mark.slow
def test_a_timm_style_loop_compiles_ema_checkpoints_and_resumes_through_the_stage_switch(tmp_path):
    teacher = make_teacher(5)
    path = str(tmp_path / "teacher.pt")
    save_teacher(teacher.model, teacher.spec, path)
    batches = [_batch(i) for i in range(2)]

    def build(ckpt_dir):
        ckpt_dir.mkdir(exist_ok=True)
        torch.manual_seed(1)
        task = DearKDTask(timm.create_model(MODEL, num_classes=5), path, stage1_epochs=1)
        task.setup_ema(decay=0.5)
        task.compile()
        opt = create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-3)
        saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=opt, task=task,
                                checkpoint_dir=str(ckpt_dir), recovery_dir=str(ckpt_dir), max_history=3)
        return task, opt, saver

    whole, opt, saver = build(tmp_path / "whole")
    _timm_loop(whole, opt, saver, 3, batches)
    assert whole.stage == 2
    # a second run stops after epoch 1 (stage 1), then a fresh process resumes it with timm's helpers
    part, opt, saver = build(tmp_path / "part")
    _timm_loop(part, opt, saver, 1, batches)
    ckpt = str(tmp_path / "part" / "checkpoint-0.pth.tar")
    resumed, opt, saver = build(tmp_path / "part")
    start = resume_task_checkpoint(resumed, ckpt, opt)
    load_task_ema_checkpoint(resumed, ckpt)
    assert start == 1 and resumed.epoch == 0
    sd = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("align_proj") for k in sd["state_dict"]) and sd["task_state"]["stage1_epochs"] == 1
    _timm_loop(resumed, opt, saver, 3, batches, start=start)
    assert resumed.stage == 2
    for a, b in ((whole.get_trainable_module(), resumed.get_trainable_module()),
                 (whole.get_trainable_module(ema=True), resumed.get_trainable_module(ema=True))):
        sa, sb = timm.utils.unwrap_model(a).state_dict(), timm.utils.unwrap_model(b).state_dict()
        assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_readme_task_snippet_runs(tmp_path):
    """The README's DearKDTask lines, executed as written (a teacher.pt, a one-batch loader and two epochs filled in;
    compile is left to the loop test above)."""
    import os
    import re

    teacher = make_teacher(10)
    save_teacher(teacher.model, teacher.spec, str(tmp_path / "teacher.pt"))
    doc = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, re.S) if "DearKDTask(" in c)
    code = (code.replace("runs/x/teacher.pt", str(tmp_path / "teacher.pt")).replace("range(300)", "range(2)")
            .replace("stage1_epochs=200", "stage1_epochs=1").replace("task.compile()", "pass"))
    x, y = _batch(n=4, classes=10)
    scope = {"timm": timm, "loader": [(x, y)]}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["task"].stage == 2 and torch.isfinite(scope["result"]["loss"]) and "ce_dist" in scope["result"]
