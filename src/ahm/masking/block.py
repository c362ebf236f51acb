"""BEiT-style block-wise masking: random blocks of patches (rectangles in 2D, cuboids in 3D) until K are masked."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ahm.config import MaskingConfig
from ahm.masking.base import MaskingPolicy, PolicyContext, register

# BEiT masks at least 16 of 196 patches per block; keep the same share of the grid so small grids still work.
_MIN_BLOCK_SHARE = 16 / 196
_MIN_ASPECT = 0.3


@dataclass(frozen=True)
class Block:
    """One placed block: its first patch and its size along every grid axis."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))


def min_block_patches(num_patches: int) -> int:
    """Smallest block size (in patches) a block draw asks for on a grid of `num_patches`."""
    return max(1, round(_MIN_BLOCK_SHARE * num_patches))


def uniforms_per_attempt(spatial_dims: int) -> int:
    """Uniforms one block draw takes: its size, spatial_dims - 1 aspect ratios and a start per axis."""
    return 2 * spatial_dims


def _block_sides(volume: float, aspects: list[float], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Sides of a block of about `volume` patches. Side i is (volume * a_i / a_{i-1}) ** (1/n) with a_{-1} = a_{n-1}
    = 1: in 2D (sqrt(V a), sqrt(V / a)) as BEiT draws it; in 3D every pair of sides keeps a ratio in (0.3, 1/0.3)."""
    n = len(shape)
    ratios = [1.0, *aspects, 1.0]
    # math.sqrt in 2D keeps the masks bit-identical to BEiT's formula; pow would round differently
    root = math.sqrt if n == 2 else (lambda x: x ** (1.0 / n))
    return tuple(min(g, max(1, round(root(volume * ratios[i + 1] / ratios[i])))) for i, g in enumerate(shape))


def place_blocks(shape: tuple[int, ...], k: int, uniforms: np.ndarray, min_block: int) -> tuple[np.ndarray, list[Block]]:
    """Blocks placed on a grid of `shape` patches without overshooting `k`: the bool mask [*shape] and the blocks.

    `uniforms` [attempts, 2 * len(shape)] drives the draws (size, aspects, start per axis); a block that would mask
    more than the patches still missing is rejected rather than cut, so every placed block stays whole.
    """
    n = len(shape)
    mask = np.zeros(shape, dtype=bool)
    blocks: list[Block] = []
    count = 0
    log_lo, log_hi = math.log(_MIN_ASPECT), math.log(1.0 / _MIN_ASPECT)
    for draw in uniforms:
        remaining = k - count
        if remaining <= 0:
            break
        u_size, u_aspects, u_start = draw[0], draw[1:n], draw[n:]
        lo = min(min_block, remaining)
        volume = lo + u_size * (remaining - lo)
        aspects = [math.exp(log_lo + u * (log_hi - log_lo)) for u in u_aspects]
        sides = _block_sides(volume, aspects, shape)
        start = tuple(min(g - s, int(u * (g - s + 1))) for g, s, u in zip(shape, sides, u_start))
        block = Block(start, sides)
        region = mask[block.slices()]
        new = int(math.prod(sides) - region.sum())
        if 0 < new <= remaining:
            region[...] = True
            blocks.append(block)
            count += new
    return mask, blocks


def block_mask(grid: tuple[int, ...], k: int, uniforms: np.ndarray, fill_scores: np.ndarray,
               min_block: int) -> np.ndarray:
    """One image's (or volume's) mask: flat bool [L] (row-major over `grid`) with exactly `k` True.

    `uniforms` [attempts, 2 * len(grid)] drives the block draws (see `place_blocks`); `fill_scores` [L] picks the
    random patches that top the mask up to `k` when the attempts run out. Passing all randomness in keeps
    the number of generator draws per image fixed, so masks are reproducible whatever path the loop takes.
    """
    mask, _ = place_blocks(tuple(grid), k, uniforms, min_block)
    flat = mask.reshape(-1)
    count = int(flat.sum())
    if count < k:
        # Top up with random free patches: exact K per row is part of the policy contract.
        free_scores = np.where(flat, -np.inf, fill_scores)
        flat[np.argsort(-free_scores, kind="stable")[: k - count]] = True
    return flat


@register("block")
class BlockMasking(MaskingPolicy):
    """Block-wise masking (Bao et al., BEiT): blocks whose sides keep ratios in (0.3, 1/0.3) (rectangles in 2D,
    cuboids in 3D), each asking for at least `min_block` patches, placed until K patches are masked; then topped
    up to exactly K."""

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__(cfg, ctx)
        self.min_block = min_block_patches(self.num_patches)
        self.max_attempts = 4 * self.num_patches + 16

    def propose(self, images: Tensor, progress: float) -> Tensor:
        batch = images.shape[0]
        k = self.num_masked(progress)
        draws = uniforms_per_attempt(self.ctx.spatial_dims)
        uniforms = torch.rand(batch, self.max_attempts, draws, generator=self.generator, dtype=torch.float64).numpy()
        fill = torch.rand(batch, self.num_patches, generator=self.generator, dtype=torch.float64).numpy()
        shape = self.ctx.grid.shape
        rows = [block_mask(shape, k, uniforms[b], fill[b], self.min_block) for b in range(batch)]
        return torch.from_numpy(np.stack(rows)).to(images.device)
