"""DeepInversionHook: the public hook's formula, through ops.bn_stat_loss."""
import pytest
import torch
import torch.nn as nn

from dearkd_fast import DeepInversionHook


def public_hook_formula(x, bn):
    """The public DeepInversion hook's arithmetic: mean over (0,2,3), biased variance, L2 norms."""
    C = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([C, -1]).var(1, unbiased=False)
    return torch.norm(bn.running_var.data - var, 2) + torch.norm(bn.running_mean.data - mean, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_hook_equals_public_formula(channels_last):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    hooks = [DeepInversionHook(net[1]), DeepInversionHook(net[4])]
    x = torch.randn(4, 3, 11, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    net(x)
    want = [public_hook_formula(net[0](x), net[1]), public_hook_formula(net[3](net[2](net[1](net[0](x)))), net[4])]
    for h, w in zip(hooks, want):
        torch.testing.assert_close(h.r_feature, w, rtol=1e-5, atol=1e-6)
    sum(h.r_feature for h in hooks).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for h in hooks:
        h.close()
    hooks[0].r_feature = None
    net(x)
    assert hooks[0].r_feature is None  # closed: no longer called


def test_hook_rejects_non_bn():
    with pytest.raises(ValueError, match="BatchNorm"):
        DeepInversionHook(nn.Conv2d(3, 3, 1))
