"""Sliding-window inference: a volume larger than the window is predicted as the same network would predict it
whole, inputs no larger than the window see exactly the window, and strided networks get padded inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ahm.errors import AhmError
from ahm.eval.evaluate import predict_labels, predict_volume_labels
from ahm.eval.inference import sliding_window_predict


class Pointwise(torch.nn.Module):
    """A 1x1(x1) convolution network: exactly translation-equivariant with no border effect, so every window of
    a volume predicts each voxel as the whole volume would. `expect` refuses inputs of any other spatial shape
    (what a ViT with a fixed position table does)."""

    def __init__(self, spatial_dims: int, in_channels: int = 2, classes: int = 3, expect=None) -> None:
        super().__init__()
        conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
        self.net = torch.nn.Sequential(conv(in_channels, 8, 1), torch.nn.Tanh(), conv(8, classes, 1))
        self.expect = tuple(expect) if expect is not None else None
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        if self.expect is not None and tuple(x.shape[2:]) != self.expect:
            raise RuntimeError(f"input {tuple(x.shape[2:])}, the network only takes {self.expect}")
        return self.net(x)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_3d_volume_larger_than_window_equals_whole_volume(mode: str) -> None:
    torch.manual_seed(0)
    model = Pointwise(3, expect=(8, 8, 8)).eval()
    x = torch.randn(2, 2, 19, 13, 10)  # larger than the window on every axis, not a multiple of it
    with torch.no_grad():
        model.expect = None
        whole = model.net(x)
        model.expect = (8, 8, 8)
    out = sliding_window_predict(model, x, 8, overlap=0.5, mode=mode, sw_batch_size=3)
    assert out.shape == (2, 3, 19, 13, 10)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    assert all(s[2:] == (8, 8, 8) and s[0] <= 3 for s in model.seen)
    assert len(model.seen) > 2  # several windows, not one pass


def test_2d_image_larger_than_window_equals_whole_image() -> None:
    torch.manual_seed(1)
    model = Pointwise(2, in_channels=1, classes=2)
    x = np.random.default_rng(0).normal(size=(3, 1, 37, 50)).astype(np.float32)
    with torch.no_grad():
        whole = model.net(torch.from_numpy(x))
    out = sliding_window_predict(model, x, (16, 24), overlap=0.25, mode="constant")
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    labels = predict_labels(model, x, batch_size=2, roi_size=(16, 24), mode="constant")
    assert labels.shape == (3, 37, 50) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, whole.argmax(1).numpy())


def test_monai_unet_3d_larger_volume_matches_whole_volume_away_from_window_borders() -> None:
    """A real strided 3D UNet (batch norm in eval mode: a local operation, unlike instance norm) sees zero padding
    at a window's inner border: within its receptive field (3 voxels here) of the volume's own border, where each
    window's view equals the whole volume's, the windows agree with the whole pass."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0,
               norm="batch").eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        whole = net(x)
    # Window 16 along the first axis (its whole extent), 8 without overlap along the others: windows start at
    # 0 and 8, multiples of the stride, so the network's grid of strided samples is the same in both passes.
    out = sliding_window_predict(net, x, (16, 8, 8), overlap=0.0, mode="constant")
    assert out.shape == whole.shape
    keep = [0, 1, 2, 3, 4, 12, 13, 14, 15]
    torch.testing.assert_close(out[..., keep, :][..., keep], whole[..., keep, :][..., keep], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, whole, atol=1e-3)  # at the windows' inner borders, padding shows


def test_input_no_larger_than_window_is_padded_to_it_and_cropped_back() -> None:
    torch.manual_seed(2)
    model = Pointwise(3, in_channels=1, classes=2, expect=(8, 8, 8))
    x = torch.randn(1, 1, 5, 8, 3)
    out = sliding_window_predict(model, x, 8)
    assert model.seen == [(1, 1, 8, 8, 8)]  # one pass, on the window
    with torch.no_grad():
        padded = model.net(torch.nn.functional.pad(x, (2, 3, 0, 0, 1, 2)))  # symmetric: MONAI SpatialPad's split
    torch.testing.assert_close(out, padded[:, :, 1:6, :, 2:5])


def test_input_exactly_the_window_is_one_plain_forward_pass() -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        direct = net(x)
    assert torch.equal(sliding_window_predict(net, x, 32), direct)
    assert torch.equal(sliding_window_predict(net, x, None), direct)
    np.testing.assert_array_equal(predict_labels(net, x.numpy(), batch_size=3), direct.argmax(1).numpy())


