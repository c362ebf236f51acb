"""The convolutional backbone pretrained as a masked-input autoencoder (SimMIM / Models Genesis style).

The masked patches of the input are filled with a learned value per channel (starting at 0), the whole
MONAI UNet reconstructs the whole image, and only the masked patches count in the loss. A learned fill
rather than a fixed 0 because 0 can be a common intensity after normalisation (background), which would
make masked patches indistinguishable from dark ones.

The fill value's gradient is computed without an input-gradient pass through the first convolutions (see
`_FillGradient`): the plain UNet step never computes one, and it was the largest cost the masked step adds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from monai.networks.nets import BasicUNet, UNet
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


# Containers whose forward hands the network input to their children unchanged and uses it nowhere else (MONAI's
# UNet, BasicUNet, ResidualUnit, and Sequentials such as Convolution / TwoConv). If anything else reads the
# input, `input_convolutions` finds no fast path and the fill gets its gradient through the input as before.
_PASS_THROUGH = (nn.Sequential, UNet, BasicUNet, ResidualUnit)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def input_convolutions(net: nn.Module, example: Tensor) -> list[nn.Module]:
    """The convolutions that read the network's input, or [] unless they are its only readers.

    Found by running `example` through `net` (eval mode, no gradient) and recording the modules that receive the
    input tensor itself. Each must be a zero-padded, ungrouped convolution, or a pass-through container.
    """
    readers: list[nn.Module] = []

    def record(module: nn.Module, args: tuple) -> None:
        if args and args[0] is example:
            readers.append(module)

    handles = [m.register_forward_pre_hook(record) for m in net.modules()]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(example)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    convs = [m for m in readers if isinstance(m, _CONVS)]
    others = [m for m in readers if not isinstance(m, _CONVS)]
    supported = all(c.groups == 1 and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c in convs)
    if not convs or not supported or not all(isinstance(m, _PASS_THROUGH) and list(m.children()) for m in others):
        return []
    return convs


class _FillGradient(torch.autograd.Function):
    """Identity on the output of a convolution that reads the masked input; its backward adds the fill's gradient.

    The convolution is linear, so conv(where(m, fill, x)) = conv(where(m, 0, x)) + sum_c fill_c * conv_c(m)
    (conv_c: input channel c's weights, no bias), and d loss / d fill_c = <grad, conv_c(m)> =
    sum_{o, offset} weight[o, c, offset] * S[o, offset], where S is the weight gradient of a one-channel
    convolution of the pixel mask m: one weight-gradient pass over a one-channel input instead of the
    input-gradient pass over all output channels (about 9 against 29 ms per first convolution at batch 32,
    128 px, one thread).
    """

    @staticmethod
    def forward(ctx, out: Tensor, fill: Tensor, weight: Tensor, pixel_mask: Tensor, conv: nn.Module) -> Tensor:
        ctx.save_for_backward(weight, pixel_mask)
        ctx.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation))
        ctx.fill_dtype = fill.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, pixel_mask = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        one_channel = weight[:, :1].to(grad.dtype)  # only its shape and layout matter
        _, s, _ = torch.ops.aten.convolution_backward(
            grad, pixel_mask.to(grad.dtype), one_channel, None, stride, padding, dilation, False,
            [0] * len(stride), 1, [False, True, False],
        )
        fill_grad = (weight * s.to(weight.dtype)).sum(dim=[0, *range(2, weight.dim())])
        return grad, fill_grad.to(ctx.fill_dtype), None, None, None


def _fill_gradient_hook(conv: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
    # module-level, with the state on the convolution, so a deep copy of the model (HPM's teacher) hooks its own
    state = conv.__dict__.get("_ahm_fill")
    if state is None or not torch.is_grad_enabled():
        return None
    fill, pixel_mask = state
    return _FillGradient.apply(out, fill, conv.weight, pixel_mask, conv)


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
        example = torch.zeros(1, in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last)
        self._input_convs = input_convolutions(self.net, example)
        for conv in self._input_convs:
            conv._ahm_fill = None
            conv.register_forward_hook(_fill_gradient_hook)

    def pixel_mask(self, mask: Tensor) -> Tensor:
        """Patch mask [B, L] -> pixel mask [B, 1, H, W]."""
        b = mask.shape[0]
        gh, gw = self.grid
        p = self.patch_size
        return mask.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, p, gw, p).reshape(b, 1, gh * p, gw * p)

    def forward(self, images: Tensor, mask: Tensor) -> MIMOutput:
        self._check_input(images, mask)
        order, k = mask_order(mask)
        pix = self.pixel_mask(mask)
        fill = self.mask_value
        # the fill's gradient through the first convolutions' outputs (`_FillGradient`), not through the input
        fast_fill = bool(self._input_convs) and fill.requires_grad and torch.is_grad_enabled() and not images.requires_grad
        masked_input = torch.where(pix, (fill.detach() if fast_fill else fill).view(1, -1, 1, 1).to(images.dtype), images)
        masked_input = masked_input.contiguous(memory_format=torch.channels_last)
        if fast_fill:
            pixel_mask = pix.to(images.dtype, memory_format=torch.channels_last)
            for conv in self._input_convs:
                conv._ahm_fill = (fill, pixel_mask)
        try:
            reconstruction = self.net(masked_input)
        finally:
            for conv in self._input_convs:
                conv._ahm_fill = None
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
