"""Triton kernels (run under TRITON_INTERPRET=1 on the CPU) against the float64 reference."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dearkd_fast import ops, reference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (the README's test command sets it)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative tolerance of the loss and of each gradient, per input dtype
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def strided_leaf(t, strided):
    """A leaf holding t; with strided=True, t is the [:, 2:] view of a leaf with two extra tokens (like a ViT's
    patch tokens after the cls/dist tokens). Returns (leaf, tokens view)."""
    if not strided:
        leaf = t.detach().clone().requires_grad_()
        return leaf, leaf
    leaf = torch.zeros(t.shape[0], t.shape[1] + 2, t.shape[2], dtype=t.dtype, device=t.device)
    leaf[:, 2:] = t.detach()
    leaf.requires_grad_()
    view = leaf[:, 2:]
    assert not view.is_contiguous() or t.shape[0] == 1  # one batch row: the view is contiguous anyway
    return leaf, view


def align_inputs(B, h, w, D, C, dtype, *, channels_last=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, h * w, D, generator=g)
    weight = torch.randn(C, D, generator=g) / D**0.5
    b = torch.randn(C, generator=g) if bias else None
    target = torch.randn(B, C, h, w, generator=g)
    if channels_last:
        target = target.to(memory_format=torch.channels_last)
    return tuple(None if t is None else t.to(DEV, dtype) for t in (tokens, weight, b, target))


def check_align(tokens, weight, bias, target, tol, strided=False):
    leaf, tok = strided_leaf(tokens, strided)
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss = ops.feature_align_loss(tok, w, b, target, backend="triton")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in (tokens, weight, bias)]
    ref = reference.feature_align_loss(*ref_in, target.double())
    ref.backward()
    assert rel(loss, ref) < tol
    got = [leaf.grad[:, 2:] if strided else leaf.grad, w.grad] + ([] if b is None else [b.grad])
    for g, r in zip(got, ref_in):
        assert g.dtype == tokens.dtype and torch.isfinite(g).all()
        assert rel(g, r.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided_tokens", "channels_last"])
def test_feature_align_odd_shapes(dtype, layout):
    # N = 49, D = 65, C = 37, B = 3: none a multiple of any block; M = 147 spans three row tiles
    args = align_inputs(3, 7, 7, 65, 37, dtype, channels_last=layout == "channels_last")
    check_align(*args, TOL[dtype], strided=layout == "strided_tokens")


@pytest.mark.parametrize("bias", [True, False])
def test_feature_align_many_channel_tiles_and_rect_grid(bias):
    # C = 70 spans two channel tiles; a 3 x 5 grid checks the (n // w, n % w) mapping
    check_align(*align_inputs(2, 3, 5, 20, 70, torch.float32, bias=bias, channels_last=True), TOL[torch.float32])


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), D=st.integers(1, 40), C=st.integers(1, 40),
       strided=st.booleans(), channels_last=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_feature_align_property(B, h, w, D, C, strided, channels_last, bias, seed):
    check_align(*align_inputs(B, h, w, D, C, torch.float32, channels_last=channels_last, bias=bias, seed=seed),
                TOL[torch.float32], strided=strided)


def bn_inputs(B, C, H, W, dtype, *, channels_last=False, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 1.5 + offset
    rm = torch.randn(C, generator=g) + offset
    rv = torch.rand(C, generator=g) * 3
    x = x.to(DEV, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, rm.to(DEV), rv.to(DEV)


def check_bn(x, rm, rv, tol):
    xl = x.detach().clone().requires_grad_()
    loss = ops.bn_stat_loss(xl, rm, rv, backend="triton")
    loss.backward()
    xd = x.detach().double().requires_grad_()
    ref = reference.bn_stat_loss(xd, rm.double(), rv.double())
    ref.backward()
    assert loss.dtype == torch.float32 and rel(loss, ref) < tol
    assert xl.grad.stride() == x.stride() and xl.grad.dtype == x.dtype  # written in x's layout, no copy
    assert rel(xl.grad, xd.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stat_odd_shapes(dtype, channels_last):
    check_bn(*bn_inputs(3, 37, 5, 7, dtype, channels_last=channels_last), TOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_stat_large_offset_keeps_variance(dtype, channels_last):
    # x = 1e3 + noise: naive fp32 E[x^2] - E[x]^2 would lose the variance; shifted sums do not
    check_bn(*bn_inputs(4, 9, 6, 6, dtype, channels_last=channels_last, offset=1e3), TOL[dtype])


def test_bn_stat_zero_norm_gives_zero_gradient():
    x = torch.randn(2, 5, 4, 4, device=DEV, requires_grad=True)
    from dearkd_fast.kernels.bn_stat import bn_moments

    mean, var = (t.detach() for t in bn_moments([x.detach()]))
    loss = ops.bn_stat_loss(x, mean, var, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    # only the mean term at zero: the variance term still pulls, and nothing is NaN
    x.grad = None
    ops.bn_stat_loss(x, mean, var + 1, backend="triton").backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bn_stat_losses_grouped_matches_each_layer():
    shapes = [(2, 3, 8, 8, False), (2, 17, 4, 4, True), (2, 6, 1, 1, False), (2, 5, 3, 2, True)]
    xs, rms, rvs = [], [], []
    for i, (B, C, H, W, cl) in enumerate(shapes):
        x, rm, rv = bn_inputs(B, C, H, W, torch.float32, channels_last=cl, seed=i)
        xs.append(x.requires_grad_())
        rms.append(rm)
        rvs.append(rv)
    got = ops.bn_stat_losses(xs, rms, rvs, backend="triton")
    got.sum().backward()
    xd = [x.detach().double().requires_grad_() for x in xs]
    want = reference.bn_stat_losses(xd, [r.double() for r in rms], [r.double() for r in rvs])
    want.sum().backward()
    assert got.shape == (4,) and rel(got, want) < 1e-5
    for a, b in zip(xs, xd):
        assert rel(a.grad, b.grad) < 1e-5


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 4), C=st.integers(1, 40), H=st.integers(1, 7), W=st.integers(1, 7),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_bn_stat_property(B, C, H, W, channels_last, seed):
    if B * H * W == 1:
        return  # a single sample per channel has zero variance and a degenerate gradient direction
    check_bn(*bn_inputs(B, C, H, W, torch.float32, channels_last=channels_last, seed=seed), 1e-4)


@pytest.mark.slow
def test_compile_fullgraph_custom_ops():
    """The custom ops trace under torch.compile(fullgraph=True) and give the eager result."""
    tokens, weight, bias, target = align_inputs(2, 3, 3, 16, 8, torch.float32)
    x, rm, rv = bn_inputs(2, 4, 3, 3, torch.float32)

    def f(tokens, weight, bias, target, x):
        return (ops.feature_align_loss(tokens, weight, bias, target, backend="triton")
                + ops.bn_stat_loss(x, rm, rv, backend="triton"))

    eager = f(tokens, weight, bias, target, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(tokens, weight, bias, target, x)
    torch.testing.assert_close(compiled, eager)
    w = weight.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(tokens, w, bias, target, x).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.slow
def test_compile_fullgraph_torch_backend():
    tokens, weight, bias, target = align_inputs(2, 3, 3, 16, 8, torch.float32)
    x, rm, rv = bn_inputs(2, 4, 3, 3, torch.float32)

    def f(tokens, weight, bias, target, x):
        return (ops.feature_align_loss(tokens, weight, bias, target, backend="torch")
                + ops.bn_stat_loss(x, rm, rv, backend="torch"))

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(tokens, weight, bias, target, x),
                               f(tokens, weight, bias, target, x))
