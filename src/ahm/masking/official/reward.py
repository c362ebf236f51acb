"""The reward and loss of the authors' agent, with each published defect fixed by default and restorable.

Per patch i of an image with L patches (pixel intensities ~[0, 1], prediction = the frozen reconstructor's
output on the masked input):

    error_i   = 255 / L * sum over the pixels of patch i of (prediction - image)^2      (mean over channels)
    balance_i = 255 / L * sum over the pixels of patch i of prediction^2               (against a zero image)
    R_i       = error_i + balance * balance_i

One-step episodes: advantage A_i = R_i - V_i; loss = mean over patches of -log(p_i) * A_i.detach() + 0.5 * (V_i - R_i)^2 / 2.

Defects of the published code and the option that restores each (docs/method.md):
- `scope="batch"`: every sum also runs over the whole batch, so all images of a batch share one reward map.
- `window=N`: the sums run over N x N (x N in 3D) pixel windows at an N px pitch instead of the patches (the code used 20 px
  windows on its 16 px grid: patches are misaligned, and the last rows and columns fall outside the image and get 0).
- `patches="all"`: the loss averages over every patch, masked or not (the code's log p of visible patches too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

REWARD_SCALE = 255.0  # the authors' factor (intensities back on a 0..255 scale)


_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def _window_sums(pixels: Tensor, grid: tuple[int, ...], window: int | tuple[int, ...]) -> Tensor:
    """pixels [B, *spatial] -> [B, L]: the sum over window (i, j[, l]) = pixels i*window..(i+1)*window along the first
    axis, and so on, zero where a window lies outside the image (row-major over the 2D or 3D grid)."""
    n = len(grid)
    size = (int(window),) * n if isinstance(window, int) else tuple(int(w) for w in window)
    covered = [g * w for g, w in zip(grid, size)]
    x = pixels[(slice(None), *[slice(0, c) for c in covered])]
    pad: list[int] = []
    for c, have in zip(reversed(covered), reversed(pixels.shape[1:])):
        pad += [0, max(0, c - have)]
    x = F.pad(x, pad)
    return _AVG_POOL[n](x.unsqueeze(1), size).flatten(1) * float(math.prod(size))


def patch_reward_terms(images: Tensor, prediction: Tensor, grid: tuple[int, ...], patch_size: int | tuple[int, ...],
                       window: int | None = None) -> tuple[Tensor, Tensor]:
    """(error, balance), each [B, L], as in the module docstring; `grid` patches per axis; `window` None: the patch."""
    x = images.detach().float()
    pred = prediction.detach().float()
    scale = REWARD_SCALE / math.prod(grid)
    size = patch_size if window is None else int(window)
    error = _window_sums((pred - x).square().mean(dim=1), grid, size) * scale
    balance = _window_sums(pred.square().mean(dim=1), grid, size) * scale
    return error, balance


def official_reward(error: Tensor, balance: Tensor, balance_weight: float = 0.5, scope: str = "image") -> Tensor:
    """R [B, L] = error + balance_weight * balance; scope "batch" sums each patch's terms over the batch."""
    reward = error + balance_weight * balance
    if scope == "batch":
        reward = reward.sum(dim=0, keepdim=True).expand_as(reward)
    elif scope != "image":
        raise ValueError(f"reward scope {scope!r}: choose image or batch")
    return reward


def official_agent_loss(logits: Tensor, values: Tensor, reward: Tensor, mask: Tensor,
                        patches: str = "masked") -> tuple[Tensor, dict[str, Tensor]]:
    """The authors' one-step actor-critic loss over the masked patches (or all, `patches="all"`), and its parts.

    log p_i is the log of the policy map sigmoid(z_i) (computed as logsigmoid, which is the authors' log(p + 1e-8)
    without the epsilon); the value term is 0.5 * (V - R)^2 / 2 (their critic coefficient 0.5 on (V - R)^2 / 2).
    """
    reward = reward.detach().to(values.dtype)
    advantage = reward - values.detach()
    actor = -F.logsigmoid(logits) * advantage
    critic = 0.5 * (values - reward).square() / 2.0
    if patches == "all":
        weight = torch.ones_like(values)
    elif patches == "masked":
        weight = mask.to(values.dtype)
    else:
        raise ValueError(f"loss patches {patches!r}: choose masked or all")
    count = weight.sum().clamp_min(1.0)
    actor_mean = (actor * weight).sum() / count
    critic_mean = (critic * weight).sum() / count
    loss = actor_mean + critic_mean
    parts = {"agent_loss": loss.detach(), "actor_loss": actor_mean.detach(), "critic_loss": critic_mean.detach(),
             "mean_reward": ((reward * weight).sum() / count).detach()}
    return loss, parts
