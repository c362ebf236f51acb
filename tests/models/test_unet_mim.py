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
