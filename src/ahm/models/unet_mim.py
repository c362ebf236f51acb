"""The convolutional backbone pretrained as a masked-input autoencoder (SimMIM / Models Genesis style).

The masked patches of the input are filled with a learned value per channel (starting at 0), the whole
MONAI UNet reconstructs the whole image, and only the masked patches count in the loss. A learned fill
rather than a fixed 0 because 0 can be a common intensity after normalisation (background), which would
make masked patches indistinguishable from dark ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from monai.networks.layers import Pool
from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.models.mim import (
    MIMModel,
    MIMOutput,
    check_image_size,
    gather_tokens,
    grid_patch_loss,
    mask_order,
    size_per_axis,
    size_text,
)
from ahm.models.norm import fast_instance_norms
from ahm.models.unet_nets import build_unet_network, decoder_features

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig


def unet_memory_format(spatial_dims: int) -> torch.memory_format:
    """The memory format of the U-Net's convolutions. Channels-last in 2D: oneDNN's NHWC kernels made the whole
    pretraining step 1.18x faster on the CPU (one thread, same loss and gradients); `export_encoder` hands out
    plain contiguous copies. 3D keeps the plain layout: channels_last_3d has not been measured here. A model-level
    fact (channels-last is a layout of 4-D tensors), so it stays in `ahm.models`, below the pipeline."""
    return torch.channels_last if spatial_dims == 2 else torch.contiguous_format


class MaskedInputModel(MIMModel):
    """A whole network pretrained as a masked-input autoencoder: masked patches are filled with a learned value per
    channel, the network reconstructs the image, and the loss is over the masked patches. Subclasses give the
    network (`reconstruct`); they set `mask_value` and `norm_pix`."""

    mask_value: nn.Parameter
    norm_pix: bool

    def reconstruct(self, masked_input: Tensor) -> Tensor:
        """The network on the masked input: the reconstruction, shaped as the input."""
        raise NotImplementedError

    def pixel_mask(self, mask: Tensor) -> Tensor:
        """Patch mask [B, L] -> pixel mask [B, 1, *spatial]."""
        return self.patch_grid.upsample(mask)

    def forward(self, images: Tensor, mask: Tensor, num_masked: int | None = None) -> MIMOutput:
        self._check_input(images, mask)
        order, k = mask_order(mask, num_masked)
        fill = self.mask_value.view(1, -1, *(1,) * self.spatial_dims).to(images.dtype)
        masked_input = torch.where(self.pixel_mask(mask), fill, images)
        reconstruction = self.reconstruct(masked_input)
        pred = gather_tokens(self.patch_grid.patchify(reconstruction), order[:, self.num_patches - k :])
        return grid_patch_loss(pred, images, self.patch_grid, self.norm_pix, order, k)


class MaskedUNet(MaskedInputModel):
    """MONAI UNet (`self.net`, out_channels = in_channels, 2D or 3D) trained to fill in masked patches."""

    backbone = "unet"

    def __init__(
        self, model_cfg: ModelConfig, image_size: int | Sequence[int], in_channels: int, spatial_dims: int = 2
    ) -> None:
        factor = math.prod(model_cfg.unet_strides)
        for size in sorted(set(size_per_axis(image_size, spatial_dims))):
            check_image_size(size, model_cfg.patch_size)
            if size % factor:
                raise AhmError(
                    f"--image-size {size} is not divisible by {factor}, the product of model.unet_strides "
                    f"{tuple(model_cfg.unet_strides)}: the UNet's skip connections need whole feature maps"
                )
        super().__init__(image_size, model_cfg.patch_size, in_channels, spatial_dims)
        self.channels = tuple(model_cfg.unet_channels)
        self.strides = tuple(model_cfg.unet_strides)
        self.num_res_units = model_cfg.unet_num_res_units
        self.norm_pix = model_cfg.norm_pix
        self.norm = model_cfg.norm
        self.network = model_cfg.unet_network
        self.net = build_unet_network(model_cfg, in_channels, in_channels, spatial_dims)
        self.num_res_units = int(self.net.num_res_units)  # 0 for basic-unet, whatever the config says
        fast_instance_norms(self.net)
        self._memory_format = unet_memory_format(spatial_dims)
        self.net.to(memory_format=self._memory_format)
        self.mask_value = nn.Parameter(torch.zeros(in_channels))
        self._patch_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](self.grid)

    def reconstruct(self, masked_input: Tensor) -> Tensor:
        return self.net(masked_input.contiguous(memory_format=self._memory_format))

    def features(self, images: Tensor) -> Tensor:
        """The decoder's last feature map (input of the final up block), averaged per patch: [B, L, D]."""
        self._check_input(images)
        fmap = decoder_features(self.net, images)
        return self._patch_pool(fmap).flatten(2).transpose(1, 2)

    def export_encoder(self) -> dict[str, Tensor]:
        return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in self.net.state_dict().items()}

    def encoder_metadata(self) -> dict[str, str]:
        return {
            "backbone": self.backbone,
            "unet_channels": ",".join(str(c) for c in self.channels),
            "unet_strides": ",".join(str(s) for s in self.strides),
            "unet_num_res_units": str(self.num_res_units),
            "norm": self.norm,
            "unet_network": self.network,
            "patch_size": size_text(self.patch_size),
            "image_size": size_text(self.image_size),
            "in_channels": str(self.in_channels),
            "spatial_dims": str(self.spatial_dims),
        }
