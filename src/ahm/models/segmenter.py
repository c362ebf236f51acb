"""Segmenters that start from a pretrained MIM backbone: MONAI UNETR (ViT encoder) or MONAI UNet.

seg = build_segmenter("unetr", model_cfg, image_size, in_channels, num_classes)
summary = load_pretrained(seg, "unetr", weights, metadata)      # weights/metadata from export_encoder()
groups = encoder_param_groups(seg, "unetr", lr, encoder_lr_scale, layer_decay)   # for AdamW
"""

from __future__ import annotations

import math
from typing import Any

from monai.networks.nets import UNETR
from torch import Tensor, nn

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models.mae import freeze_unused_norms
from ahm.models.norm import conv_norm, fast_instance_norms
from ahm.models.unet_nets import build_unet_network, head_prefix

SEGMENTERS = ("unetr", "unet")
_BACKBONE_OF = {"unetr": "vit", "unet": "unet"}
UNETR_PATCH_SIZE = 16  # fixed inside MONAI's UNETR
UNETR_NUM_LAYERS = 12  # UNETR taps blocks 3, 6, 9 and 12


def _check_kind(kind: str) -> None:
    if kind not in SEGMENTERS:
        raise AhmError(f"--segmenter {kind!r} is not known; choose one of {', '.join(SEGMENTERS)}")