def test_strided_network_gets_divisible_padding_and_output_is_cropped_back() -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 8), strides=(2, 2),
               num_res_units=0).eval()
    x = torch.randn(1, 1, 13, 10, 7)
    out = sliding_window_predict(net, x, None, divisible_by=4)
    assert out.shape == (1, 2, 13, 10, 7)
    with torch.no_grad():
        ref = net(torch.nn.functional.pad(x, (0, 1, 1, 1, 1, 2)))  # to 16 x 12 x 8, DivisiblePad's split
    torch.testing.assert_close(out, ref[:, :, 1:14, 1:11, 0:7])
    with pytest.raises(AhmError, match="not a multiple"):
        sliding_window_predict(net, x, (6, 8, 8), divisible_by=4)


def test_probabilities_sum_to_one_and_the_model_mode_is_restored() -> None:
    model = Pointwise(2, in_channels=1, classes=4).train()
    probs = sliding_window_predict(model, torch.randn(1, 1, 20, 9), 8, probabilities=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 20, 9))
    assert model.training


def test_refuses_bad_options() -> None:
    model = Pointwise(2, in_channels=1, classes=2)
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(AhmError, match="blend mode"):
        sliding_window_predict(model, x, 4, mode="average")
    with pytest.raises(AhmError, match="overlap"):
        sliding_window_predict(model, x, 4, overlap=1.0)
    with pytest.raises(AhmError, match="roi_size"):
        sliding_window_predict(model, x, (4, 4, 4))
    with pytest.raises(AhmError, match=r"\[N, C"):
        sliding_window_predict(model, torch.zeros(8, 8), 4)


def test_volumes_of_different_shapes_are_labelled_one_by_one() -> None:
    torch.manual_seed(3)
    model = Pointwise(3, in_channels=1, classes=3, expect=(8, 8, 8))
    volumes = [np.random.default_rng(k).normal(size=(1,) + shape).astype(np.float32)
               for k, shape in enumerate([(12, 9, 8), (5, 6, 7)])]
    labels = predict_volume_labels(model, volumes, 8, mode="constant")
    assert [lab.shape for lab in labels] == [(12, 9, 8), (5, 6, 7)]
    with torch.no_grad():
        for lab, vol in zip(labels, volumes):
            np.testing.assert_array_equal(lab, model.net(torch.from_numpy(vol)[None]).argmax(1)[0].numpy())


class Ones(torch.nn.Module):
    """Logits of exactly 1 for every class, which bfloat16 holds exactly: whatever moves the blended result away
    from 1 is the blend's own rounding. Records whether each forward pass ran under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(1.0)
        self.autocast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.conv(x)


def test_bf16_mixed_runs_the_network_under_autocast_and_blends_in_float32() -> None:
    net = Ones()
    x = torch.randn(2, 1, 20, 13)
    out = sliding_window_predict(net, x, 8, overlap=0.5, mode="gaussian", precision="bf16-mixed")
    assert out.dtype == torch.float32 and net.autocast and all(net.autocast)
    # MONAI weighting each bfloat16 window in place would leave errors of about 2e-3 here
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-6)
    whole = sliding_window_predict(net, x[..., :8, :8], 8, precision="bf16-mixed")
    assert whole.dtype == torch.float32
    net.autocast.clear()
    sliding_window_predict(net, x, 8)
    assert not any(net.autocast)  # 32-true, the default: no autocast


def test_bf16_mixed_labels_match_float32_where_the_classes_are_apart() -> None:
    torch.manual_seed(0)
    model = Pointwise(2, in_channels=1, classes=3)
    x = torch.randn(4, 1, 24, 17)
    full = sliding_window_predict(model, x, 8, overlap=0.25)
    mixed = sliding_window_predict(model, x, 8, overlap=0.25, precision="bf16-mixed")
    # bfloat16 keeps 8 significant bits: each product is off by up to 2^-9 of itself, a few 1e-3 on logits of ~1
    torch.testing.assert_close(mixed, full, rtol=0.02, atol=0.02)
    top2 = full.topk(2, dim=1).values
    apart = (top2[:, 0] - top2[:, 1]) > 0.05  # more than twice what bfloat16 can move a logit by
    assert torch.equal(mixed.argmax(1)[apart], full.argmax(1)[apart])
    labels = predict_labels(model, x.numpy(), roi_size=8, overlap=0.25, precision="bf16-mixed")
    np.testing.assert_array_equal(labels, mixed.argmax(1).numpy())


def test_precision_names_and_refusals() -> None:
    model = Pointwise(2, in_channels=1, classes=2)
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(sliding_window_predict(model, x, None, precision="32"), sliding_window_predict(model, x, None))
    with pytest.raises(AhmError, match="^--precision 16-mixed needs a GPU"):
        sliding_window_predict(model, x, None, precision="16-mixed")
    with pytest.raises(AhmError, match="^--precision bf16-true: inference runs 32-true, bf16-mixed or 16-mixed"):
        sliding_window_predict(model, x, None, precision="bf16-true")
