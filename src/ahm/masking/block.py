"""BEiT-style block-wise masking: random rectangles of patches until K patches are masked."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ahm.config import MaskingConfig
from ahm.masking.base import MaskingPolicy, PolicyContext, register

# BEiT masks at least 16 of 196 patches per block; keep the same share of the grid so small grids still work.
_MIN_BLOCK_SHARE = 16 / 196
_MIN_ASPECT = 0.3


def min_block_patches(num_patches: int) -> int:
    """Smallest block area (in patches) a block draw asks for on a grid of `num_patches`."""
    return max(1, round(_MIN_BLOCK_SHARE * num_patches))


def block_mask(grid: tuple[int, int], k: int, uniforms: np.ndarray, fill_scores: np.ndarray,
               min_block: int) -> np.ndarray:
    """One image's mask: flat bool [rows*cols] with exactly `k` True.

    `uniforms` [attempts, 4] drives the block draws (area, aspect, top, left); `fill_scores` [L] picks the
    random patches that top the mask up to `k` when the attempts run out. Passing all randomness in keeps
    the number of generator draws per image fixed, so masks are reproducible whatever path the loop takes.
    """
    rows, cols = grid
    mask = np.zeros((rows, cols), dtype=bool)
    count = 0
    log_lo, log_hi = math.log(_MIN_ASPECT), math.log(1.0 / _MIN_ASPECT)
    for u_area, u_aspect, u_top, u_left in uniforms:
        remaining = k - count
        if remaining <= 0:
            break
        lo = min(min_block, remaining)
        area = lo + u_area * (remaining - lo)
        aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))
        h = min(rows, max(1, round(math.sqrt(area * aspect))))
        w = min(cols, max(1, round(math.sqrt(area / aspect))))
        top = min(rows - h, int(u_top * (rows - h + 1)))
        left = min(cols - w, int(u_left * (cols - w + 1)))
        region = mask[top:top + h, left:left + w]
        new = int(h * w - region.sum())
        # A block that would overshoot K is rejected rather than cut, so blocks stay whole rectangles.
        if 0 < new <= remaining:
            region[...] = True
            count += new
    flat = mask.reshape(-1)
    if count < k:
        # Top up with random free patches: exact K per row is part of the policy contract.
        free_scores = np.where(flat, -np.inf, fill_scores)
        flat[np.argsort(-free_scores, kind="stable")[: k - count]] = True
    return flat


@register("block")
class BlockMasking(MaskingPolicy):
    """Block-wise masking (Bao et al., BEiT): rectangles with aspect ratio in (0.3, 1/0.3), each asking
    for at least `min_block` patches, placed until K patches are masked; then topped up to exactly K."""

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__(cfg, ctx)
        self.min_block = min_block_patches(self.num_patches)
        self.max_attempts = 4 * self.num_patches + 16

    def propose(self, images: Tensor, progress: float) -> Tensor:
        batch = images.shape[0]
        k = self.num_masked(progress)
        uniforms = torch.rand(batch, self.max_attempts, 4, generator=self.generator, dtype=torch.float64).numpy()
        fill = torch.rand(batch, self.num_patches, generator=self.generator, dtype=torch.float64).numpy()
        rows = [block_mask(self.ctx.grid, k, uniforms[b], fill[b], self.min_block) for b in range(batch)]
        return torch.from_numpy(np.stack(rows)).to(images.device)
