"""Backbones by name: one file each, registered here; callers ask the backbone, never branch on its name.

    bb = get_backbone(cfg.model.backbone)          # pretraining side ("vit", "unet")
    bb = backbone_of_segmenter(cfg.segmenter)       # fine-tuning side ("unetr", "unet")
    mim = build_mim_model(model_cfg, image_size, in_channels, spatial_dims=2)
    seg = build_segmenter("unetr", model_cfg, image_size, in_channels, num_classes, spatial_dims=2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ahm.errors import AhmError
from ahm.models.backbones.base import Backbone
from ahm.models.mim import MIMModel, check_image_size

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig

BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    """Add `backbone` under its name (replacing one of the same name); returns it."""
    if not backbone.name or not backbone.segmenter:
        raise ValueError("a backbone needs a name and a segmenter name")
    BACKBONES[backbone.name] = backbone
    return backbone


def backbone_names() -> list[str]:
    return list(BACKBONES)


def segmenter_names() -> list[str]:
    return [b.segmenter for b in BACKBONES.values()]


def get_backbone(name: str) -> Backbone:
    """The backbone registered as `name` (`model.backbone`); AhmError naming the choices otherwise."""
    if name not in BACKBONES:
        raise AhmError(f"model backbone {name!r} is not known; choose {' or '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_of_segmenter(segmenter: str) -> Backbone:
    """The backbone whose segmenter is `segmenter` (`segmenter` of a fine-tuning config)."""
    for backbone in BACKBONES.values():
        if backbone.segmenter == segmenter:
            return backbone
    raise AhmError(f"segmenter {segmenter!r} (--segmenter, or segmenter: in a config) is not known; choose one of "
                   f"{', '.join(segmenter_names())}")


def segmenter_of_backbone() -> dict[str, str]:
    """{backbone name: the segmenter its encoder is fine-tuned as}."""
    return {name: b.segmenter for name, b in BACKBONES.items()}


def build_mim_model(model_cfg: ModelConfig, image_size: int, in_channels: int, spatial_dims: int = 2) -> MIMModel:
    """The MIM model of `model_cfg.backbone` ("vit": MAEViT, "unet": MaskedUNet)."""
    if in_channels < 1:
        raise AhmError(f"--channels must be at least 1, got {in_channels}")
    check_image_size(image_size, model_cfg.patch_size)
    return get_backbone(model_cfg.backbone).build_mim_model(model_cfg, image_size, in_channels, spatial_dims)


def build_segmenter(kind: str, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int,
                    spatial_dims: int = 2) -> nn.Module:
    """The segmenter `kind` ("unetr": UNETR from the ViT sizes, "unet": the MIM UNet's layout), `num_classes` out."""
    backbone = backbone_of_segmenter(kind)
    if num_classes < 1:
        raise AhmError(f"--num-classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise AhmError(f"--channels must be at least 1, got {in_channels}")
    return backbone.build_segmenter(model_cfg, image_size, in_channels, num_classes, spatial_dims)


def _register_builtin() -> None:
    from ahm.models.backbones.nnunet import NnunetBackbone
    from ahm.models.backbones.unet import UNetBackbone
    from ahm.models.backbones.vit import ViTBackbone

    register_backbone(ViTBackbone())
    register_backbone(UNetBackbone())
    register_backbone(NnunetBackbone())


_register_builtin()

__all__ = [
    "BACKBONES",
    "Backbone",
    "backbone_names",
    "backbone_of_segmenter",
    "build_mim_model",
    "build_segmenter",
    "get_backbone",
    "register_backbone",
    "segmenter_names",
    "segmenter_of_backbone",
]
