"""ahm.data: read images and volumes (`formats`), find them in a dataset's layout, split by subject, feed torch.

Names are imported on first use, so `ahm data check` does not pay for torch and MONAI at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # formats
    "Volume": "formats",
    "ImageInfo": "formats",
    "read_image": "formats",
    "read_image_info": "formats",
    "read_mask": "formats",
    "read_volume": "formats",
    "read_label_volume": "formats",
    "count_slices": "formats",
    # preprocess
    "volume_slice": "preprocess",
    "normalize": "preprocess",
    "resize_image": "preprocess",
    "resize_mask": "preprocess",
    "undo_resize": "preprocess",
    # transforms
    "pretrain_augment": "transforms",
    "segment_augment": "transforms",
    # layouts
    "LAYOUTS": "layouts",
    "Item": "layouts",
    "DatasetIndex": "layouts",
    "open_dataset": "layouts",
    "detect_layout": "layouts",
    "read_splits_file": "layouts",
    # volumes (data.spatial_dims 3)
    "VolumeDataset": "volumes",
    "check_crop": "volumes",
    "evaluation_loader": "volumes",
    "input_grid": "volumes",
    "invert_prediction": "volumes",
    "preprocess_volumes": "volumes",
    "preprocessed_spacing": "volumes",
    "volume_dataset": "volumes",
    "volume_modality": "volumes",
    "volume_pretrain_augment": "volumes",
    "volume_segment_augment": "volumes",
    # splits
    "make_splits": "splits",
    "label_subset": "splits",
    # dataset
    "Arrays": "dataset",
    "ArrayDataset": "dataset",
    "load_arrays": "dataset",
    "read_item": "dataset",
    "sample_seed": "dataset",
    # check
    "CheckReport": "check",
    "check_dataset": "check",
    "format_report": "check",
}

__all__ = [
    "LAYOUTS",
    "ArrayDataset",
    "Arrays",
    "CheckReport",
    "DatasetIndex",
    "ImageInfo",
    "Item",
    "Volume",
    "VolumeDataset",
    "check_crop",
    "check_dataset",
    "count_slices",
    "detect_layout",
    "evaluation_loader",
    "format_report",
    "input_grid",
    "invert_prediction",
    "label_subset",
    "load_arrays",
    "make_splits",
    "normalize",
    "open_dataset",
    "preprocess_volumes",
    "preprocessed_spacing",
    "pretrain_augment",
    "read_image",
    "read_image_info",
    "read_item",
    "read_label_volume",
    "read_mask",
    "read_splits_file",
    "read_volume",
    "resize_image",
    "resize_mask",
    "sample_seed",
    "segment_augment",
    "undo_resize",
    "volume_dataset",
    "volume_modality",
    "volume_pretrain_augment",
    "volume_segment_augment",
    "volume_slice",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ahm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ahm.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from ahm.data.check import CheckReport, check_dataset, format_report
    from ahm.data.dataset import ArrayDataset, Arrays, load_arrays, read_item, sample_seed
    from ahm.data.formats import (
        ImageInfo,
        Volume,
        count_slices,
        read_image,
        read_image_info,
        read_label_volume,
        read_mask,
        read_volume,
    )
    from ahm.data.layouts import LAYOUTS, DatasetIndex, Item, detect_layout, open_dataset, read_splits_file
    from ahm.data.preprocess import normalize, resize_image, resize_mask, undo_resize, volume_slice
    from ahm.data.splits import label_subset, make_splits
    from ahm.data.transforms import pretrain_augment, segment_augment
    from ahm.data.volumes import (
        VolumeDataset,
        check_crop,
        evaluation_loader,
        input_grid,
        invert_prediction,
        preprocess_volumes,
        preprocessed_spacing,
        volume_dataset,
        volume_modality,
        volume_pretrain_augment,
        volume_segment_augment,
    )
