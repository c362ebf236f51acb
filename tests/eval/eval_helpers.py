"""Tiny fine-tuning run directories for inference tests, built directly (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from ahm.config import FinetuneConfig, build_config, save_config
from ahm.io import write_json
from ahm.train.checkpoint import save_model_checkpoint

TINY_UNET = {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0}


def make_run(root: Path, in_channels: int = 1, num_classes: int = 2, image_size: int = 32, slice_axis: int = 2,
             seed: int = 0) -> Path:
    """A fine-tuning run directory holding an untrained tiny UNet segmenter and its config."""
    from ahm.models import build_segmenter

    cfg = build_config(FinetuneConfig, overrides={
        "data": {"image_size": image_size, "slice_axis": slice_axis}, "model": TINY_UNET, "segmenter": "unet",
        "train": {"accelerator": "cpu"},
    })
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    write_json(root / "run.json", {"kind": "finetune", "version": "test", "seed": seed, "created": "now"})
    torch.manual_seed(seed)
    model = build_segmenter("unet", cfg.model, image_size, in_channels, num_classes)
    with torch.no_grad():
        # A bias towards class 1 on bright pixels makes masks non-trivial without training.
        last = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
        last.bias.zero_()
    meta = {"segmenter": "unet", "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "slice_axis": slice_axis, "index_modality": None, "layout": "folder", "init": "none", "init_policy": None}
    save_model_checkpoint(root / "checkpoints" / "best.ckpt", model.state_dict(), meta, epoch=1, val_dice=0.5)
    return root


TINY_VIT = {"backbone": "vit", "patch_size": 16, "hidden_size": 32, "mlp_dim": 64, "num_layers": 12, "num_heads": 2}


def make_run_3d(root: Path, data: Path, num_classes: int = 2, crop: int = 16, seed: int = 0,
                segmenter: str = "unet") -> Path:
    """A fine-tuning run directory fine-tuned "on volumes" (data.spatial_dims 3, crop `crop`^3, 1.5 mm), holding an
    untrained tiny 3D segmenter (`segmenter` "unet" or "unetr") saved with the 3D checkpoint meta (spatial_dims,
    roi_size)."""
    from ahm.models import build_segmenter

    crop_size = [crop, crop, crop]
    cfg = build_config(FinetuneConfig, overrides={
        "data": {"path": str(data), "spatial_dims": 3, "spacing": [1.5, 1.5, 1.5], "crop_size": crop_size},
        "model": TINY_UNET if segmenter == "unet" else TINY_VIT, "segmenter": segmenter,
        "train": {"accelerator": "cpu"},
    })
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    write_json(root / "run.json", {"kind": "finetune", "version": "test", "seed": seed, "created": "now"})
    torch.manual_seed(seed)
    model = build_segmenter(segmenter, cfg.model, crop, 1, num_classes, spatial_dims=3)
    meta = {"segmenter": segmenter, "num_classes": num_classes, "in_channels": 1, "image_size": crop,
            "spatial_dims": 3, "roi_size": crop_size, "index_modality": "mri", "layout": "msd", "init": "none",
            "init_policy": None}
    save_model_checkpoint(root / "checkpoints" / "best.ckpt", model.state_dict(), meta, epoch=1, val_dice=0.5)
    return root
