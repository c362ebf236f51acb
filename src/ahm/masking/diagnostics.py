"""What the learned policies log about their masks, one function each, for 2D images and 3D volumes alike.

- `row_spearman`: how well a predicted hardness (a critic's value, HPM's loss predictor) ranks the real losses.
- `hardness_ratio`: mean loss on the policy-chosen patches over that on the randomly masked ones of the same mask.
- `background_share`: the share of masked patches that lie on flat background (`patch_std` below BACKGROUND_STD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKGROUND_STD = 0.01  # a patch whose pixel std is below this (intensities ~[0, 1]) counts as background

# pooled moments instead of Tensor.std over patch views, which is ~20x slower on CPU
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def row_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row pair of a, b [B, K] -> [B] (ties broken by order; nan if undefined)."""
    if a.shape[1] < 3:
        return torch.full((a.shape[0],), float("nan"))
    ra = a.argsort(dim=1).argsort(dim=1).double()
    rb = b.argsort(dim=1).argsort(dim=1).double()
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = ((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(dim=1) / denom, torch.full_like(denom, float("nan")))


def mean_row_spearman(pred: Tensor, actual: Tensor) -> float | None:
    """Mean of `row_spearman` over the rows where it is defined; None if it is defined nowhere."""
    rho = row_spearman(pred.detach().float().cpu(), actual.detach().float().cpu())
    return float(rho.nanmean()) if bool(torch.isfinite(rho).any()) else None


def hardness_ratio(per_patch_loss: Tensor, hard: Tensor, mask: Tensor) -> float | None:
    """Mean loss on the `hard` patches / mean loss on the other masked ones (bool [B, L] each); None if either set
    is empty or the second mean is not positive."""
    hard = hard.to(per_patch_loss.device)
    rand = mask.to(per_patch_loss.device) & ~hard
    if not bool(hard.any()) or not bool(rand.any()):
        return None
    hard_mean = per_patch_loss[hard].float().mean()
    rand_mean = per_patch_loss[rand].float().mean()
    if float(rand_mean) <= 0.0:
        return None
    return float(hard_mean / rand_mean)


def patch_std(images: Tensor, patch_size: int | tuple[int, ...]) -> Tensor:
    """Pixel standard deviation (population) of each patch over its channels, [B, L] in row-major patch order.

    `images` [B, C, H, W] or [B, C, D, H, W]; `patch_size` one int for every axis or one per axis.
    """
    x = images.detach().float()
    pool = _AVG_POOL[x.dim() - 2]
    mean = pool(x, patch_size).mean(dim=1)
    mean_sq = pool(x * x, patch_size).mean(dim=1)
    return (mean_sq - mean * mean).clamp_min(0.0).sqrt().flatten(1)


def background_share(images: Tensor, patch_size: int | tuple[int, ...], chosen: Tensor) -> float:
    """Share of the `chosen` patches (bool [B, L], at least one True) that lie on flat background."""
    background = (patch_std(images, patch_size) < BACKGROUND_STD).to(chosen.device)
    return float((background & chosen).sum()) / float(chosen.sum())
