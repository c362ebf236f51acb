"""Segmenters that start from a pretrained MIM backbone, named by their `segmenter` value ("unetr", "unet").

seg = build_segmenter("unetr", model_cfg, image_size, in_channels, num_classes)
summary = load_pretrained(seg, "unetr", weights, metadata)      # weights/metadata from export_encoder()
groups = encoder_param_groups(seg, "unetr", lr, encoder_lr_scale, layer_decay)   # for AdamW

Each is the segmenter's backbone (models/backbones/) asked by name, so a registered backbone works here unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ahm.models.backbones import backbone_of_segmenter, build_segmenter

__all__ = ["build_segmenter", "encoder_param_groups", "load_pretrained"]


def load_pretrained(
    segmenter: nn.Module, kind: str, weights: dict[str, Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Load pretrained backbone weights strictly (UNETR: into `segmenter.vit`; UNet: every weight but the new last
    layer). Returns {"loaded": number of tensors loaded, "skipped": keys left at their fresh initialisation}.
    AhmError, naming metadata["path"] when given, if the backbone, sizes, image size or channels differ.
    """
    return backbone_of_segmenter(kind).load_pretrained(segmenter, weights, metadata)


def encoder_param_groups(
    segmenter: nn.Module, kind: str, base_lr: float, encoder_lr_scale: float = 1.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups: pretrained weights at base_lr * encoder_lr_scale, new layers at base_lr (UNETR with
    layer-wise decay over the ViT). Each group has a "name" for logging and "pretrained" (False for new layers)."""
    return backbone_of_segmenter(kind).param_groups(segmenter, base_lr, encoder_lr_scale, layer_decay)
