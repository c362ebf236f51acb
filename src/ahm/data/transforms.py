"""Augmentations for pretraining and fine-tuning, built from MONAI dictionary transforms.

They work on `{"image": Tensor[C, S, S] float, "label": Tensor[1, S, S] long (optional)}` and return the
same keys, shapes and dtypes as plain tensors. Every random draw comes from the transform's own state:
`aug.set_random_state(seed=...)` before a call makes that call exactly reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
    SpatialPadd,
)

from ahm.errors import AhmError

IMAGE, LABEL = "image", "label"


class AsPlainTensors(MapTransform):
    """Drop MONAI metadata and give labels back their integer type (resizing works in float).

    `drop_label_channel`: labels come out [*spatial] instead of [1, *spatial] (the 3D crops; the 2D dataset
    drops the channel itself).
    """

    def __init__(self, drop_label_channel: bool = False) -> None:
        super().__init__(keys=[IMAGE, LABEL], allow_missing_keys=True)
        self.drop_label_channel = drop_label_channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            value = out[key]
            if hasattr(value, "as_tensor"):
                value = value.as_tensor()
            value = torch.as_tensor(value)
            if key == LABEL:
                out[key] = torch.round(value[0] if self.drop_label_channel else value).long()
            else:
                out[key] = value.float()
        return out


def _check_size(image_size: int) -> int:
    image_size = int(image_size)
    if image_size < 2:
        raise AhmError(f"image_size: must be at least 2 for augmentation, got {image_size}")
    return image_size


def _random_resized_crop(keys: list[str], image_size: int, min_area: float, modes: list[str]) -> list:
    # Each side is drawn from [sqrt(min_area), 1] * size, so the crop keeps between min_area and all of the
    # image (like torchvision's RandomResizedCrop), then is resized back to the training size.
    min_side = max(1, math.ceil(image_size * math.sqrt(min_area)))
    return [
        RandSpatialCropd(
            keys=keys,
            roi_size=(min_side, min_side),
            max_roi_size=(image_size, image_size),
            random_center=True,
            random_size=True,
            allow_missing_keys=True,
        ),
        Resized(keys=keys, spatial_size=(image_size, image_size), mode=modes, allow_missing_keys=True),
    ]


def pretrain_augment(image_size: int) -> Compose:
    """Random resized crop (area 0.5-1) back to `image_size`, horizontal/vertical flips, intensity
    scale/shift jitter. Seed with `.set_random_state(seed=...)`."""
    size = _check_size(image_size)
    keys = [IMAGE]
    return Compose(
        _random_resized_crop(keys, size, 0.5, ["bilinear"])
        + [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandScaleIntensityd(keys=keys, factors=0.1, prob=0.8),
            RandShiftIntensityd(keys=keys, offsets=0.1, prob=0.8),
            AsPlainTensors(),
        ]
    )


def segment_augment(
    image_size: int,
    min_crop_area: float = 1.0,
    rotate_deg: float = 0.0,
    intensity_jitter: float = 0.0,
    gamma: float = 0.0,
    bias_field: float = 0.0,
    *,
    crop_size: int | None = None,
    pad: bool = True,
) -> Compose:
    """Spatial augmentation applied identically to image and label (nearest for the label, so label
    values are never blended): random rotation by up to +-`rotate_deg` degrees (half of the time; 0 turns it
    off), random resized crop (area `min_crop_area`-1; 1 turns it off), random crop of `crop_size` x `crop_size`
    pixels without any resampling (None turns it off; with `pad` it is zero-padded back to `image_size`, else
    the sample keeps the crop's size), flips; then, on the image only, simulated acquisition changes, each half
    of the time and 0 turning it off: a gamma drawn in [1/(1+`gamma`), 1+`gamma`] (MONAI's contrast adjustment,
    on each image's own min-max range), a smooth multiplicative bias field (MONAI's degree-3 Legendre field, its
    coefficients drawn in [-`bias_field`, `bias_field`]; zero background stays zero), and a random intensity
    scale and shift of up to +-`intensity_jitter`. The label key is optional. Seed with
    `.set_random_state(seed=...)`."""
    size = _check_size(image_size)
    if not 0.0 < min_crop_area <= 1.0:
        raise AhmError(f"min_crop_area: must be in (0, 1], got {min_crop_area}")
    if not 0.0 <= rotate_deg <= 180.0:
        raise AhmError(f"rotate_deg: must be in [0, 180], got {rotate_deg}")
    if not 0.0 <= intensity_jitter < 1.0:
        raise AhmError(f"intensity_jitter: must be in [0, 1), got {intensity_jitter}")
    if not 0.0 <= gamma <= 4.0:
        raise AhmError(f"gamma: must be in [0, 4], got {gamma}")
    if not 0.0 <= bias_field <= 1.0:
        raise AhmError(f"bias_field: must be in [0, 1], got {bias_field}")
    if crop_size is not None and not 1 <= crop_size <= size:
        raise AhmError(f"crop size: must be in [1, {size}] pixels, got {crop_size}")
    keys = [IMAGE, LABEL]
    rotate = [
        RandRotated(keys=keys, range_x=math.radians(rotate_deg), prob=0.5, mode=["bilinear", "nearest"],
                    padding_mode="zeros", keep_size=True, allow_missing_keys=True)
    ] if rotate_deg > 0 else []
    crop = _random_resized_crop(keys, size, min_crop_area, ["bilinear", "nearest"]) if min_crop_area < 1 else []
    if crop_size is not None and crop_size < size:
        crop.append(RandSpatialCropd(keys=keys, roi_size=(crop_size, crop_size), random_size=False,
                                     allow_missing_keys=True))
        if pad:
            crop.append(SpatialPadd(keys=keys, spatial_size=(size, size), mode="constant", allow_missing_keys=True))
    acquisition = ([RandAdjustContrastd(keys=[IMAGE], gamma=(1.0 / (1.0 + gamma), 1.0 + gamma), prob=0.5)]
                   if gamma > 0 else [])
    acquisition += ([RandBiasFieldd(keys=[IMAGE], degree=3, coeff_range=(-bias_field, bias_field), prob=0.5)]
                    if bias_field > 0 else [])
    jitter = [
        RandScaleIntensityd(keys=[IMAGE], factors=intensity_jitter, prob=0.5),
        RandShiftIntensityd(keys=[IMAGE], offsets=intensity_jitter, prob=0.5),
    ] if intensity_jitter > 0 else []
    return Compose(
        rotate
        + crop
        + [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
        ]
        + acquisition
        + jitter
        + [AsPlainTensors()]
    )
