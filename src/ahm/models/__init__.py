"""ahm.models: the MIM models masking policies drive, and the segmenters they initialise."""

from ahm.models.mae import MAEViT, MIMModel, MIMOutput, build_mim_model, patchify, unpatchify
from ahm.models.segmenter import build_segmenter, encoder_param_groups, load_pretrained
from ahm.models.unet_mim import MaskedUNet

__all__ = [
    "MAEViT",
    "MIMModel",
    "MIMOutput",
    "MaskedUNet",
    "build_mim_model",
    "build_segmenter",
    "encoder_param_groups",
    "load_pretrained",
    "patchify",
    "unpatchify",
]
