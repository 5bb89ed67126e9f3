"""ops.py: the one dispatch point."""
import pytest
import torch

from dearkd_fast import ops


def test_auto_on_cpu_tensors_picks_native_when_built_else_torch(monkeypatch):
    monkeypatch.delenv("DEARKD_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_native_importable", lambda: True)
    assert ops.resolve_backend("auto", torch.zeros(1)) == "native"
    assert ops.resolve_backend("auto", torch.zeros(1, dtype=torch.bfloat16)) == "native"
    assert ops.resolve_backend("auto", torch.zeros(1, dtype=torch.float64)) == "torch"  # native takes fp32/bf16/fp16
    assert "native" in ops.available_backends()
    monkeypatch.setattr(ops, "_native_importable", lambda: False)
    assert ops.resolve_backend("auto", torch.zeros(1)) == "torch"
    assert "torch" in ops.available_backends() and "native" not in ops.available_backends()


def test_native_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setattr(ops, "_native_importable", lambda: True)
    with pytest.raises(ops.BackendError, match="CPU tensors"):
        ops.resolve_backend("native", torch.zeros(1, device="meta"))
    with pytest.raises(ops.BackendError, match="float32, bfloat16 or float16"):
        ops.bn_stat_loss(torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.zeros(3), torch.ones(3), backend="native")
    monkeypatch.setenv("DEARKD_BACKEND", "native")
    assert ops.resolve_backend("auto", torch.zeros(1)) == "native"


def test_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DEARKD_BACKEND", "triton")
    assert ops.resolve_backend("auto", torch.zeros(1)) == "triton"
    assert "triton" in ops.available_backends()
    monkeypatch.setenv("DEARKD_BACKEND", "torch")
    assert ops.resolve_backend("auto", torch.zeros(1)) == "torch"
    monkeypatch.setenv("DEARKD_BACKEND", "bogus")
    with pytest.raises(ops.BackendError, match="bogus"):
        ops.resolve_backend("auto", torch.zeros(1))


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("DEARKD_BACKEND", "triton")
    assert ops.resolve_backend("torch", torch.zeros(1)) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; this machine has CUDA")
def test_triton_on_cpu_outside_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in ops.available_backends()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ops.BackendError, match="CUDA"):
        ops.bn_stat_loss(x, torch.zeros(3), torch.ones(3), backend="triton")
    with pytest.raises(ops.BackendError, match="CUDA"):
        ops.feature_align_loss(torch.randn(1, 4, 2), torch.randn(3, 2), None, torch.randn(1, 3, 2, 2), backend="triton")


def test_unknown_and_unbuilt_backends(monkeypatch, tmp_path):
    with pytest.raises(ops.BackendError, match="unknown backend"):
        ops.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), backend="cuda")
    monkeypatch.setattr(ops, "_native_importable", lambda: False)
    monkeypatch.setenv("DEARKD_NATIVE_DIR", str(tmp_path))  # nothing built there: the error says why
    with pytest.raises(ops.BackendError, match="backend 'native' asked for, but it .*python -m dearkd_fast.native|not found"):
        ops.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), backend="native")


def test_shape_errors_before_dispatch():
    with pytest.raises(ValueError, match="do not fit"):
        ops.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="does not fit"):
        ops.feature_align_loss(torch.randn(1, 4, 2), torch.randn(3, 2), None, torch.randn(1, 3, 2, 3))


def test_dearkd_loss_goes_through_ops(monkeypatch):
    """DearKDLoss reaches the kernels only through ops.feature_align_loss."""
    import dearkd_fast.losses as losses

    calls = []
    real = ops.feature_align_loss
    monkeypatch.setattr(losses.ops, "feature_align_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    from dearkd_fast.testing import make_student, make_teacher

    teacher = make_teacher()
    student = make_student(teacher=teacher)
    crit = losses.DearKDLoss(torch.nn.CrossEntropyLoss(), teacher, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    crit(x, student(x), torch.tensor([0, 1]))
    assert calls == [{"backend": "torch"}] * 2


def test_kernel_configs_come_from_the_committed_table_else_the_heuristic():
    """Block sizes, warps and stages: the table's entry for (op, dtype, shape class, arch), an override (how the
    GPU sweep times candidates) above it, and the op's heuristic for a key the table lacks."""
    from dearkd_fast.kernels import grid

    table = grid.config_table()
    key = grid.config_key("bn_stat", torch.bfloat16, "rows", "sm_90")
    assert key in table and any(k.startswith("feature_align|bfloat16|") for k in table)
    want = {k: v for k, v in table[key].items() if not k.startswith("_")}
    assert grid.pick_config("bn_stat", torch.bfloat16, "rows", "sm_90", lambda: {"x": 1}) == want
    assert grid.pick_config("bn_stat", torch.bfloat16, "rows", "sm_999", lambda: {"x": 1}) == {"x": 1}
    grid.OVERRIDES[key] = {"BLOCK_R": 8, "BLOCK_C": 16, "num_warps": 2, "num_stages": 1}
    try:
        assert grid.pick_config("bn_stat", torch.bfloat16, "rows", "sm_90", dict)["BLOCK_R"] == 8
    finally:
        grid.OVERRIDES.pop(key)
