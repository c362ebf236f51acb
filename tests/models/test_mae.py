"""MAEViT: shapes, masked-only loss, visible-only encoder, norm_pix, and the SDPA block matching MONAI's."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import UNETR

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models.mae import (
    MAEViT,
    build_mim_model,
    fast_block_forward,
    mask_order,
    masked_patch_loss,
    patchify,
    unpatchify,
)

SIZE, PATCH = 32, 8  # 4x4 grid, L = 16


def tiny_vit(channels: int = 1, norm_pix: bool = True, layers: int = 2) -> MAEViT:
    torch.manual_seed(0)
    return MAEViT(
        image_size=SIZE,
        in_channels=channels,
        patch_size=PATCH,
        hidden_size=32,
        mlp_dim=64,
        num_layers=layers,
        num_heads=2,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
        norm_pix=norm_pix,
    )


def random_mask(batch: int, num_patches: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, num_patches, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(batch, num_patches, dtype=torch.bool).scatter(1, idx, True)


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(channels: int) -> None:
    model = tiny_vit(channels)
    images = torch.randn(2, channels, SIZE, SIZE)
    out = model(images, random_mask(2, 16, 12))
    assert out.loss.dim() == 0
    assert out.per_patch_loss.shape == (2, 16)
    assert out.prediction.shape == (2, channels, SIZE, SIZE)
    assert model.features(images).shape == (2, 16, 32)
    assert model.grid == (4, 4) and model.num_patches == 16 and model.backbone == "vit"


def test_per_patch_loss_zero_on_visible_positive_on_masked_and_loss_is_their_mean() -> None:
    model = tiny_vit()
    mask = random_mask(3, 16, 12, seed=1)
    out = model(torch.randn(3, 1, SIZE, SIZE), mask)
    assert torch.all(out.per_patch_loss[~mask] == 0)
    assert torch.all(out.per_patch_loss[mask] > 0)
    assert torch.allclose(out.loss, out.per_patch_loss[mask].mean(), atol=1e-6)
    assert out.per_patch_loss.requires_grad


def test_visible_patches_of_prediction_are_the_input() -> None:
    model = tiny_vit(channels=3)
    images = torch.randn(2, 3, SIZE, SIZE)
    mask = random_mask(2, 16, 10)
    out = model(images, mask)
    visible = ~mask.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, PATCH, 4, PATCH).reshape(2, 3, SIZE, SIZE)
    assert torch.equal(out.prediction[visible], images[visible])
    assert not torch.allclose(out.prediction[~visible], images[~visible])


def test_encoder_sees_only_visible_patches() -> None:
    model = tiny_vit()
    images = torch.randn(2, 1, SIZE, SIZE)
    mask = random_mask(2, 16, 12)
    pixel_mask = mask.view(2, 1, 4, 1, 4, 1).expand(2, 1, 4, PATCH, 4, PATCH).reshape(2, 1, SIZE, SIZE)
    base = model.encode_visible(images, mask)
    assert base.shape == (2, 4, 32)
    changed_masked = torch.where(pixel_mask, torch.randn_like(images) * 5, images)
    assert torch.equal(model.encode_visible(changed_masked, mask), base)
    changed_visible = torch.where(pixel_mask, images, images + 1.0)
    assert not torch.allclose(model.encode_visible(changed_visible, mask), base)


def test_gradients_reach_encoder_and_decoder_from_one_masked_patch() -> None:
    model = tiny_vit()
    mask = random_mask(1, 16, 12)
    out = model(torch.randn(1, 1, SIZE, SIZE), mask)
    masked_index = int(mask[0].nonzero()[0])
    out.per_patch_loss[0, masked_index].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0


def test_unused_monai_norms_get_no_gradient_request() -> None:
    model = tiny_vit()
    out = model(torch.randn(2, 1, SIZE, SIZE), random_mask(2, 16, 8))
    out.loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []


def test_norm_pix_targets() -> None:
    images = torch.randn(2, 1, SIZE, SIZE) * 3 + 2
    mask = random_mask(2, 16, 12)
    for norm_pix in (True, False):
        model = tiny_vit(norm_pix=norm_pix)
        with torch.no_grad():  # a decoder that predicts 0 everywhere
            model.decoder_pred.weight.zero_()
            model.decoder_pred.bias.zero_()
        out = model(images, mask)
        masked = patchify(images, PATCH)[mask]  # [B*K, p*p]
        if norm_pix:
            n = masked.shape[1]
            # mean of per-patch normalised squares is var_biased / var_unbiased = (n-1)/n
            assert torch.allclose(out.per_patch_loss[mask], torch.full((24,), (n - 1) / n), atol=1e-4)
            # de-normalised 0 is each masked patch's mean
            pred = patchify(out.prediction, PATCH)[mask]
            assert torch.allclose(pred, masked.mean(dim=1, keepdim=True).expand_as(pred), atol=1e-5)
        else:
            assert torch.allclose(out.per_patch_loss[mask], masked.pow(2).mean(dim=1), atol=1e-5)
            assert torch.all(patchify(out.prediction, PATCH)[mask] == 0)


def test_masked_patch_loss_is_zero_for_a_perfect_prediction() -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    mask = random_mask(2, 16, 6)
    order, k = mask_order(mask)
    target = torch.gather(
        patchify(images, PATCH), 1, order[:, 16 - k :, None].expand(-1, -1, 3 * PATCH * PATCH)
    )
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    for norm_pix, pred in ((False, target), (True, normed)):
        out = masked_patch_loss(pred, images, mask, PATCH, (4, 4), norm_pix, order, k)
        assert out.loss.item() < 1e-10
        assert torch.allclose(out.prediction, images, atol=1e-5)


def test_patch_order_is_row_major() -> None:
    index = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    images = index.repeat_interleave(PATCH, dim=2).repeat_interleave(PATCH, dim=3)
    patches = patchify(images, PATCH)
    assert torch.equal(patches[0, :, 0], torch.arange(16, dtype=torch.float32))
    assert torch.equal(patches.amin(-1), patches.amax(-1))
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(unpatchify(patchify(x, PATCH), PATCH, (4, 4), 3), x)


def test_features_match_the_monai_vit_forward() -> None:
    model = tiny_vit(channels=3)
    images = torch.randn(2, 3, SIZE, SIZE)
    expected, _ = model.encoder(images)
    assert torch.allclose(model.features(images), expected, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_sdpa_block_matches_monai_block(qkv_bias: bool) -> None:
    torch.manual_seed(1)
    block = TransformerBlock(48, 96, 3, qkv_bias=qkv_bias)
    with torch.no_grad():
        for p in block.parameters():  # move off the default init so norms and biases matter
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 10, 48)
    assert torch.allclose(fast_block_forward(block, x), block(x), atol=1e-5)


def test_encoder_weights_load_strictly_into_unetr_vit() -> None:
    torch.manual_seed(0)
    model = MAEViT(
        image_size=32,
        in_channels=3,
        patch_size=16,
        hidden_size=32,
        mlp_dim=64,
        num_layers=12,
        num_heads=2,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    unetr = UNETR(
        in_channels=3,
        out_channels=2,
        img_size=32,
        feature_size=16,
        hidden_size=32,
        mlp_dim=64,
        num_heads=2,
        spatial_dims=2,
    )
    unetr.vit.load_state_dict(model.export_encoder(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(unetr.vit(x)[0], model.features(x), atol=1e-5)
    meta = model.encoder_metadata()
    assert meta["backbone"] == "vit" and meta["hidden_size"] == "32" and meta["patch_size"] == "16"
    assert all(isinstance(v, str) for v in meta.values())


def test_mask_rows_must_mask_the_same_number() -> None:
    model = tiny_vit()
    mask = random_mask(2, 16, 8)
    mask[0, mask[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number"):
        model(torch.randn(2, 1, SIZE, SIZE), mask)


def test_build_mim_model() -> None:
    cfg = ModelConfig(
        preset="custom",
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=2,
        patch_size=8,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
        norm_pix=False,
    )
    model = build_mim_model(cfg, 32, 3)
    assert (
        isinstance(model, MAEViT) and model.in_channels == 3 and model.grid == (4, 4) and not model.norm_pix
    )
    with pytest.raises(AhmError, match="--image-size 36.*--patch-size 8"):
        build_mim_model(cfg, 36, 3)
    with pytest.raises(AhmError, match="--num-layers"):
        build_mim_model(ModelConfig(preset="custom", hidden_size=32, mlp_dim=64, num_heads=2), 32, 1)
    with pytest.raises(AhmError, match="decoder_heads"):
        build_mim_model(cfg.model_copy(update={"decoder_heads": 3}), 32, 1)


def _plain_mae_loss(model: MAEViT, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MAE loss written the plain way, from the model's own modules: MONAI's conv patch embedding on the
    whole image, MONAI's block forwards, tokens kept in grid order, mask tokens scattered in."""
    b = images.shape[0]
    embed = model.encoder.patch_embedding
    tokens = embed(images)  # conv + learnable position table, all L patches
    keep = (~mask).nonzero()[:, 1].view(b, -1)  # visible indices, ascending
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
    pred = model.decoder_pred(model.decoder_norm(y))  # [B, L, patch]
    target = patchify(images, model.patch_size)
    if model.norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return (pred - target).pow(2).mean(-1)[mask].mean()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_fast_training_step_equals_the_plain_computation(norm_pix: bool) -> None:
    """Loss and every gradient of the hot path (visible-only matmul embedding, SDPA blocks, tokens in
    [visible, masked] order, one patchify, no image-space prediction) equal the plain computation's."""
    model = tiny_vit(channels=3, norm_pix=norm_pix)
    with torch.no_grad():
        for p in model.parameters():  # move off the init so biases and norms matter
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.rand(3, 3, SIZE, SIZE)
    mask = random_mask(3, 16, 11, seed=4)
    out = model(images, mask)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
    plain = _plain_mae_loss(model, images, mask)
    plain_grads = torch.autograd.grad(plain, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert torch.allclose(out.loss, plain, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, plain_grads):
        assert h is not None and torch.allclose(g, h, rtol=1e-4, atol=1e-6)
    assert not out.prediction.requires_grad  # built on demand, outside the graph


def test_decoder_mlp_dim_is_configurable() -> None:
    cfg = ModelConfig(preset="custom", hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2, patch_size=8,
                      decoder_dim=24, decoder_depth=2, decoder_heads=3, decoder_mlp_dim=40)
    model = build_mim_model(cfg, 32, 1)
    assert [b.mlp.linear1.out_features for b in model.decoder_blocks] == [40, 40]
    assert build_mim_model(cfg.model_copy(update={"decoder_mlp_dim": None}), 32, 1).decoder_blocks[0].mlp.linear1.out_features == 96
