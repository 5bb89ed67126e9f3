"""Hopper facts of every Triton kernel, proven without a GPU: the launches the ops would make at the benchmark
shapes, compiled ahead of time for sm_90 with the JIT's own specialisation (python -m dearkd_fast.kernels_report),
read from their PTX and ptxas -v."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one subprocess compiles every kernel (about a minute on the 2-core machine)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    run = subprocess.run([sys.executable, "-m", "dearkd_fast.kernels_report", "--arch", "sm_90",
                          "--json", str(out / "facts.json"), "--ptx-dir", str(out / "ptx")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((out / "facts.json").read_text())
    assert "| case | kernel |" in run.stdout and len(rows) >= 15
    return rows, out


def test_no_kernel_spills(facts):
    rows, _ = facts
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), [
        (r["case"], r["kernel"], r["spill_stores"], r["spill_loads"]) for r in rows if r["spill_stores"] or r["spill_loads"]]


def test_kernel_names_say_their_op(facts):
    rows, _ = facts
    for r in rows:
        op = "_bn_" if r["case"].startswith("bn-") else "_align_"
        assert op in r["kernel"], r


def test_bn_kernels_have_no_integer_division_and_vector_loads(facts):
    rows, _ = facts
    bn = [r for r in rows if r["case"].startswith("bn-")]
    assert bn and all(r["int_div_rem"] == 0 for r in bn)
    for r in bn:
        if "_finish_" in r["kernel"]:
            continue  # reads the small fp32 partials, not x
        assert r["load_bits"] == 128, r  # x's tiles as 16-byte vectors, both layouts
        if "bf16" in r["case"]:
            assert r["scalar_16bit_loads"] == 0, r  # no element-wise bf16 load of x anywhere
        if "_backward_" in r["kernel"]:
            assert r["store_bits"] == 128, r  # dx written as 16-byte vectors


def test_bn_one_layer_fills_a_132_sm_card(facts):
    rows, _ = facts
    for case in ("bn-one-layer-bf16-channels_last", "bn-one-layer-bf16-nchw"):
        moments = [r for r in rows if r["case"] == case and "_moments_" in r["kernel"]]
        assert len(moments) == 1 and moments[0]["programs"] >= 2 * 132, moments


def test_bn_all_resnet50_layers_in_one_launch_each_way(facts):
    rows, _ = facts
    r50 = [r for r in rows if r["case"] == "bn-resnet50-bf16-channels_last"]
    assert sorted(r["kernel"] for r in r50) == ["_bn_backward_kernel", "_bn_finish_kernel", "_bn_moments_kernel"]


def test_alignment_is_two_kernels_on_the_tensor_cores(facts):
    rows, _ = facts
    align = [r for r in rows if r["case"].startswith("align-")]
    assert len({r["kernel"] for r in align}) <= 2
    for r in align:
        assert r["store_bits"] >= 32
        if "_fused_" in r["kernel"]:
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r  # Hopper wgmma for bf16, fp16 and fp32 tokens (bf16 products)


def test_ptx_lands_in_tritons_cache(facts):
    _, out = facts
    names = {f for _, _, files in os.walk(out / "cache") for f in files if f.endswith(".ptx")}
    assert any("_bn_moments_kernel" in n for n in names) and any("_align_fused_kernel" in n for n in names), names
