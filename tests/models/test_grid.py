"""PatchGrid: the one patch grid of 2D images and 3D volumes."""

from __future__ import annotations

import pytest
import torch

from ahm.errors import AhmError
from ahm.grid import PatchGrid, sincos_position_table
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


def _former_2d_table(rows: int, cols: int, dim: int) -> torch.Tensor:
    # the 2D MAE table this project wrote by hand before MONAI's builder replaced it
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    out_r, out_c = r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega
    table = torch.cat([out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


@pytest.mark.parametrize("shape,dim", [((4, 4), 32), ((2, 3), 192), ((8, 8), 128), ((3, 5), 18)])
def test_2d_sincos_table_equals_the_former_table_bit_for_bit(shape: tuple[int, int], dim: int) -> None:
    table = sincos_position_table(PatchGrid.square(shape, 8), dim)
    assert table.shape == (shape[0] * shape[1], dim) and not table.requires_grad
    assert torch.equal(table, _former_2d_table(*shape, dim))


def test_3d_sincos_table_encodes_every_axis_and_pads_to_dim() -> None:
    grid = PatchGrid.of((32, 48, 16), (16, 16, 8))  # 2 x 3 x 2 patches
    table = sincos_position_table(grid, 32)  # 30 usable channels: 5 frequencies x (sin, cos) x 3 axes
    assert table.shape == (12, 32)
    assert torch.equal(table[:, 30:], torch.zeros(12, 2))
    assert len({tuple(row.tolist()) for row in table}) == 12  # every patch its own position
    coords = grid.coordinates()
    # each axis owns one block of 10 channels (MONAI's order: axis 1, axis 0, axis 2); a block's first channel
    # is sin(position * 1), a function of that axis's coordinate alone
    for block, axis in ((0, 1), (10, 0), (20, 2)):
        assert torch.allclose(table[:, block], coords[:, axis].float().sin())


def test_sincos_axis_order_puts_the_named_axis_first() -> None:
    grid = PatchGrid.of((16, 24, 8), 8)  # 2 x 3 x 1 patches
    natural = sincos_position_table(grid, 24, axis_order=(0, 1, 2))
    monai = sincos_position_table(grid, 24)
    coords = grid.coordinates().float()
    for block, axis in ((0, 0), (8, 1), (16, 2)):
        assert torch.allclose(natural[:, block], coords[:, axis].sin())
    assert torch.equal(natural[:, :8], monai[:, 8:16]) and torch.equal(natural[:, 16:], monai[:, 16:])
    rows_first = sincos_position_table(PatchGrid.square((3, 4), 8), 16, axis_order=(0, 1))
    assert torch.allclose(rows_first[:, 0], PatchGrid.square((3, 4), 8).coordinates()[:, 0].float().sin())
    with pytest.raises(ValueError, match="axis_order"):
        sincos_position_table(grid, 24, axis_order=(0, 1))
