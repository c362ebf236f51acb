"""ahm.models: the MIM models masking policies drive, and the segmenters they initialise (models/backbones/)."""

from ahm.models.backbones import (
    BACKBONES,
    Backbone,
    backbone_of_segmenter,
    build_mim_model,
    build_segmenter,
    get_backbone,
    register_backbone,
)
from ahm.models.mae import MAEViT
from ahm.models.mim import MIMModel, MIMOutput, patchify, unpatchify
from ahm.models.segmenter import encoder_param_groups, load_pretrained
from ahm.models.unet_mim import MaskedUNet

__all__ = [
    "BACKBONES",
    "Backbone",
    "MAEViT",
    "MIMModel",
    "MIMOutput",
    "MaskedUNet",
    "backbone_of_segmenter",
    "build_mim_model",
    "build_segmenter",
    "encoder_param_groups",
    "get_backbone",
    "load_pretrained",
    "patchify",
    "register_backbone",
    "unpatchify",
]
