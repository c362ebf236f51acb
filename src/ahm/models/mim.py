"""The masked-image-model contract every backbone's MIM model keeps and every masking policy drives.

    out = model(images, mask)     # images [B, C, *spatial] (2D or 3D), mask bool [B, L] (True = masked, same K per row)
    out = model(images, mask, num_masked=K)   # the same, K given: the training step's form, which reads nothing
                                              # from the device (see `mask_order`)
    out.loss                      # MSE over masked patches (targets per-patch normalised if norm_pix)
    out.per_patch_loss            # [B, L]: each masked patch's mean squared error, 0 on visible patches
    out.prediction                # [B, C, *spatial]: predicted pixels on masked patches, input on visible ones
                                  # (built on first read, without gradient: not on the training hot path)

Patches are numbered row-major over the model's `PatchGrid` (`model.patch_grid`; in 2D patch l covers rows
(l // cols) * p ... and columns (l % cols) * p ...), the order of MONAI's conv patch embedding. A flattened
patch is ordered (channel, then the spatial axes), the order of the conv kernel, so the patch embedding can run
as one matmul on the visible patches only.

Both MIM models (models/mae.py, models/unet_mim.py) import from here and never from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.grid import PatchGrid

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
        """[B, C, *spatial]: de-normalised prediction on masked patches, input pixels elsewhere (no grad)."""
        if self._prediction is None:
            assert self._build is not None
            with torch.no_grad():
                self._prediction = self._build()
            self._build = None
        return self._prediction


def patchify(images: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """[B, C, *spatial] -> [B, L, C * patch volume]: `PatchGrid.patchify` on the grid the images' shape gives."""
    return PatchGrid.of(images.shape[2:], patch_size).patchify(images)


def unpatchify(patches: Tensor, patch_size: int, grid: Sequence[int], channels: int) -> Tensor:
    """Inverse of `patchify` for `grid` patches per axis, each `patch_size` wide: [B, L, C * p^n] -> [B, C, *spatial]."""
    return PatchGrid.square(grid, patch_size).unpatchify(patches, channels)


def mask_order(mask: Tensor, num_masked: int | None = None) -> tuple[Tensor, int]:
    """Patch indices [B, L] with the visible ones first, then the masked ones (each ascending), and K.

    `num_masked`: K when the caller knows it (the masking policy does). K is a shape, so finding it from the mask
    reads the device; given, it is checked by an assertion on the device that nothing waits for.
    Raises ValueError, without `num_masked`, if the rows do not all mask the same number of patches.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, L], got shape {tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    if num_masked is None:
        low, high = torch.stack([counts.min(), counts.max()]).tolist()  # one device sync, not two
        if low != high:
            raise ValueError("every row of the mask must mask the same number of patches")
        k = int(low)
    else:
        k = int(num_masked)
        torch._assert_async((counts == k).all(), "every row of the mask must mask num_masked patches")
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
    grid: Sequence[int],
    norm_pix: bool,
    order: Tensor,
    k: int,
    patches: Tensor | None = None,
) -> MIMOutput:
    """`grid_patch_loss` on `grid` patches per axis, each `patch_size` wide along every axis."""
    return grid_patch_loss(pred, images, PatchGrid.square(grid, patch_size), norm_pix, order, k, patches)


def grid_patch_loss(
    pred: Tensor,
    images: Tensor,
    grid: PatchGrid,
    norm_pix: bool,
    order: Tensor,
    k: int,
    patches: Tensor | None = None,
) -> MIMOutput:
    """Loss, per-patch loss and (lazily) the image-space prediction from predictions of the K masked patches.

    `pred` is [B, K, C * patch volume] for the patches `order[:, L-K:]` (in that order), in normalised units if
    norm_pix. `patches` is `grid.patchify(images)` when the caller has it already (it is computed once a step).
    """
    c = images.shape[1]
    b = images.shape[0]
    num_patches = grid.num_patches
    if patches is None:
        patches = grid.patchify(images)
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
        return grid.unpatchify(full, c)

    return MIMOutput(loss=loss, per_patch_loss=per_patch, build_prediction=build)


def size_per_axis(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """`size` for every one of `spatial_dims` axes (one int is a square / cube)."""
    sizes = (int(size),) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != spatial_dims:
        raise ValueError(f"{list(sizes)} has {len(sizes)} sizes for {spatial_dims} spatial dimensions")
    return sizes


def size_text(size: int | Sequence[int]) -> str:
    """Metadata text of a size: one number for a square / cube (what 2D metadata always held), else one per axis."""
    sizes = (size,) if isinstance(size, int) else tuple(size)
    return str(sizes[0]) if len(set(sizes)) == 1 else ",".join(str(s) for s in sizes)


class MIMModel(nn.Module):
    """Base of the masked-image-modeling models a masking policy drives, 2D or 3D.

    `patch_grid` is the `PatchGrid` of the input; `grid` is its patches per axis (a tuple of spatial_dims ints).
    """

    backbone: str = ""

    def __init__(
        self, image_size: int | Sequence[int], patch_size: int | Sequence[int], in_channels: int, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.patch_grid = PatchGrid.of(size_per_axis(image_size, spatial_dims), patch_size)
        self.grid = self.patch_grid.shape
        self.num_patches = self.patch_grid.num_patches

    def _check_input(self, images: Tensor, mask: Tensor | None = None) -> None:
        spatial = self.patch_grid.spatial_shape
        if images.dim() != 2 + len(spatial) or images.shape[1] != self.in_channels or tuple(images.shape[2:]) != spatial:
            raise ValueError(
                f"expected images [B, {', '.join(str(s) for s in (self.in_channels, *spatial))}], "
                f"got {tuple(images.shape)}"
            )
        if mask is not None and (
            mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], self.num_patches)
        ):
            raise ValueError(
                f"expected a bool mask [{images.shape[0]}, {self.num_patches}], got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )

    def forward(self, images: Tensor, mask: Tensor, num_masked: int | None = None) -> MIMOutput:  # pragma: no cover
        """`num_masked`: K, the masked patches per row, when the caller knows it (see `mask_order`)."""
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


def check_image_size(image_size: int | Sequence[int], patch_size: int) -> None:
    """AhmError unless the image (a side, or one side per axis: a 3D crop) splits into whole patches."""
    if not isinstance(image_size, int):
        for side in image_size:
            check_image_size(int(side), patch_size)
        return
    if image_size % patch_size:
        raise AhmError(
            f"--image-size {image_size} is not divisible by --patch-size {patch_size}: "
            f"choose an image size that is a multiple of the patch size"
        )
