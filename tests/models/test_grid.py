"""PatchGrid: the one patch grid of 2D images and 3D volumes."""

from __future__ import annotations

import pytest
import torch

from ahm.errors import AhmError
from ahm.grid import PatchGrid
from ahm.models.mae import patchify, unpatchify


def test_2d_matches_the_mae_patch_order() -> None:
    x = torch.randn(2, 3, 32, 48)
    grid = PatchGrid.of((32, 48), 16)
    assert grid.shape == (2, 3) and grid.num_patches == 6 and grid.patch_volume == 256
    assert torch.equal(grid.patchify(x), patchify(x, 16))
    assert torch.equal(grid.unpatchify(patchify(x, 16), 3), unpatchify(patchify(x, 16), 16, (2, 3), 3))


@pytest.mark.parametrize("size", [(16, 32, 24), (8, 8, 8)])
def test_3d_round_trip_and_row_major_order(size: tuple[int, int, int]) -> None:
    grid = PatchGrid.of(size, (8, 8, 4) if size[2] == 24 else 4)
    x = torch.randn(2, 2, *size)
    tokens = grid.patchify(x)
    assert tokens.shape == (2, grid.num_patches, 2 * grid.patch_volume)
    assert torch.equal(grid.unpatchify(tokens, 2), x)
    # patch number i covers the cuboid at grid position coordinates()[i]
    coords = grid.coordinates()
    for i in (0, 1, grid.num_patches - 1):
        lo = [int(c) * p for c, p in zip(coords[i], grid.patch_size)]
        cube = x[:, :, lo[0]:lo[0] + grid.patch_size[0], lo[1]:lo[1] + grid.patch_size[1], lo[2]:lo[2] + grid.patch_size[2]]
        assert torch.equal(tokens[:, i], cube.reshape(2, -1))


def test_upsample_and_pool_are_per_patch() -> None:
    grid = PatchGrid.of((8, 12, 4), (4, 4, 2))
    values = torch.arange(grid.num_patches, dtype=torch.float32).repeat(3, 1)
    full = grid.upsample(values)
    assert full.shape == (3, 1, 8, 12, 4)
    assert torch.equal(grid.pool(full), values)
    assert torch.equal(grid.patchify(full)[:, :, 0], values)


def test_refusals_name_the_option() -> None:
    with pytest.raises(AhmError, match="--patch-size 16 does not divide the input size 40 along axis 1"):
        PatchGrid.of((32, 40), 16)
    with pytest.raises(AhmError, match="--crop.*2 values for a 3D"):
        PatchGrid.of((32, 32, 32), (16, 16), option="--crop")
