"""The fused backends against the float64 reference: Triton (under TRITON_INTERPRET=1 on the CPU) and the
native C++ ops (CPU tensors). Every test runs once per backend."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dearkd_fast import ops, reference
from dearkd_fast.testing import require_native

TRITON_OK = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
BACKENDS = ["triton", "native"]


def _backend_or_skip(name: str) -> str:
    """The backend under test, if it runs here: Triton skips without CUDA or the interpreter; "native" skips
    only where it cannot be built, and fails when it is buildable here but not built."""
    if name == "triton" and not TRITON_OK:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (the README's test command sets it)")
    if name == "native":
        require_native()
    return name


@pytest.fixture(params=BACKENDS)
def backend(request):
    return _backend_or_skip(request.param)


def device_of(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"

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


def align_inputs(B, h, w, D, C, dtype, *, channels_last=False, bias=True, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, h * w, D, generator=g)
    weight = torch.randn(C, D, generator=g) / D**0.5
    b = torch.randn(C, generator=g) if bias else None
    target = torch.randn(B, C, h, w, generator=g)
    if channels_last:
        target = target.to(memory_format=torch.channels_last)
    return tuple(None if t is None else t.to(dev, dtype) for t in (tokens, weight, b, target))


def check_align(backend, tokens, weight, bias, target, tol, strided=False):
    leaf, tok = strided_leaf(tokens, strided)
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss = ops.feature_align_loss(tok, w, b, target, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in (tokens, weight, bias)]
    ref = reference.feature_align_loss(*ref_in, target.double())
    ref.backward()
    assert rel(loss, ref) < tol
    if strided:  # the prefix rows of the sequence get a zero gradient
        assert torch.equal(leaf.grad[:, :2], torch.zeros_like(leaf.grad[:, :2]))
    got = [leaf.grad[:, 2:] if strided else leaf.grad, w.grad] + ([] if b is None else [b.grad])
    for g, r in zip(got, ref_in):
        assert g.dtype == tokens.dtype and torch.isfinite(g).all()
        assert rel(g, r.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided_tokens", "channels_last"])
def test_feature_align_odd_shapes(backend, dtype, layout):
    # N = 49, D = 65, C = 37, B = 3: none a multiple of any block (odd D and C pad the AMX operands);
    # M = 147 spans three Triton row tiles
    args = align_inputs(3, 7, 7, 65, 37, dtype, channels_last=layout == "channels_last", dev=device_of(backend))
    check_align(backend, *args, TOL[dtype], strided=layout == "strided_tokens")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_align_many_channel_tiles_and_rect_grid(backend, bias, dtype):
    # C = 70 spans two channel tiles (two 64-column AMX blocks); a 3 x 5 grid checks the (n // w, n % w) mapping
    check_align(backend, *align_inputs(2, 3, 5, 20, 70, dtype, bias=bias, channels_last=True, dev=device_of(backend)),
                TOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True])
def test_feature_align_many_row_tiles(backend, channels_last):
    # N = 300 spans two native row tiles of one image (256 + 44 rows: an even and an even tail), B = 2
    check_align(backend, *align_inputs(2, 15, 20, 24, 18, torch.bfloat16, channels_last=channels_last,
                                       dev=device_of(backend)), TOL[torch.bfloat16], strided=True)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), D=st.integers(1, 40), C=st.integers(1, 40),
       strided=st.booleans(), channels_last=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend_name", BACKENDS)  # hypothesis drives it: the fixture's rule by hand
def test_feature_align_property(backend_name, B, h, w, D, C, strided, channels_last, bias, seed):
    backend = _backend_or_skip(backend_name)
    check_align(backend, *align_inputs(B, h, w, D, C, torch.float32, channels_last=channels_last, bias=bias, seed=seed,
                                       dev=device_of(backend)), TOL[torch.float32], strided=strided)


def bn_inputs(B, C, H, W, dtype, *, channels_last=False, offset=0.0, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 1.5 + offset
    rm = torch.randn(C, generator=g) + offset
    rv = torch.rand(C, generator=g) * 3
    x = x.to(dev, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, rm.to(dev), rv.to(dev)


def check_bn(backend, x, rm, rv, tol):
    xl = x.detach().clone().requires_grad_()
    loss = ops.bn_stat_loss(xl, rm, rv, backend=backend)
    loss.backward()
    xd = x.detach().double().requires_grad_()
    ref = reference.bn_stat_loss(xd, rm.double(), rv.double())
    ref.backward()
    assert loss.dtype == torch.float32 and rel(loss, ref) < tol
    assert xl.grad.stride() == x.stride() and xl.grad.dtype == x.dtype  # written in x's layout, no copy
    assert rel(xl.grad, xd.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stat_odd_shapes(backend, dtype, channels_last):
    check_bn(backend, *bn_inputs(3, 37, 5, 7, dtype, channels_last=channels_last, dev=device_of(backend)), TOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stat_many_channel_blocks_and_long_rows(backend, channels_last):
    # C = 150 spans two full 64-channel register blocks and a tail; B*H*W = 1200 rows span several
    # 256-row blocks of the native sums (fp32 within a block, double across)
    check_bn(backend, *bn_inputs(3, 150, 20, 20, torch.bfloat16, channels_last=channels_last, offset=3.0,
                                 dev=device_of(backend)), TOL[torch.bfloat16])


def test_bn_stat_strided_input(backend):
    # a batch slice of a channels_last tensor: not dense, so the kernels read it through its strides or a copy
    x, rm, rv = bn_inputs(6, 9, 5, 4, torch.float32, channels_last=True, dev=device_of(backend))
    xs = x[::2]
    xl = xs.detach().clone(memory_format=torch.preserve_format)
    leaf = x.detach().clone(memory_format=torch.channels_last).requires_grad_()
    loss = ops.bn_stat_loss(leaf[::2], rm, rv, backend=backend)
    loss.backward()
    xd = xl.double().requires_grad_()
    ref = reference.bn_stat_loss(xd, rm.double(), rv.double())
    ref.backward()
    assert rel(loss, ref) < 1e-4 and rel(leaf.grad[::2], xd.grad) < 1e-4
    assert leaf.grad[1::2].abs().sum() == 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_stat_large_offset_keeps_variance(backend, dtype, channels_last):
    # x = 1e3 + noise: naive fp32 E[x^2] - E[x]^2 would lose the variance; shifted sums do not
    check_bn(backend, *bn_inputs(4, 9, 6, 6, dtype, channels_last=channels_last, offset=1e3, dev=device_of(backend)),
             TOL[dtype])


def _moments(backend):
    if backend == "native":
        from dearkd_fast.kernels.native_ops import bn_moments
    else:
        from dearkd_fast.kernels.bn_stat import bn_moments
    return bn_moments


def test_bn_stat_zero_norm_gives_zero_gradient(backend):
    x = torch.randn(2, 5, 4, 4, device=device_of(backend), requires_grad=True)
    mean, var = (t.detach() for t in _moments(backend)([x.detach()]))
    loss = ops.bn_stat_loss(x, mean, var, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    # only the mean term at zero: the variance term still pulls, and nothing is NaN
    x.grad = None
    ops.bn_stat_loss(x, mean, var + 1, backend=backend).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bn_stat_losses_grouped_matches_each_layer(backend):
    shapes = [(2, 3, 8, 8, False), (2, 17, 4, 4, True), (2, 6, 1, 1, False), (2, 5, 3, 2, True)]
    xs, rms, rvs = [], [], []
    for i, (B, C, H, W, cl) in enumerate(shapes):
        x, rm, rv = bn_inputs(B, C, H, W, torch.float32, channels_last=cl, seed=i, dev=device_of(backend))
        xs.append(x.requires_grad_())
        rms.append(rm)
        rvs.append(rv)
    got = ops.bn_stat_losses(xs, rms, rvs, backend=backend)
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
@pytest.mark.parametrize("backend_name", BACKENDS)  # hypothesis drives it: the fixture's rule by hand
def test_bn_stat_property(backend_name, B, C, H, W, channels_last, seed):
    backend = _backend_or_skip(backend_name)
    if B * H * W == 1:
        return  # a single sample per channel has zero variance and a degenerate gradient direction
    check_bn(backend, *bn_inputs(B, C, H, W, torch.float32, channels_last=channels_last, seed=seed,
                                 dev=device_of(backend)), 1e-4)


@pytest.mark.slow
def test_compile_fullgraph_custom_ops(backend):
    """The custom ops trace under torch.compile(fullgraph=True) and give the eager result."""
    dev = device_of(backend)
    tokens, weight, bias, target = align_inputs(2, 3, 3, 16, 8, torch.float32, dev=dev)
    x, rm, rv = bn_inputs(2, 4, 3, 3, torch.float32, dev=dev)

    def f(tokens, weight, bias, target, x):
        return (ops.feature_align_loss(tokens, weight, bias, target, backend=backend)
                + ops.bn_stat_loss(x, rm, rv, backend=backend))

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


def test_feature_align_under_autocast_as_training_feeds_it(backend):
    """fp32 strided tokens (a residual stream) and fp32 weights under bf16 autocast: the products see the
    bf16-rounded operands (native rounds each token tile as it stages it, Triton gets a cast copy), the
    gradients come back in fp32."""
    dev = device_of(backend)
    tokens, weight, bias, target = align_inputs(2, 5, 6, 24, 20, torch.float32, channels_last=True, dev=dev)
    target = target.to(torch.bfloat16)
    leaf, tok = strided_leaf(tokens, True)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = ops.feature_align_loss(tok, w, b, target, backend=backend)
    loss.backward()
    ref_in = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (tokens, weight, bias)]
    ref = reference.feature_align_loss(*ref_in, target.double())
    ref.backward()
    assert rel(loss, ref) < 1e-5  # the same rounded operands, fp32 accumulation
    for g, r in zip((leaf.grad[:, 2:], w.grad, b.grad), ref_in):
        assert g.dtype == torch.float32 and rel(g, r.grad) < TOL[torch.bfloat16]


def test_feature_align_tokens_in_the_middle_of_a_sequence(backend):
    """Tokens x[:, 1:-1] (rows after them too): not a prefix slice, so no backend may read or write past them."""
    dev = device_of(backend)
    tokens, weight, bias, target = align_inputs(2, 3, 4, 16, 6, torch.float32, dev=dev)
    x = torch.randn(2, 14, 16, device=dev)
    x[:, 1:13] = tokens
    x.requires_grad_()
    loss = ops.feature_align_loss(x[:, 1:-1], weight, bias, target, backend=backend)
    loss.backward()
    ref_t = tokens.double().requires_grad_()
    ref = reference.feature_align_loss(ref_t, weight.double(), bias.double(), target.double())
    ref.backward()
    assert rel(loss, ref) < 1e-5 and rel(x.grad[:, 1:-1], ref_t.grad) < 1e-5
    assert x.grad[:, 0].abs().sum() == 0 and x.grad[:, -1].abs().sum() == 0


def test_feature_align_zero_upstream_gradient(backend):
    """A loss weighted by 0 (beta = 0, say): every gradient is exactly zero, none NaN (the native backward folds
    the upstream scale into its products unless it is zero)."""
    dev = device_of(backend)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tokens, weight, bias, target = align_inputs(2, 3, 3, 10, 5, dtype, dev=dev)
        leaf, tok = strided_leaf(tokens, True)
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        (0.0 * ops.feature_align_loss(tok, w, b, target, backend=backend)).backward()
        for g in (leaf.grad, w.grad, b.grad):
            assert torch.equal(g, torch.zeros_like(g))
