"""MaskedUNet: the UNet pretrained as a masked-input autoencoder."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models.mae import build_mim_model, patchify
from ahm.models.unet_mim import MaskedUNet

SIZE, PATCH = 32, 8


def unet_cfg(norm_pix: bool = True) -> ModelConfig:
    return ModelConfig(
        backbone="unet",
        patch_size=PATCH,
        unet_channels=(4, 8, 16),
        unet_strides=(2, 2),
        unet_num_res_units=1,
        norm_pix=norm_pix,
    )


def tiny_unet(channels: int = 1, norm_pix: bool = True) -> MaskedUNet:
    torch.manual_seed(0)
    model = build_mim_model(unet_cfg(norm_pix), SIZE, channels)
    assert isinstance(model, MaskedUNet)
    return model


def random_mask(batch: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, 16, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(batch, 16, dtype=torch.bool).scatter(1, idx, True)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(channels: int) -> None:
    model = tiny_unet(channels)
    images = torch.randn(2, channels, SIZE, SIZE)
    out = model(images, random_mask(2, 12))
    assert out.loss.dim() == 0
    assert out.per_patch_loss.shape == (2, 16)
    assert out.prediction.shape == (2, channels, SIZE, SIZE)
    # the decoder's last feature map holds the first level's skip and up-sampled halves: 2 * channels[0]
    assert model.features(images).shape == (2, 16, 8)
    assert model.backbone == "unet" and model.grid == (4, 4)


def test_per_patch_loss_and_loss() -> None:
    model = tiny_unet()
    mask = random_mask(3, 10, seed=2)
    out = model(torch.randn(3, 1, SIZE, SIZE), mask)
    assert torch.all(out.per_patch_loss[~mask] == 0)
    assert torch.all(out.per_patch_loss[mask] > 0)
    assert torch.allclose(out.loss, out.per_patch_loss[mask].mean(), atol=1e-6)
    out.loss.backward()
    assert model.net.model[0].conv.unit0.conv.weight.grad.abs().sum() > 0
    assert model.mask_value.grad is not None


def test_masked_pixels_never_reach_the_network() -> None:
    model = tiny_unet(norm_pix=False)
    images = torch.randn(2, 1, SIZE, SIZE)
    mask = random_mask(2, 12)
    pixel_mask = model.pixel_mask(mask)
    changed = torch.where(pixel_mask, torch.randn_like(images) * 4, images)
    first, second = model(images, mask), model(changed, mask)
    # same network output on the masked patches, so the same prediction there; only the targets moved
    assert torch.allclose(
        first.prediction[pixel_mask.expand_as(images)],
        second.prediction[pixel_mask.expand_as(images)],
        atol=1e-6,
    )
    assert not torch.allclose(first.per_patch_loss, second.per_patch_loss)


def test_per_patch_loss_is_mean_over_the_patch_pixels() -> None:
    model = tiny_unet(norm_pix=False)
    images = torch.randn(1, 1, SIZE, SIZE)
    mask = random_mask(1, 6)
    out = model(images, mask)
    # the prediction holds the network's output on masked patches: recompute their error from it
    err = (patchify(out.prediction, PATCH) - patchify(images, PATCH)).pow(2).mean(-1)
    assert torch.allclose(out.per_patch_loss[mask], err[mask], atol=1e-6)


def test_export_fits_a_unet_of_the_same_layout() -> None:
    model = tiny_unet(channels=3)
    net = UNet(
        spatial_dims=2, in_channels=3, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
        norm="batch",
    )
    net.load_state_dict(model.export_encoder(), strict=True)
    meta = model.encoder_metadata()
    assert meta["backbone"] == "unet" and meta["unet_channels"] == "4,8,16" and meta["in_channels"] == "3"
    assert meta["norm"] == "batch"


def test_image_size_must_divide() -> None:
    with pytest.raises(AhmError, match="--image-size 36.*--patch-size 8"):
        build_mim_model(unet_cfg(), 36, 1)
    cfg = ModelConfig(backbone="unet", patch_size=4, unet_channels=(4, 8, 16, 32), unet_strides=(2, 2, 2))
    with pytest.raises(AhmError, match="--image-size 20 is not divisible by 8"):
        build_mim_model(cfg, 20, 1)


def test_channels_last_step_equals_the_plain_contiguous_computation() -> None:
    """The hot path (channels-last weights and input, loss from the K masked patches, no image-space prediction)
    gives the loss and gradients of the plain computation on a contiguous copy of the same UNet."""
    model = tiny_unet(channels=3)
    with torch.no_grad():
        model.mask_value.add_(0.3)
    plain = UNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                 num_res_units=1, norm="batch")
    plain.load_state_dict(model.export_encoder(), strict=True)
    exported = model.export_encoder()
    assert all(v.is_contiguous() for v in exported.values())  # safetensors needs plain layouts
    assert model.net.model[0].conv.unit0.conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, SIZE, SIZE)
    mask = random_mask(2, 9, seed=3)
    out = model(images, mask)
    out.loss.backward()
    fill = model.mask_value.detach().clone().requires_grad_(True)
    pix = model.pixel_mask(mask)
    rec = plain(torch.where(pix, fill.view(1, -1, 1, 1), images))
    target = patchify(images, PATCH)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    loss = (patchify(rec, PATCH) - target).pow(2).mean(-1)[mask].mean()
    loss.backward()
    assert torch.allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.mask_value.grad, fill.grad, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(model.net.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), name
    assert not out.prediction.requires_grad


@pytest.mark.parametrize(
    ("network", "channels", "strides", "res_units", "in_channels"),
    [
        ("unet", (4, 8, 16), (2, 2), 0, 1),
        ("unet", (4, 8, 16), (2, 2), 2, 3),
        ("basic-unet", (4, 8, 16, 32, 64), (2, 2, 2, 2), 0, 2),
    ],
)
def test_fill_gradient_without_the_input_gradient_equals_the_straightforward_one(
    network: str, channels: tuple, strides: tuple, res_units: int, in_channels: int
) -> None:
    """The fill's gradient taken at the first convolutions' outputs (no input-gradient pass) and every weight's
    gradient equal those of the plain computation, where the fill reaches the network through its input."""
    cfg = ModelConfig(backbone="unet", patch_size=PATCH, unet_network=network, unet_channels=channels,
                      unet_strides=strides, unet_num_res_units=res_units, unet_dropout=(0.0,))
    torch.manual_seed(0)
    model = build_mim_model(cfg, SIZE, in_channels)
    assert model._input_convs, "the fast fill gradient is not in use"
    with torch.no_grad():
        model.mask_value.copy_(torch.linspace(-0.5, 0.7, in_channels))
    images = torch.rand(3, in_channels, SIZE, SIZE)
    mask = random_mask(3, 11, seed=5)
    out = model(images, mask)
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    # the straightforward computation on the same network and weights: the fill in the input's autograd graph
    fill = model.mask_value
    masked = torch.where(model.pixel_mask(mask), fill.view(1, -1, 1, 1), images)
    target = patchify(images, PATCH)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    loss = (patchify(model.net(masked), PATCH) - target).pow(2).mean(-1)[mask].mean()
    loss.backward()
    assert torch.allclose(out.loss, loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fast["mask_value"], fill.grad, rtol=1e-4, atol=1e-6)
    assert fast["mask_value"].abs().min() > 0
    for name, p in model.named_parameters():
        assert torch.allclose(fast[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_input_convolutions_refuses_a_network_that_reads_its_input_elsewhere() -> None:
    from ahm.models.unet_mim import input_convolutions

    class ConvPlusInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + x

    assert input_convolutions(ConvPlusInput(), torch.zeros(1, 1, 8, 8)) == []
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Conv2d(2, 1, 1))
    assert input_convolutions(net, torch.zeros(1, 1, 8, 8)) == [net[0]]


def test_a_deep_copy_gives_the_fill_gradient_to_its_own_fill() -> None:
    """HPM's teacher is a deep copy: its first convolutions' hooks must feed the copy's fill, not the original's."""
    import copy

    model = tiny_unet()
    teacher = copy.deepcopy(model)
    teacher(torch.rand(2, 1, SIZE, SIZE), random_mask(2, 9)).loss.backward()
    assert teacher.mask_value.grad is not None and teacher.mask_value.grad.abs().item() > 0
    assert model.mask_value.grad is None
