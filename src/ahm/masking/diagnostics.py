"""What the learned policies log about their masks, one function each, for 2D images and 3D volumes alike.

Each returns a tensor on the device of its inputs, NaN where it is undefined, so that computing it reads nothing
from the device: the training loop reads a logged step's metrics all at once.

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
        return torch.full((a.shape[0],), float("nan"), device=a.device)
    exact = torch.float32 if a.device.type == "mps" else torch.float64  # MPS has no float64
    ra = a.argsort(dim=1).argsort(dim=1).to(exact)
    rb = b.argsort(dim=1).argsort(dim=1).to(exact)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = ((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(dim=1) / denom, torch.full_like(denom, float("nan")))


def mean_row_spearman(pred: Tensor, actual: Tensor) -> Tensor:
    """Mean of `row_spearman` over the rows where it is defined (0-d); NaN if it is defined nowhere."""
    return row_spearman(pred.detach().float(), actual.detach().float()).nanmean()


def masked_mean(values: Tensor, where: Tensor) -> Tensor:
    """Mean of `values` over the True entries of `where` (0-d, float32); NaN if there are none. What
    `values[where].mean()` gives, without the host read a boolean index makes to learn its size."""
    where = where.to(values.device)
    return torch.where(where, values.float(), 0.0).sum() / where.sum()


def hardness_ratio(per_patch_loss: Tensor, hard: Tensor, mask: Tensor) -> Tensor:
    """Mean loss on the `hard` patches / mean loss on the other masked ones (bool [B, L] each), 0-d; NaN if either
    set is empty or the second mean is not positive."""
    hard = hard.to(per_patch_loss.device)
    rand_mean = masked_mean(per_patch_loss, mask.to(per_patch_loss.device) & ~hard)
    return torch.where(rand_mean > 0, masked_mean(per_patch_loss, hard) / rand_mean, float("nan"))


def patch_std(images: Tensor, patch_size: int | tuple[int, ...]) -> Tensor:
    """Pixel standard deviation (population) of each patch over its channels, [B, L] in row-major patch order.

    `images` [B, C, H, W] or [B, C, D, H, W]; `patch_size` one int for every axis or one per axis.
    """
    x = images.detach().float()
    pool = _AVG_POOL[x.dim() - 2]
    mean = pool(x, patch_size).mean(dim=1)
    mean_sq = pool(x * x, patch_size).mean(dim=1)
    return (mean_sq - mean * mean).clamp_min(0.0).sqrt().flatten(1)


def background_share(images: Tensor, patch_size: int | tuple[int, ...], chosen: Tensor) -> Tensor:
    """Share of the `chosen` patches (bool [B, L], at least one True) that lie on flat background, 0-d."""
    background = (patch_std(images, patch_size) < BACKGROUND_STD).to(chosen.device)
    return (background & chosen).sum() / chosen.sum()
