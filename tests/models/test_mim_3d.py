"""The masked-image models on 3D volumes: MAE whose encoder is MONAI's 3D ViT (loads into UNETR(spatial_dims=3).vit),
and the 3D UNet as masked-input autoencoder, both on the one PatchGrid."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR, UNet

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models import build_mim_model
from ahm.models.mae import MAEViT
from ahm.models.unet_mim import MaskedUNet

SIZE = 32  # 32^3 volumes


def random_mask(batch: int, num_patches: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, num_patches, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(batch, num_patches, dtype=torch.bool).scatter(1, idx, True)


def vit_3d(patch: int, layers: int = 2, hidden: int = 48, norm_pix: bool = True) -> MAEViT:
    torch.manual_seed(0)
    return MAEViT(image_size=SIZE, in_channels=1, patch_size=patch, hidden_size=hidden, mlp_dim=64, num_layers=layers,
                  num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix=norm_pix, spatial_dims=3)


def cuboid(x: torch.Tensor, coords: tuple[int, ...], p: int) -> torch.Tensor:
    """The p^3 cuboid at grid position `coords`, flattened per sample: [B, C * p^3]."""
    d, h, w = (c * p for c in coords)
    return x[:, :, d:d + p, h:h + p, w:w + p].reshape(x.shape[0], -1)


def _plain_mae_loss_3d(model: MAEViT, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MAE loss the plain way: MONAI's Conv3d patch embedding on the whole volume, MONAI's block forwards,
    tokens in grid order with mask tokens scattered in, targets cut cuboid by cuboid."""
    b = images.shape[0]
    tokens = model.encoder.patch_embedding(images)
    keep = (~mask).nonzero()[:, 1].view(b, -1)
    x = torch.stack([tokens[i, keep[i]] for i in range(b)])
    for block in model.encoder.blocks:
        x = block(x)
    x = model.decoder_embed(model.encoder.norm(x))
    full = model.mask_token.expand(b, model.num_patches, -1).clone()
    for i in range(b):
        full[i, keep[i]] = x[i]
    y = full + model.decoder_pos
    for block in model.decoder_blocks:
        y = block(y)
    pred = model.decoder_pred(model.decoder_norm(y))
    p = model.patch_size
    coords = [tuple(int(c) for c in row) for row in model.patch_grid.coordinates()]
    target = torch.stack([cuboid(images, c, p) for c in coords], dim=1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return (pred - target).pow(2).mean(-1)[mask].mean()


@pytest.mark.parametrize("patch,k", [(16, 6), (8, 48)])
def test_3d_mae_forward_backward_with_k_masked_patches(patch: int, k: int) -> None:
    model = vit_3d(patch)
    n = (SIZE // patch) ** 3
    assert model.grid == (SIZE // patch,) * 3 and model.num_patches == n
    images = torch.randn(2, 1, SIZE, SIZE, SIZE)
    mask = random_mask(2, n, k)
    assert torch.all(mask.sum(1) == k)
    out = model(images, mask)
    assert out.per_patch_loss.shape == (2, n)
    assert torch.all(out.per_patch_loss[~mask] == 0) and torch.all(out.per_patch_loss[mask] > 0)
    assert torch.allclose(out.loss, out.per_patch_loss[mask].mean(), atol=1e-6)
    out.loss.backward()
    assert model.encoder.patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    # visible cuboids of the prediction are the input's
    pred = out.prediction
    assert pred.shape == images.shape and not pred.requires_grad
    pixel_mask = model.patch_grid.upsample(mask).expand_as(images)
    assert torch.equal(pred[~pixel_mask], images[~pixel_mask])
    assert model.features(images).shape == (2, n, 48)


def test_3d_mae_fast_step_equals_the_plain_computation() -> None:
    model = vit_3d(8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.rand(2, 1, SIZE, SIZE, SIZE)
    mask = random_mask(2, 64, 40, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(images, mask)
    grads = torch.autograd.grad(out.loss, params)
    plain = _plain_mae_loss_3d(model, images, mask)
    plain_grads = torch.autograd.grad(plain, params, allow_unused=True)
    assert torch.allclose(out.loss, plain, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, plain_grads):
        assert h is not None and torch.allclose(g, h, rtol=1e-4, atol=1e-6)


def test_3d_encoder_loads_strictly_into_monai_unetr_vit_with_the_same_hidden_states() -> None:
    model = vit_3d(16, layers=12, hidden=32)  # 32 channels: the 3D sin-cos table (30) is zero-padded
    unetr = UNETR(in_channels=1, out_channels=2, img_size=SIZE, feature_size=8, hidden_size=32, mlp_dim=64,
                  num_heads=2, spatial_dims=3)
    unetr.vit.load_state_dict(model.export_encoder(), strict=True)
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        out, hidden = unetr.vit(x)
        ours, our_hidden = model.encoder(x)
        assert len(hidden) == 12
        for a, b in zip(hidden, our_hidden):
            assert torch.allclose(a, b, atol=1e-6)
        # the training path (matmul patch embedding, SDPA blocks) gives MONAI's hidden state too
        assert torch.allclose(model.features(x), out, atol=1e-5)
        assert torch.allclose(ours, out, atol=1e-6)
        assert unetr(x).shape == (1, 2, SIZE, SIZE, SIZE)
    meta = model.encoder_metadata()
    assert (meta["spatial_dims"], meta["image_size"], meta["patch_size"]) == ("3", "32", "16")


def unet_cfg(norm_pix: bool) -> ModelConfig:
    return ModelConfig(backbone="unet", patch_size=8, unet_channels=(4, 8), unet_strides=(2,),
                       unet_num_res_units=1, norm_pix=norm_pix)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_3d_unet_per_patch_loss_is_the_per_cuboid_mse(norm_pix: bool) -> None:
    torch.manual_seed(0)
    model = build_mim_model(unet_cfg(norm_pix), 16, 2, spatial_dims=3)  # 2 x 2 x 2 cuboids of 8^3
    assert isinstance(model, MaskedUNet) and model.grid == (2, 2, 2)
    with torch.no_grad():
        model.mask_value.copy_(torch.tensor([0.5, -0.25]))
    images = torch.randn(2, 2, 16, 16, 16)
    mask = random_mask(2, 8, 5, seed=1)
    out = model(images, mask)
    out.loss.backward()
    # by hand: fill each masked cuboid with the learned value, run the network, MSE per cuboid
    filled = images.clone()
    coords = [tuple(int(c) for c in row) for row in model.patch_grid.coordinates()]
    for b in range(2):
        for index, (d, h, w) in enumerate(coords):
            if mask[b, index]:
                filled[b, :, d * 8:d * 8 + 8, h * 8:h * 8 + 8, w * 8:w * 8 + 8] = model.mask_value.detach().view(-1, 1, 1, 1)
    with torch.no_grad():
        rec = model.net(filled)
    expected = torch.zeros(2, 8)
    for b in range(2):
        for index, c in enumerate(coords):
            if mask[b, index]:
                target = cuboid(images[b:b + 1], c, 8)
                if norm_pix:
                    target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                expected[b, index] = (cuboid(rec[b:b + 1], c, 8) - target).pow(2).mean()
    assert torch.allclose(out.per_patch_loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.loss, expected[mask].mean(), rtol=1e-5, atol=1e-6)
    assert model.mask_value.grad is not None and model.mask_value.grad.abs().sum() > 0
    assert model.net.model[0].conv.unit0.conv.weight.grad.abs().sum() > 0
    assert out.prediction.shape == images.shape
    assert model.features(images).shape[:2] == (2, 8)


def test_3d_unet_masked_voxels_never_reach_the_network_and_export_loads() -> None:
    torch.manual_seed(0)
    model = build_mim_model(unet_cfg(False), 16, 1, spatial_dims=3)
    images = torch.randn(1, 1, 16, 16, 16)
    mask = random_mask(1, 8, 4, seed=2)
    pixel_mask = model.pixel_mask(mask)
    assert pixel_mask.shape == (1, 1, 16, 16, 16) and int(pixel_mask.sum()) == 4 * 8 ** 3
    changed = torch.where(pixel_mask, torch.randn_like(images) * 4, images)
    first, second = model(images, mask).prediction, model(changed, mask).prediction
    assert torch.allclose(first[pixel_mask], second[pixel_mask], atol=1e-6)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=1,
               norm="batch")
    net.load_state_dict(model.export_encoder(), strict=True)
    assert model.encoder_metadata()["spatial_dims"] == "3"


def test_3d_sizes_that_do_not_divide_are_refused() -> None:
    vit = ModelConfig(preset="custom", hidden_size=48, mlp_dim=64, num_layers=1, num_heads=2, patch_size=16,
                      decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert build_mim_model(vit, 32, 1, spatial_dims=3).patch_grid.spatial_shape == (32, 32, 32)
    with pytest.raises(AhmError, match="--image-size 40.*--patch-size 16"):
        build_mim_model(vit, 40, 1, spatial_dims=3)
    with pytest.raises(AhmError, match="--image-size 12 is not divisible by --patch-size 8"):
        build_mim_model(unet_cfg(False), 12, 1, spatial_dims=3)
