"""The masked-image-model contract every backbone's MIM model keeps and every masking policy drives.

    out = model(images, mask)     # images [B, C, H, W], mask bool [B, L] (True = masked, same K per row)
    out.loss                      # MSE over masked patches (targets per-patch normalised if norm_pix)
    out.per_patch_loss            # [B, L]: each masked patch's mean squared error, 0 on visible patches
    out.prediction                # [B, C, H, W]: predicted pixels on masked patches, input on visible ones
                                  # (built on first read, without gradient: not on the training hot path)

Patch l covers rows (l // cols) * p ... and columns (l % cols) * p ...: row-major over the grid, the order
of MONAI's conv patch embedding. A flattened patch is ordered (channel, row, column), the order of the
conv kernel, so the patch embedding can run as one matmul on the visible patches only.

Both MIM models (models/mae.py, models/unet_mim.py) import from here and never from each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ahm.errors import AhmError

_NORM_PIX_EPS = 1e-6


class MIMOutput:
    """What one masked-image-modeling forward pass returns.

    `prediction` is built only when read (pictures, tests): the training step needs the loss and the
    per-patch loss alone, and scattering the prediction back into image space every step cost time for nothing.
    It is computed without gradient.
    """

    def __init__(self, loss: Tensor, per_patch_loss: Tensor, prediction: Tensor | None = None,
                 build_prediction: Callable[[], Tensor] | None = None) -> None:
        if (prediction is None) == (build_prediction is None):
            raise ValueError("give exactly one of prediction and build_prediction")
        self.loss = loss  # scalar: mean of per_patch_loss over the masked patches
        self.per_patch_loss = per_patch_loss  # [B, L]: mean squared error of each masked patch, 0 elsewhere; grad
        self._prediction = prediction
        self._build = build_prediction

    @property
    def prediction(self) -> Tensor:
        """[B, C, H, W]: de-normalised prediction on masked patches, input pixels elsewhere (no grad)."""
        if self._prediction is None:
            assert self._build is not None
            with torch.no_grad():
                self._prediction = self._build()
            self._build = None
        return self._prediction


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, L, C*p*p]: patches row-major over the grid, each flattened (channel, row, col)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * p * p)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `patchify`: [B, L, C*p*p] -> [B, C, H, W]."""
    b = patches.shape[0]
    p = patch_size
    gh, gw = grid
    x = patches.reshape(b, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, gh * p, gw * p)


def mask_order(mask: Tensor) -> tuple[Tensor, int]:
    """Patch indices [B, L] with the visible ones first, then the masked ones (each ascending), and K.

    Raises ValueError if the rows do not all mask the same number of patches.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, L], got shape {tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    low, high = torch.stack([counts.min(), counts.max()]).tolist()  # one device sync, not two
    if low != high:
        raise ValueError("every row of the mask must mask the same number of patches")
    k = int(low)
    # a stable sort of 0/1 keys puts visible (0) before masked (1) and keeps each group ascending
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    return order, k


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, D], index [B, N] -> [B, N, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def masked_patch_loss(
    pred: Tensor,
    images: Tensor,
    mask: Tensor,
    patch_size: int,
    grid: tuple[int, int],
    norm_pix: bool,
    order: Tensor,
    k: int,
    patches: Tensor | None = None,
) -> MIMOutput:
    """Loss, per-patch loss and (lazily) the image-space prediction from predictions of the K masked patches.

    `pred` is [B, K, C*p*p] for the patches `order[:, L-K:]` (in that order), in normalised units if norm_pix.
    `patches` is `patchify(images, patch_size)` when the caller has it already (it is computed once a step).
    """
    c = images.shape[1]
    b = images.shape[0]
    num_patches = grid[0] * grid[1]
    if patches is None:
        patches = patchify(images, patch_size)
    masked_idx = order[:, num_patches - k :]
    target = gather_tokens(patches, masked_idx)
    mean = std = None
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + _NORM_PIX_EPS).sqrt()
        target_n = (target - mean) / std
    else:
        target_n = target
    loss_k = (pred - target_n).pow(2).mean(dim=-1)  # [B, K]
    per_patch = torch.zeros(b, num_patches, dtype=loss_k.dtype, device=loss_k.device).scatter(
        1, masked_idx, loss_k
    )
    loss = loss_k.mean()

    def build() -> Tensor:
        pixels = pred.detach()
        if norm_pix:
            pixels = pixels * std + mean
        full = patches.detach().scatter(1, masked_idx.unsqueeze(-1).expand_as(pixels), pixels.to(patches.dtype))
        return unpatchify(full, patch_size, grid, c)

    return MIMOutput(loss=loss, per_patch_loss=per_patch, build_prediction=build)


class MIMModel(nn.Module):
    """Base of the masked-image-modeling models a masking policy drives."""

    backbone: str = ""

    def __init__(self, image_size: int, patch_size: int, in_channels: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]

    def _check_input(self, images: Tensor, mask: Tensor | None = None) -> None:
        if (
            images.dim() != 4
            or images.shape[1] != self.in_channels
            or tuple(images.shape[2:]) != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        if mask is not None and (
            mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], self.num_patches)
        ):
            raise ValueError(
                f"expected a bool mask [{images.shape[0]}, {self.num_patches}], got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )

    def forward(self, images: Tensor, mask: Tensor) -> MIMOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        """Per-patch features [B, L, D] of the whole, unmasked image."""
        raise NotImplementedError

    def export_encoder(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        """The weights a segmenter starts from."""
        raise NotImplementedError

    def encoder_metadata(self) -> dict[str, str]:  # pragma: no cover - interface
        """What a segmenter must match to load `export_encoder()` (all values strings)."""
        raise NotImplementedError


def check_image_size(image_size: int, patch_size: int) -> None:
    """AhmError unless the image splits into whole patches."""
    if image_size % patch_size:
        raise AhmError(
            f"--image-size {image_size} is not divisible by --patch-size {patch_size}: "
            f"choose an image size that is a multiple of the patch size"
        )
