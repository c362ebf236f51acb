"""The group-norm form of instance norm: same outputs, same state dicts, swapped inside MONAI's networks."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import UNETR, UNet
from torch import nn

from ahm.models.norm import GroupInstanceNorm, fast_instance_norms


@pytest.mark.parametrize("affine", [False, True])
def test_matches_instance_norm(affine: bool) -> None:
    torch.manual_seed(0)
    ref = nn.InstanceNorm2d(6, eps=1e-5, affine=affine)
    if affine:
        nn.init.normal_(ref.weight)
        nn.init.normal_(ref.bias)
    fast = GroupInstanceNorm(ref)
    x = torch.randn(3, 6, 9, 11) * 4 + 2
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    assert set(fast.state_dict()) == set(ref.state_dict())


def test_keeps_running_statistics_norms() -> None:
    seq = nn.Sequential(nn.InstanceNorm2d(4, track_running_stats=True), nn.InstanceNorm2d(4), nn.BatchNorm2d(4))
    assert fast_instance_norms(seq) == 1
    assert isinstance(seq[0], nn.InstanceNorm2d) and isinstance(seq[1], GroupInstanceNorm)
    assert isinstance(seq[2], nn.BatchNorm2d)


@pytest.mark.parametrize("kind", ["unet", "unetr"])
def test_monai_networks_give_the_same_outputs_and_keys(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "unet":
        net = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                   num_res_units=1)
    else:
        net = UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=4, hidden_size=16, mlp_dim=32,
                    num_heads=2, norm_name="instance", spatial_dims=2)
    fast = copy.deepcopy(net)
    assert fast_instance_norms(fast) > 0
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in fast.modules())
    x = torch.randn(2, 1, 32, 32)
    net.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)
    assert list(fast.state_dict()) == list(net.state_dict())
    fast.load_state_dict(net.state_dict())
