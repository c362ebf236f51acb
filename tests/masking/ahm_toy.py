"""A planted toy for the AHM agent: a bright textured square (the hard patches) on a flat background, and its 3D
counterpart, a textured cuboid in a flat volume.

Per-patch reconstruction losses come from a fixed hardness map (the share of each patch covered by the
square or cuboid) plus noise, so the best policy is known: mask the square (the cuboid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ahm.grid import PatchGrid

SIZE = 64
PATCH = 8
GRID = (SIZE // PATCH, SIZE // PATCH)


def planted_batch(gen: torch.Generator, batch: int, square: int = 24) -> tuple[Tensor, Tensor]:
    """images [B, 1, 64, 64] and hardness [B, 64] (share of each 8x8 patch inside the square)."""
    images = torch.full((batch, 1, SIZE, SIZE), 0.2)
    inside = torch.zeros(batch, 1, SIZE, SIZE)
    for b in range(batch):
        r, c = torch.randint(0, SIZE - square + 1, (2,), generator=gen).tolist()
        images[b, 0, r:r + square, c:c + square] = 0.6 + 0.4 * torch.rand(square, square, generator=gen)
        inside[b, 0, r:r + square, c:c + square] = 1.0
    g = GRID[0]
    hardness = inside.reshape(batch, g, PATCH, g, PATCH).mean(dim=(2, 4)).reshape(batch, g * g)
    return images, hardness


VOLUME = 32
GRID_3D = PatchGrid.of((VOLUME,) * 3, PATCH)  # 4x4x4 = 64 patches of 8^3 voxels


def planted_volume_batch(gen: torch.Generator, batch: int, cuboid: tuple[int, int, int] = (16, 16, 8),
                         grid: PatchGrid = GRID_3D) -> tuple[Tensor, Tensor]:
    """volumes [B, 1, *grid.spatial_shape] with a textured `cuboid` (voxels per axis) at a random voxel position on
    a flat 0.2 background, and hardness [B, L] (share of each patch inside the cuboid)."""
    shape = grid.spatial_shape
    volumes = torch.full((batch, 1, *shape), 0.2)
    inside = torch.zeros(batch, 1, *shape)
    for b in range(batch):
        start = [int(torch.randint(0, s - c + 1, (1,), generator=gen)) for s, c in zip(shape, cuboid)]
        region = (b, 0, *[slice(o, o + c) for o, c in zip(start, cuboid)])
        volumes[region] = 0.6 + 0.4 * torch.rand(cuboid, generator=gen)
        inside[region] = 1.0
    return volumes, grid.pool(inside)


def toy_loss(hardness: Tensor, mask: Tensor, gen: torch.Generator) -> Tensor:
    """Per-patch loss on masked patches (0 elsewhere, like MIMOutput.per_patch_loss)."""
    return (0.1 + 2.0 * hardness + 0.05 * torch.rand(hardness.shape, generator=gen)) * mask


def mean_metric(history: list[dict[str, float]], key: str) -> float:
    values = [m[key] for m in history if key in m]
    assert values, f"metric {key} never reported"
    return sum(values) / len(values)
