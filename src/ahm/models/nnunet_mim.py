"""The network nnU-Net builds from a plans file, pretrained as a masked-input autoencoder like `MaskedUNet`.

The network is built with as many outputs as inputs, so its segmentation layer is the reconstruction head; that
layer is what nnU-Net replaces when it fine-tunes (it skips `.seg_layers.` keys), and everything else is exported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.networks.layers import Pool
from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.models.mim import (
    check_image_size,
    size_per_axis,
    size_text,
)
from ahm.models.unet_mim import MaskedInputModel
from ahm.nnunet import (
    body_weights,
    build_network,
    configuration_digest,
    geometry,
    read_plans,
    resolve_configuration,
)

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig


class MaskedNnunet(MaskedInputModel):
    """nnU-Net's network for `model.plans` / `model.configuration` (`self.net`) trained to fill in masked patches."""

    backbone = "nnunet"

    def __init__(self, model_cfg: ModelConfig, image_size: int | Sequence[int], in_channels: int,
                 spatial_dims: int = 2) -> None:
        plans_path = str(model_cfg.plans)
        plans = read_plans(plans_path)
        geo = geometry(plans, model_cfg.configuration, plans_path)
        # stays here: a comparison of the plans' dimension with the data's, not a 2D/3D path
        if geo.spatial_dims != spatial_dims:
            raise AhmError(f"{plans_path}: configuration {model_cfg.configuration!r} is {geo.spatial_dims}D but "
                           f"data.spatial_dims is {spatial_dims}")
        sizes = size_per_axis(image_size, spatial_dims)
        if sizes != geo.patch_size:
            raise AhmError(f"model input {'x'.join(map(str, sizes))} is not the patch size "
                           f"{'x'.join(map(str, geo.patch_size))} of {Path(plans_path).name} configuration "
                           f"{model_cfg.configuration!r}; leave data.image_size / data.crop_size unset")
        for size in sorted(set(sizes)):
            check_image_size(size, model_cfg.patch_size)
        super().__init__(image_size, model_cfg.patch_size, in_channels, spatial_dims)
        self.norm_pix = model_cfg.norm_pix
        self.plans_path = plans_path
        self.configuration = model_cfg.configuration
        self.resolved = resolve_configuration(plans, model_cfg.configuration, plans_path)
        self.net = build_network(plans, model_cfg.configuration, in_channels, in_channels)
        self._to_net, self._from_net = geo.to_network_dims(), geo.from_network_dims()
        self.mask_value = nn.Parameter(torch.zeros(in_channels))
        self._patch_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](self.grid)

    def reconstruct(self, masked_input: Tensor) -> Tensor:
        # nnU-Net's network sees its own axis order
        out = self.net(masked_input.permute(self._to_net))
        return out.permute(self._from_net)

    def features(self, images: Tensor) -> Tensor:
        """The decoder's last feature map (input of the last segmentation layer), averaged per patch: [B, L, D]."""
        self._check_input(images)
        seen: list[Tensor] = []
        hook = self.net.decoder.seg_layers[-1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            self.net(images.permute(self._to_net))
        finally:
            hook.remove()
        fmap = seen[-1].permute(self._from_net)
        return self._patch_pool(fmap).flatten(2).transpose(1, 2)

    def export_encoder(self) -> dict[str, Tensor]:
        # clones: the decoder holds the encoder too, and shared storage cannot be written as safetensors
        return {k: v.detach().clone(memory_format=torch.contiguous_format)
                for k, v in body_weights(self.net.state_dict()).items()}

    def encoder_metadata(self) -> dict[str, str]:
        return {
            "backbone": self.backbone,
            "nnunet_plans": self.plans_path,
            "nnunet_configuration": self.configuration,
            "nnunet_digest": configuration_digest(self.resolved),
            "nnunet_resolved": json.dumps(self.resolved, sort_keys=True),
            "patch_size": size_text(self.patch_size),
            "image_size": size_text(self.image_size),
            "in_channels": str(self.in_channels),
            "spatial_dims": str(self.spatial_dims),
        }