def build_segmenter(
    kind: str, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int
) -> nn.Module:
    """A 2D UNETR (ViT sizes from `model_cfg`) or UNet (the MIM UNet's layout) with `num_classes` outputs."""
    _check_kind(kind)
    if num_classes < 1:
        raise AhmError(f"--num-classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise AhmError(f"--channels must be at least 1, got {in_channels}")
    if kind == "unet":
        factor = math.prod(model_cfg.unet_strides)
        if image_size % factor:
            raise AhmError(
                f"--image-size {image_size} is not divisible by {factor}, the product of model.unet_strides "
                f"{tuple(model_cfg.unet_strides)}"
            )
        unet = build_unet_network(model_cfg, in_channels, num_classes)
        fast_instance_norms(unet)
        return unet
    if model_cfg.patch_size != UNETR_PATCH_SIZE:
        raise AhmError(
            f"--patch-size {model_cfg.patch_size} cannot be used with --segmenter unetr: MONAI's UNETR "
            f"always cuts {UNETR_PATCH_SIZE}x{UNETR_PATCH_SIZE} patches; pretrain with --patch-size 16 "
            f"or fine-tune --segmenter unet"
        )
    dims = model_cfg.vit_dims()
    if dims["num_layers"] != UNETR_NUM_LAYERS:
        raise AhmError(
            f"model num_layers {dims['num_layers']} cannot be used with --segmenter unetr: MONAI's UNETR has "
            f"exactly {UNETR_NUM_LAYERS} transformer blocks"
        )
    if image_size % UNETR_PATCH_SIZE:
        raise AhmError(
            f"--image-size {image_size} must be a multiple of {UNETR_PATCH_SIZE} for --segmenter unetr"
        )
    net = UNETR(
        in_channels=in_channels,
        out_channels=num_classes,
        img_size=image_size,
        feature_size=16,
        hidden_size=dims["hidden_size"],
        mlp_dim=dims["mlp_dim"],
        num_heads=dims["num_heads"],
        norm_name=model_cfg.norm,
        spatial_dims=2,
    )
    # MONAI reads this flag only in forward: attention goes through SDPA, the weights and keys stay the same
    for block in net.vit.blocks:
        block.attn.use_flash_attention = True
    freeze_unused_norms(net)
    fast_instance_norms(net)
    return net


def _unetr_metadata(seg: nn.Module) -> dict[str, str]:
    vit = seg.vit
    conv = vit.patch_embedding.patch_embeddings
    block = vit.blocks[0]
    return {
        "hidden_size": str(conv.out_channels),
        "mlp_dim": str(block.mlp.linear1.out_features),
        "num_layers": str(len(vit.blocks)),
        "num_heads": str(block.attn.num_heads),
        "patch_size": str(conv.kernel_size[0]),
        "image_size": str(seg.feat_size[0] * conv.kernel_size[0]),
        "in_channels": str(conv.in_channels),
    }


def _unet_metadata(seg: nn.Module) -> dict[str, str]:
    # image size is not compared: convolution weights fit any image size the strides divide
    return {
        "unet_channels": ",".join(str(c) for c in seg.channels),
        "unet_strides": ",".join(str(s) for s in seg.strides),
        "unet_num_res_units": str(seg.num_res_units),
        "in_channels": str(seg.in_channels),
        "norm": conv_norm(seg),
        "unet_network": getattr(seg, "network", "unet"),
    }


def _head_prefix(seg: nn.Module) -> str:
    return head_prefix(seg)


def load_pretrained(
    segmenter: nn.Module, kind: str, weights: dict[str, Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Load pretrained backbone weights: strictly into `segmenter.vit` (UNETR), or every UNet weight but the
    final up-sampling block, which the segmenter gets new (its output is classes, not pixels).

    Returns {"loaded": number of tensors loaded, "skipped": keys left at their fresh initialisation}.
    AhmError, naming metadata["path"] when given, if the backbone, sizes, image size or channels differ.
    """
    _check_kind(kind)
    source = metadata.get("path", "pretrained encoder")
    need = _BACKBONE_OF[kind]
    got = metadata.get("backbone")
    if got != need:
        raise AhmError(
            f"{source}: encoder was pretrained with backbone {got!r}, "
            f"but --segmenter {kind} needs a {need!r} encoder"
        )
    expected = _unetr_metadata(segmenter) if kind == "unetr" else _unet_metadata(segmenter)
    for key, value in expected.items():
        # encoders saved before the norm option existed were all instance-normalised
        got_value = metadata.get(key, {"norm": "instance", "unet_network": "unet"}.get(key))
        if got_value != value:
            if key == "norm":
                raise AhmError(
                    f"{source}: encoder was pretrained with {got_value} norm but the segmenter has {value} norm; "
                    f"fine-tune with the pretraining run's model settings (model.norm: {got_value})"
                )
            raise AhmError(
                f"{source}: encoder has {key}={got_value!r} but the segmenter needs {key}={value!r}; "
                f"fine-tune with the pretraining run's model and data settings"
            )
    if kind == "unetr":
        try:
            segmenter.vit.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise AhmError(
                f"{source}: weights do not fit the UNETR encoder ({str(exc).splitlines()[0]})"
            ) from exc
        return {"loaded": len(weights), "skipped": []}

    head = _head_prefix(segmenter)
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
    segmenter.load_state_dict({k: weights[k] for k in body}, strict=False)
    return {"loaded": len(body), "skipped": sorted(k for k in target if k.startswith(head))}


def encoder_param_groups(
    segmenter: nn.Module, kind: str, base_lr: float, encoder_lr_scale: float = 1.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups: pretrained weights at base_lr * encoder_lr_scale, new layers at base_lr.

    UNETR: layer-wise decay over the ViT, block i (0-based) at base*scale*decay**(num_layers - i), the patch
    embedding one step further (decay**(num_layers + 1)), the final norm at base*scale, the decoder at base.
    UNet: every layer but the final up-sampling block is pretrained.
    Each group has a "name" for logging and "pretrained" (False only for the new layers).
    """
    _check_kind(kind)
    groups: list[dict[str, Any]] = []

    def add(name: str, params: list[nn.Parameter], lr: float, pretrained: bool = True) -> None:
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lr, "pretrained": pretrained})

    encoder_lr = base_lr * encoder_lr_scale
    if kind == "unetr":
        vit = segmenter.vit
        depth = len(vit.blocks)
        add(
            "vit.patch_embedding",
            list(vit.patch_embedding.parameters()),
            encoder_lr * layer_decay ** (depth + 1),
        )
        for i, block in enumerate(vit.blocks):
            add(f"vit.blocks.{i}", list(block.parameters()), encoder_lr * layer_decay ** (depth - i))
        add("vit.norm", list(vit.norm.parameters()), encoder_lr)
        in_vit = {id(p) for p in vit.parameters()}
        add("decoder", [p for p in segmenter.parameters() if id(p) not in in_vit], base_lr, pretrained=False)
        return groups

    head = _head_prefix(segmenter)
    named = list(segmenter.named_parameters())
    add("unet.pretrained", [p for n, p in named if not n.startswith(head)], encoder_lr)
    add("unet.head", [p for n, p in named if n.startswith(head)], base_lr, pretrained=False)
    return groups
