"""The patch grid of an image or a volume: one object for 2 and 3 spatial dimensions.

Every part that cuts an image into patches (the masked-image models, every masking policy, the agents, the
diagnostics, `ahm visualize`) takes a `PatchGrid`, so that no code writes the number of dimensions down.
Patches are numbered row-major over the grid (the last axis fastest), as MAE and MONAI do; inside a patch the
values are flattened (channel, then the spatial axes in order).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import Tensor

from ahm.errors import AhmError

PatchSize = int | Sequence[int]


@dataclass(frozen=True)
class PatchGrid:
    """Spatial shape (H, W) or (D, H, W) of the input and the patch size along each axis."""

    spatial_shape: tuple[int, ...]
    patch_size: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.spatial_shape) not in (2, 3) or len(self.patch_size) != len(self.spatial_shape):
            raise ValueError(f"a patch grid is 2D or 3D with one patch size per axis, got shape "
                             f"{self.spatial_shape} and patch size {self.patch_size}")

    @classmethod
    def of(cls, spatial_shape: Sequence[int], patch_size: PatchSize, option: str = "--patch-size") -> PatchGrid:
        """The grid of `spatial_shape` cut by `patch_size` (one int for every axis, or one per axis).

        Raises AhmError naming `option` when a patch size does not divide its axis.
        """
        shape = tuple(int(s) for s in spatial_shape)
        size = (int(patch_size),) * len(shape) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(size) != len(shape):
            raise AhmError(f"{option} {list(size)} has {len(size)} values for a {len(shape)}D input {list(shape)}")
        for axis, (s, p) in enumerate(zip(shape, size)):
            if p < 1 or s % p:
                raise AhmError(f"{option} {p} does not divide the input size {s} along axis {axis} "
                               f"(input {list(shape)}); choose a size (or crop) that it divides")
        return cls(shape, size)

    @classmethod
    def square(cls, grid: Sequence[int], patch_size: int) -> PatchGrid:
        """The grid with `grid` patches per axis, each `patch_size` wide along every axis."""
        return cls(tuple(int(g) * patch_size for g in grid), (patch_size,) * len(grid))

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Patches per axis."""
        return tuple(s // p for s, p in zip(self.spatial_shape, self.patch_size))

    @property
    def num_patches(self) -> int:
        return math.prod(self.shape)

    @property
    def patch_volume(self) -> int:
        """Pixels (voxels) in one patch, per channel."""
        return math.prod(self.patch_size)

    def patchify(self, images: Tensor) -> Tensor:
        """[B, C, *spatial] -> [B, L, C * patch_volume]."""
        b, c = images.shape[:2]
        split: list[int] = []
        for g, p in zip(self.shape, self.patch_size):
            split += [g, p]
        x = images.reshape(b, c, *split)
        n = self.spatial_dims
        grid_axes = [2 + 2 * i for i in range(n)]
        inner_axes = [3 + 2 * i for i in range(n)]
        x = x.permute(0, *grid_axes, 1, *inner_axes)
        return x.reshape(b, self.num_patches, c * self.patch_volume)

    def unpatchify(self, patches: Tensor, channels: int) -> Tensor:
        """Inverse of `patchify`: [B, L, C * patch_volume] -> [B, C, *spatial]."""
        b = patches.shape[0]
        n = self.spatial_dims
        x = patches.reshape(b, *self.shape, channels, *self.patch_size)
        order = [0, 1 + n]
        for i in range(n):
            order += [1 + i, 2 + n + i]
        return x.permute(*order).reshape(b, channels, *self.spatial_shape)

    def upsample(self, patch_values: Tensor) -> Tensor:
        """Per-patch values [B, L] -> [B, 1, *spatial], each patch's value over all its pixels."""
        b = patch_values.shape[0]
        view: list[int] = [b, 1]
        expand: list[int] = [b, 1]
        for g, p in zip(self.shape, self.patch_size):
            view += [g, 1]
            expand += [g, p]
        return patch_values.reshape(*view).expand(*expand).reshape(b, 1, *self.spatial_shape)

    def pool(self, pixels: Tensor) -> Tensor:
        """Mean over each patch's pixels and channels: [B, C, *spatial] -> [B, L]."""
        return self.patchify(pixels).mean(dim=-1)

    def coordinates(self) -> Tensor:
        """[L, spatial_dims] integer grid position of every patch, in patch order."""
        axes = torch.meshgrid(*[torch.arange(g) for g in self.shape], indexing="ij")
        return torch.stack([a.reshape(-1) for a in axes], dim=1)


# The axis that owns each channel block of MONAI's table, in order (tests/models/test_grid.py pins it)
_MONAI_AXIS_ORDER = {2: (1, 0), 3: (1, 0, 2)}


def sincos_position_table(
    grid: PatchGrid, dim: int, temperature: float = 10000.0, axis_order: Sequence[int] | None = None
) -> Tensor:
    """Fixed sin-cos position table [L, dim] (float32, no gradient) of the grid's patches, in patch order.

    MONAI's `build_sincos_position_embedding`: per axis a block of dim // (2 * spatial_dims) sines then as many
    cosines, the blocks in MONAI's axis order (2D: columns, rows, as MAE; 3D: axis 1, axis 0, axis 2) unless
    `axis_order` names another (e.g. (0, 1) for rows first). MONAI refuses a dim that is not a multiple of
    2 * spatial_dims; here the table is built on the largest such width and zero-padded to `dim`, as this
    project's own 2D table did, so a decoder width like 128 works in 3D too. In 2D the values equal that former
    table bit for bit (tests/models/test_grid.py checks it against the former formula).
    """
    n = grid.spatial_dims
    if axis_order is not None and sorted(axis_order) != list(range(n)):
        raise ValueError(f"axis_order {list(axis_order)} is not an order of the {n} axes")
    width = dim // (2 * n) * 2 * n
    if width == 0:
        return torch.zeros(grid.num_patches, dim)
    with warnings.catch_warnings():
        # MONAI calls torch.meshgrid without `indexing`; its default, "ij", is the row-major order wanted here
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        table = build_sincos_position_embedding(list(grid.shape), width, n, temperature).detach()[0]
    if axis_order is not None:
        blocks = table.split(width // n, dim=1)
        table = torch.cat([blocks[_MONAI_AXIS_ORDER[n].index(axis)] for axis in axis_order], dim=1)
    return F.pad(table, (0, dim - width))
