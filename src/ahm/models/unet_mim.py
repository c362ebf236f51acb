"""The convolutional backbone pretrained as a masked-input autoencoder (SimMIM / Models Genesis style).

The masked patches of the input are filled with a learned value per channel (starting at 0), the whole
MONAI UNet reconstructs the whole image, and only the masked patches count in the loss. A learned fill
rather than a fixed 0 because 0 can be a common intensity after normalisation (background), which would
make masked patches indistinguishable from dark ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models.mae import (
    MIMModel,
    MIMOutput,
    check_image_size,
    gather_tokens,
    mask_order,
    masked_patch_loss,
    patchify,
)
from ahm.models.norm import fast_instance_norms
from ahm.models.unet_nets import build_unet_network, decoder_features


class MaskedUNet(MIMModel):
    """MONAI UNet (`self.net`, out_channels = in_channels) trained to fill in masked patches."""

    backbone = "unet"

    def __init__(self, model_cfg: ModelConfig, image_size: int, in_channels: int) -> None:
        check_image_size(image_size, model_cfg.patch_size)
        factor = math.prod(model_cfg.unet_strides)
        if image_size % factor:
            raise AhmError(
                f"--image-size {image_size} is not divisible by {factor}, the product of model.unet_strides "
                f"{tuple(model_cfg.unet_strides)}: the UNet's skip connections need whole feature maps"
            )
        super().__init__(image_size, model_cfg.patch_size, in_channels)
        self.channels = tuple(model_cfg.unet_channels)
        self.strides = tuple(model_cfg.unet_strides)
        self.num_res_units = model_cfg.unet_num_res_units
        self.norm_pix = model_cfg.norm_pix
        self.norm = model_cfg.norm
        self.network = model_cfg.unet_network
        self.net = build_unet_network(model_cfg, in_channels, in_channels)
        self.num_res_units = int(self.net.num_res_units)  # 0 for basic-unet, whatever the config says
        fast_instance_norms(self.net)
        # channels-last convolution weights: oneDNN's NHWC kernels made the whole pretraining step 1.18x faster
        # on the CPU (one thread, same loss and gradients); `export_encoder` hands out plain contiguous copies
        self.net.to(memory_format=torch.channels_last)
        self.mask_value = nn.Parameter(torch.zeros(in_channels))

    def pixel_mask(self, mask: Tensor) -> Tensor:
        """Patch mask [B, L] -> pixel mask [B, 1, H, W]."""
        b = mask.shape[0]
        gh, gw = self.grid
        p = self.patch_size
        return mask.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, p, gw, p).reshape(b, 1, gh * p, gw * p)

    def forward(self, images: Tensor, mask: Tensor) -> MIMOutput:
        self._check_input(images, mask)
        order, k = mask_order(mask)
        masked_input = torch.where(
            self.pixel_mask(mask), self.mask_value.view(1, -1, 1, 1).to(images.dtype), images
        )
        reconstruction = self.net(masked_input.contiguous(memory_format=torch.channels_last))
        pred = gather_tokens(patchify(reconstruction, self.patch_size), order[:, self.num_patches - k :])
        return masked_patch_loss(pred, images, mask, self.patch_size, self.grid, self.norm_pix, order, k)

    def features(self, images: Tensor) -> Tensor:
        """The decoder's last feature map (input of the final up block), averaged per patch: [B, L, D]."""
        self._check_input(images)
        fmap = decoder_features(self.net, images)
        return F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)

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
            "patch_size": str(self.patch_size),
            "image_size": str(self.image_size),
            "in_channels": str(self.in_channels),
        }
