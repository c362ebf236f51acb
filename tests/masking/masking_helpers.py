"""Shared builders for the masking-policy tests: tiny models, policies, images and fake per-patch losses."""

from __future__ import annotations

import torch

from ahm.config import MaskingConfig, ModelConfig
from ahm.grid import PatchGrid
from ahm.masking import PolicyContext, build_policy


class PatchFeatures(torch.nn.Module):
    """A small module with the MIM model's `features` contract ([B, C, *spatial] -> [B, L, D]), so the policy
    mechanics can be tested apart from the real backbones (exercised by the tests that pass backbone "vit" or "unet").
    A square 2D grid by default; `grid` (a PatchGrid) for any other, 3D included."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int = 16,
                 grid: PatchGrid | None = None) -> None:
        super().__init__()
        grid = grid or PatchGrid.of((image_size, image_size), patch_size)
        conv = torch.nn.Conv2d if grid.spatial_dims == 2 else torch.nn.Conv3d
        self.embed = conv(in_channels, dim, grid.patch_size, stride=grid.patch_size)
        self.pos = torch.nn.Parameter(torch.randn(1, grid.num_patches, dim) * 0.1)
        self.mix = torch.nn.Linear(dim, dim)
        self.register_buffer("scale", torch.ones(1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2) + self.pos
        return torch.tanh(self.mix(tokens)) * self.scale


def tiny_model(backbone: str, image_size: int, patch_size: int = 16, in_channels: int = 1):
    torch.manual_seed(0)
    if backbone == "standin":
        return PatchFeatures(image_size, patch_size, in_channels)
    from ahm.models import build_mim_model

    cfg = ModelConfig(
        backbone=backbone, preset="custom", patch_size=patch_size, hidden_size=32, mlp_dim=64, num_layers=1,
        num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2, unet_channels=(4, 8), unet_strides=(2,),
        unet_num_res_units=0,
    )
    return build_mim_model(cfg, image_size, in_channels)


def make_policy(name: str, grid=(4, 4), patch_size: int = 16, backbone: str = "standin", seed: int = 0, model=None,
                in_channels: int = 1, **masking):
    """A policy on `grid`; HPM gets a real tiny MIM model of the matching image size."""
    cfg = MaskingConfig(policy=name, **masking)
    if name == "hpm" and model is None:
        assert grid[0] == grid[1]
        model = tiny_model(backbone, grid[0] * patch_size, patch_size, in_channels)
    ctx = PolicyContext(grid=grid, patch_size=patch_size, in_channels=in_channels, total_steps=100, seed=seed,
                        model=model)
    return build_policy(cfg, ctx)


def images_for(grid, patch_size: int = 16, batch: int = 3, in_channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, in_channels, grid[0] * patch_size, grid[1] * patch_size, generator=g)


def fake_loss(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A per-patch loss as the model returns it: positive on masked patches, 0 on visible ones."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(mask.shape, generator=g) * mask
