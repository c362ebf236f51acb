"""The AHM actor-critic: a light network over the patch tokens of an image.

It never runs the MIM encoder: its own strided-conv patch embedding and one or two small transformer
blocks are the whole cost, which is what separates AHM from HPM (whose teacher encodes every patch).
Two per-patch heads: the actor logit z_i (where to mask) and the critic value V_i (the predicted,
per-image normalised reconstruction loss of patch i if it were masked).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ahm.errors import AhmError


class _Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # plain attention: at these sizes (tens of tokens) it is several times faster on CPU than the fused kernel
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class AhmAgent(nn.Module):
    """Actor-critic over the L patches of an image: forward(images [B,C,H,W]) -> (logits [B,L], values [B,L])."""

    def __init__(self, in_channels: int, patch_size: int, grid: tuple[int, int], dim: int = 64,
                 depth: int = 1, heads: int = 4) -> None:
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise AhmError(f"--agent-dim ({dim}) must be a positive multiple of --agent-heads ({heads})")
        if depth < 0:
            raise AhmError(f"--agent-depth must be 0 or more, got {depth}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch_size = int(patch_size)
        self.in_channels = int(in_channels)
        length = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.actor = nn.Linear(dim, 1)
        self.critic = nn.Linear(dim, 1)
        # zero heads: the first policy is uniform (maximum entropy) and the first value is the mean reward, 0
        for head in (self.actor, self.critic):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.detach().float()
        # per-image standardisation: intensity ranges differ by modality (MRI, CT windows, photos)
        # (mean and mean square, not Tensor.std: the latter is ~100x slower on CPU for this shape)
        mean = x.flatten(1).mean(dim=1).view(-1, 1, 1, 1)
        x = x - mean
        std = x.flatten(1).square().mean(dim=1).sqrt().view(-1, 1, 1, 1)
        x = x / (std + 1e-6)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return self.actor(tokens).squeeze(-1), self.critic(tokens).squeeze(-1)

    def init_kwargs(self) -> dict[str, object]:
        """Constructor arguments that rebuild an agent of the same shape (used by A3C worker processes)."""
        return {
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "grid": self.grid,
            "dim": self.patch_embed.out_channels,
            "depth": len(self.blocks),
            "heads": self.blocks[0].heads if len(self.blocks) else 1,
        }
