"""The `unet` backbone: a MONAI UNet (or BasicUNet) pretrained as a masked-input autoencoder, fine-tuned whole.

The MIM model and the segmenter build the same network (models/unet_nets.py), so a pretrained network loads into
its segmenter key for key except the last layer, which the segmenter gets new (its output is classes, not pixels).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.models.backbones.base import Backbone, param_group_adder
from ahm.models.norm import conv_norm, fast_instance_norms
from ahm.models.unet_mim import MaskedUNet
from ahm.models.unet_nets import build_unet_network, contracting_path, head_prefix

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig


class UNetBackbone(Backbone):
    name = "unet"
    segmenter = "unet"

    def crop_multiple(self, model_cfg: ModelConfig) -> int:
        """The UNet's skip connections need whole feature maps: sides are multiples of the strides' product."""
        return math.prod(model_cfg.unet_strides)

    def build_mim_model(self, model_cfg: ModelConfig, image_size: int, in_channels: int,
                        spatial_dims: int = 2) -> MaskedUNet:
        return MaskedUNet(model_cfg, image_size, in_channels, spatial_dims)

    def build_segmenter(self, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int,
                        spatial_dims: int = 2) -> nn.Module:
        """The MIM UNet's layout with `num_classes` outputs."""
        factor = self.crop_multiple(model_cfg)
        # 3D: one size per axis (the training crop)
        sides = (image_size,) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if any(side % factor for side in sides):
            raise AhmError(
                f"--image-size {'x'.join(map(str, sides))} is not divisible by {factor}, the product of "
                f"model.unet_strides {tuple(model_cfg.unet_strides)}"
            )
        unet = build_unet_network(model_cfg, in_channels, num_classes, spatial_dims)
        fast_instance_norms(unet)
        return unet

    def expected_metadata(self, segmenter: nn.Module) -> dict[str, str]:
        # image size is not compared: convolution weights fit any image size the strides divide
        return {
            "unet_channels": ",".join(str(c) for c in segmenter.channels),
            "unet_strides": ",".join(str(s) for s in segmenter.strides),
            "unet_num_res_units": str(segmenter.num_res_units),
            "in_channels": str(segmenter.in_channels),
            "norm": conv_norm(segmenter),
            "unet_network": getattr(segmenter, "network", "unet"),
        }

    def encoder_modules(self, segmenter: nn.Module) -> list[nn.Module]:
        """The contracting path (every down block and the bottom); the expanding path and the head train."""
        return contracting_path(segmenter)

    def load_weights(self, segmenter: nn.Module, weights: dict[str, Tensor], source: str) -> dict[str, Any]:
        head = head_prefix(segmenter)
        target = segmenter.state_dict()
        body = {k: v for k, v in target.items() if not k.startswith(head)}
        missing = sorted(set(body) - set(weights))
        unexpected = sorted(k for k in weights if k not in target)
        wrong = sorted(k for k in body if k in weights and tuple(weights[k].shape) != tuple(body[k].shape))
        if missing or unexpected or wrong:
            if missing:
                what = f"missing {missing[0]}"
            elif unexpected:
                what = f"unexpected {unexpected[0]}"
            else:
                key = wrong[0]
                what = f"shape of {key} is {tuple(weights[key].shape)}, needs {tuple(body[key].shape)}"
            raise AhmError(f"{source}: weights do not fit the UNet segmenter ({what})")
        # strict in substance: every body key was checked above; only the new head is left out
        segmenter.load_state_dict({k: weights[k] for k in body}, strict=False)
        return {"loaded": len(body), "skipped": sorted(k for k in target if k.startswith(head))}

    def param_groups(self, segmenter: nn.Module, base_lr: float, encoder_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """Every layer but the last is pretrained (at base * scale); the new last layer at base."""
        groups: list[dict[str, Any]] = []
        add = param_group_adder(groups)
        head = head_prefix(segmenter)
        named = list(segmenter.named_parameters())
        add("unet.pretrained", [p for n, p in named if not n.startswith(head)], base_lr * encoder_lr_scale)
        add("unet.head", [p for n, p in named if n.startswith(head)], base_lr, pretrained=False)
        return groups

    def finetune_model_config(self, pretrained: ModelConfig, finetune: ModelConfig) -> ModelConfig:
        # the UNet's norm layers are pretrained with it (UNETR's convolutional decoder, and its norm, start fresh)
        return pretrained.model_copy()
