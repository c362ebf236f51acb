"""The convolutional networks behind the `unet` backbone, chosen by `model.unet_network`:

- "unet": MONAI `UNet` (strided-conv residual units; this project's default).
- "basic-unet": MONAI `BasicUNet`, the classic U-Net (two 3x3 conv-BN-ReLU per level, max-pool down, transposed-conv
  up, skip concatenation). With `unet_channels` (32, 64, 128, 256, 512), ReLU, batch norm and encoder dropout
  (0.05, 0.1, 0.2, 0.3, 0.5) it is the authors' AHM reconstructor (7,765,409 parameters at 1 channel) to within
  0.3%: MONAI's last up-sampling keeps 64 channels where theirs halves to 32 (7,782,849 parameters). MONAI's
  `UNet` cannot match it (6.50 M with 2 residual units, 9.65 M with 3, and strided convolutions, not pooling).

Both the MIM model (models/unet_mim.py) and the segmenter (models/backbones/unet.py) build their network here, so a
pretrained network loads into its segmenter key for key except the new last layer (`head_prefix`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, UNet
from torch import Tensor, nn

from ahm.errors import AhmError

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig


def build_unet_network(model_cfg: ModelConfig, in_channels: int, out_channels: int, spatial_dims: int = 2) -> nn.Module:
    """The configured 2D or 3D U-Net; it carries `network`, `channels`, `strides`, `num_res_units`, `in_channels`
    and `spatial_dims`."""
    if model_cfg.unet_network == "unet":
        net: nn.Module = UNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            channels=tuple(model_cfg.unet_channels), strides=tuple(model_cfg.unet_strides),
            num_res_units=model_cfg.unet_num_res_units, norm=model_cfg.norm,
        )
        net.network = "unet"
        net.spatial_dims = spatial_dims
        return net
    channels = tuple(model_cfg.unet_channels)
    if len(channels) != 5 or tuple(model_cfg.unet_strides) != (2, 2, 2, 2):
        raise AhmError(
            f"model.unet_network basic-unet: needs five unet_channels (e.g. 32,64,128,256,512) and unet_strides "
            f"2,2,2,2, got {channels} and {tuple(model_cfg.unet_strides)}"
        )
    net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    features=(*channels, channels[0]), act="relu", norm=model_cfg.norm, upsample="deconv")
    dropout = tuple(model_cfg.unet_dropout) + (0.0,) * (5 - len(model_cfg.unet_dropout))
    encoder = [net.conv_0, net.down_1.convs, net.down_2.convs, net.down_3.convs, net.down_4.convs]
    # one dropout per level, between its two convolutions, as the authors' network has; none in the decoder
    for level, two_conv in enumerate(encoder):
        two_conv.conv_0.adn.D.p = float(dropout[level])
    net.network = "basic-unet"
    net.channels = channels
    net.strides = (2, 2, 2, 2)
    net.num_res_units = 0
    net.in_channels = in_channels
    net.spatial_dims = spatial_dims
    return net


def head_prefix(net: nn.Module) -> str:
    """State-dict prefix of the layer a segmenter gets new (its output is classes, not pixels)."""
    if getattr(net, "network", "unet") == "basic-unet":
        return "final_conv."
    # MONAI's UNet is Sequential(first down block, skip connection holding the rest, final up block)
    return f"model.{len(net.model) - 1}."


def contracting_path(net: nn.Module) -> list[nn.Module]:
    """The encoder half of the network: the blocks every image passes on its way down to the bottom."""
    if getattr(net, "network", "unet") == "basic-unet":
        return [net.conv_0, net.down_1, net.down_2, net.down_3, net.down_4]
    # MONAI's UNet nests Sequential(down, SkipConnection(inner), up) per level; the innermost `inner` is the bottom
    blocks, level = [], net.model
    while True:
        blocks.append(level[0])
        inner = level[1].submodule
        if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
            level = inner
            continue
        blocks.append(inner)
        return blocks


def decoder_features(net: nn.Module, images: Tensor) -> Tensor:
    """The feature map the last layer reads ([B, D, H', W']): the input of the final up block / final conv."""
    if getattr(net, "network", "unet") == "basic-unet":
        x0 = net.conv_0(images)
        x1 = net.down_1(x0)
        x2 = net.down_2(x1)
        x3 = net.down_3(x2)
        x4 = net.down_4(x3)
        u = net.upcat_4(x4, x3)
        u = net.upcat_3(u, x2)
        u = net.upcat_2(u, x1)
        return net.upcat_1(u, x0)
    down, inner = net.model[0], net.model[1]
    return inner(down(images))
