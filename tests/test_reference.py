"""The reference losses against hand-written float64 formulas (NumPy loops, not torch ops)."""
import numpy as np
import pytest
import torch

from dearkd_fast import reference


def np_align(T, W, b, F):
    """mean over (b, n, c) of (sum_d T[b,n,d] W[c,d] + b[c] - F[b, c, n // w, n % w])^2, in float64."""
    T, W, F = (np.asarray(a, dtype=np.float64) for a in (T, W, F))
    B, N, D = T.shape
    C, w = F.shape[1], F.shape[3]
    total = 0.0
    for bi in range(B):
        for n in range(N):
            for c in range(C):
                p = float(np.dot(T[bi, n], W[c])) + (0.0 if b is None else float(b[c]))
                total += (p - F[bi, c, n // w, n % w]) ** 2
    return total / (B * N * C)


def np_bn(x, rm, rv):
    x = np.asarray(x, dtype=np.float64)
    B, C, H, W = x.shape
    loss_m = loss_v = 0.0
    for c in range(C):
        vals = x[:, c].reshape(-1)
        m = vals.sum() / vals.size
        v = ((vals - m) ** 2).sum() / vals.size
        loss_m += (m - float(rm[c])) ** 2
        loss_v += (v - float(rv[c])) ** 2
    return np.sqrt(loss_m) + np.sqrt(loss_v)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_tokens"])
def test_feature_align_matches_loops(bias, layout):
    g = torch.Generator().manual_seed(3)
    B, h, w, D, C = 2, 3, 5, 7, 6
    N = h * w
    tokens = torch.randn(B, N + 2, D, generator=g, dtype=torch.float64)[:, 2:] if layout == "strided_tokens" \
        else torch.randn(B, N, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    F = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        F = F.to(memory_format=torch.channels_last)
    got = reference.feature_align_loss(tokens, W, b, F)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(got.item() - np_align(tokens.numpy(), W.numpy(), None if b is None else b.numpy(), F.numpy())) < 1e-10


def test_feature_align_low_precision_accumulates_fp32():
    g = torch.Generator().manual_seed(4)
    t, W, F = torch.randn(3, 49, 65, generator=g), torch.randn(37, 65, generator=g), torch.randn(3, 37, 7, 7, generator=g)
    got = reference.feature_align_loss(t.bfloat16(), W.bfloat16(), None, F.bfloat16())
    assert got.dtype == torch.float32
    want = np_align(t.bfloat16().double().numpy(), W.bfloat16().double().numpy(), None, F.bfloat16().double().numpy())
    assert abs(got.item() - want) / want < 1e-5


@pytest.mark.parametrize("bad", ["D", "C", "N", "B", "bias"])
def test_feature_align_shape_errors(bad):
    t, W, b, F = torch.randn(2, 6, 4), torch.randn(5, 4), torch.randn(5), torch.randn(2, 5, 2, 3)
    if bad == "D":
        W = torch.randn(5, 3)
    elif bad == "C":
        F = torch.randn(2, 4, 2, 3)
    elif bad == "N":
        F = torch.randn(2, 5, 2, 2)
    elif bad == "B":
        F = torch.randn(3, 5, 2, 3)
    else:
        b = torch.randn(4)
    with pytest.raises(ValueError, match="feature_align_loss"):
        reference.feature_align_loss(t, W, b, F)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_bn_stat_matches_loops(channels_last, offset):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 7, 9, generator=g, dtype=torch.float64) * 2 + offset
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rm, rv = torch.randn(5, generator=g, dtype=torch.float64) + offset, torch.rand(5, generator=g, dtype=torch.float64) * 4
    got = reference.bn_stat_loss(x, rm, rv)
    want = np_bn(x.numpy(), rm.numpy(), rv.numpy())
    assert abs(got.item() - want) < 1e-9 * max(1.0, want)


def test_bn_stat_zero_norm_gradient_is_zero_not_nan():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # the reference's own arithmetic, so both differences are exactly zero
        rm = x.mean(dim=(0, 2, 3))
        rv = (x - rm.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
    loss = reference.bn_stat_loss(x, rm, rv)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_kd_terms():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    hard = reference.kd_hard(s, t)
    want = -np.mean([s[i].log_softmax(0)[t[i].argmax()].item() for i in range(4)])
    assert abs(hard.item() - want) < 1e-6
    tau = 3.0
    ps, pt = (s / tau).softmax(1).numpy(), (t / tau).softmax(1).numpy()
    want_soft = tau * tau * np.sum(pt * (np.log(pt) - np.log(ps))) / 4
    assert abs(reference.kd_soft(s, t, tau).item() - want_soft) < 1e-5


def test_tv_losses():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    a = x.numpy()
    diffs = [a[:, :, :, :-1] - a[:, :, :, 1:], a[:, :, :-1, :] - a[:, :, 1:, :],
             a[:, :, 1:, :-1] - a[:, :, :-1, 1:], a[:, :, :-1, :-1] - a[:, :, 1:, 1:]]
    tv2, tv1 = reference.tv_losses(x)
    assert abs(tv2.item() - sum(np.sqrt((d**2).sum()) for d in diffs)) < 1e-9
    assert abs(tv1.item() - sum(np.abs(d).mean() for d in diffs)) < 1e-12  # the public code's scale


def np_bpid(feats, logits, labels, margin, lam):
    """Hand loops in float64: -mean_{i != j, y_i = y_j} ||z_i - z_j|| + lam * mean_i relu(m - gap_i)."""
    f = np.asarray(feats, dtype=np.float64)
    z = f / np.linalg.norm(f, axis=1, keepdims=True)
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(len(z)) if i != j and labels[i] == labels[j]]
    spread = np.mean(dists) if dists else 0.0
    gaps = []
    for i, row in enumerate(np.asarray(logits, dtype=np.float64)):
        others = [row[k] for k in range(len(row)) if k != labels[i]]
        gaps.append(max(0.0, margin - (row[labels[i]] - max(others))))
    return -spread + lam * np.mean(gaps)


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 1, 2], [0, 1, 2, 3, 4, 5], [2, 2, 2, 2, 2, 2]])
def test_bpid_matches_loops(labels):
    """Including a class with a single sample (2 in the first case) and a batch with no same-class pair."""
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    got = reference.bpid_loss(feats, logits, y, margin=1.5, lam=0.7)
    want = np_bpid(feats.detach().numpy(), logits.detach().numpy(), labels, 1.5, 0.7)
    assert abs(got.item() - want) < 1e-10
    got.backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(logits.grad).all()
