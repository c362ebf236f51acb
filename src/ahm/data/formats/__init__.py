"""Readers for 2D images, masks and 3D volumes, one module per format family behind one registry.

Every reader turns any failure (missing, empty, truncated, corrupt, unsupported, oversized, NaN voxels) into an
`AhmError` whose message starts with the offending path. The functions here ask the registry which reader
handles a path (`Reader.handles`: its suffixes, or a folder for a DICOM series) and add the checks every format
shares; none of them knows a format by name.

Readers register when their module is imported, and every module of this package is imported here, so a new
format is one file; their `rank` fixes the order in which they are asked and named in messages.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import numpy as np

from ahm.data.formats.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    MAX_CHANNELS,
    ImageInfo,
    Reader,
    Volume,
    check_channels,
    check_file,
    check_label_values,
    registered,
    suffix_of,
)
from ahm.data.formats.dicom import DICOM_SUFFIXES
from ahm.data.formats.image import IMAGE_SUFFIXES
from ahm.data.formats.itk import ITK_SUFFIXES, detached_data_files
from ahm.data.formats.nifti import NIFTI_SUFFIXES
from ahm.errors import AhmError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")  # registers its readers

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VOXELS",
    "DICOM_SUFFIXES",
    "HEADER_KIND_SUFFIXES",
    "IMAGE_SUFFIXES",
    "ITK_SUFFIXES",
    "MAX_CHANNELS",
    "NIFTI_SUFFIXES",
    "ImageInfo",
    "Reader",
    "Volume",
    "count_slices",
    "detached_data_files",
    "image_pixel_size",
    "is_volume_file",
    "read_image",
    "read_image_info",
    "read_label_volume",
    "read_mask",
    "read_volume",
    "read_volume_info",
    "volume_spacing_problem",
]

# Files that hold a 2D image or a volume, which of the two their header says (frames, slices).
HEADER_KIND_SUFFIXES = tuple(s for r in registered() if r.reads_images and r.reads_volumes for s in r.suffixes)


def _image_reader(path: Path) -> Reader | None:
    return next((r for r in registered() if r.reads_images and r.handles(path)), None)


def _volume_reader(path: Path) -> Reader | None:
    return next((r for r in registered() if r.reads_volumes and r.handles(path)), None)


def _image_suffixes() -> tuple[str, ...]:
    return tuple(s for r in registered() if r.reads_images for s in r.suffixes)


def _volume_kinds() -> str:
    kinds = [r.volume_kinds for r in registered() if r.reads_volumes]
    return ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else "".join(kinds)


def _open_volume(path: Path) -> Reader:
    if not path.is_dir() and not path.exists():
        raise AhmError(f"{path}: file not found")
    reader = _volume_reader(path)
    if reader is None:
        raise AhmError(f"{path}: unsupported volume type; expected {_volume_kinds()}")
    return reader


# --------------------------------------------------------------------------------------------------- 2D


def _read_pixels(path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
    check_file(path)
    reader = _image_reader(path)
    if reader is None:
        suffix = suffix_of(path)
        raise AhmError(
            f"{path}: unsupported image type {suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(_image_suffixes())}"
        )
    arr, source = reader.read_pixels(path, max_pixels, as_mask)
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise AhmError(f"{path}: image has no pixels (shape {arr.shape})")
    check_channels(path, arr.shape[0])
    return arr, source


def read_image_info(path: str | os.PathLike, max_pixels: int | None = None) -> ImageInfo:
    """Height, width, channels and stored sample type of a 2D image, from its header only.

    `channels` is what `read_image` will return (RGBA counts 3, a grey palette 1).
    """
    path = Path(path)
    check_file(path)
    limit = max_pixels if max_pixels is not None else 2**62
    reader = _image_reader(path)
    if reader is None:
        suffix = suffix_of(path)
        raise AhmError(f"{path}: unsupported image type {suffix or '(no suffix)'!r}")
    return reader.image_info(path, limit)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a 2D image as float32 [C, H, W], values as stored (no scaling).

    PNG, JPEG, BMP, GIF, WebP via Pillow; TIFF via tifffile (8/16-bit, float, multi-channel); a one-frame
    DICOM file via pydicom (any transfer syntax its plugins decode) with its header applied: rescale or
    modality LUT, VOI LUT or window (not for CT, MR, PET, NM, whose values stay calibrated), MONOCHROME1
    inverted, YBR and palette colour as RGB; a 2D NRRD/MetaImage via SimpleITK (H along y). RGBA drops
    alpha, a palette image becomes its colours (one channel if the palette is grey). Only the first
    page/frame of a multi-page TIFF or animated image is read (channel pages of an ImageJ/OME hyperstack
    are kept as channels). Pillow reads 16-bit colour PNGs as 8-bit; 16-bit grey PNGs keep 16 bits.
    Images with more than `max_pixels` pixels are refused from the header, before decoding.
    """
    path = Path(path)
    arr, _ = _read_pixels(path, max_pixels, as_mask=False)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise AhmError(f"{path}: contains NaN or infinite pixel values")
    return out


def read_mask(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, threshold: float | None = None
) -> np.ndarray:
    """Read a label map as int64 [H, W].

    A colour mask whose channels are equal collapses to one channel; a palette mask gives its indices;
    a mask whose only values are {0, 255} becomes {0, 1}. With `threshold` (for lossy JPEG masks) the
    channel mean is binarised: value >= threshold -> 1, else 0. Non-integral, negative or NaN values and
    colour masks with differing channels are refused.
    """
    path = Path(path)
    arr, _ = _read_pixels(path, max_pixels, as_mask=True)
    if threshold is not None:
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise AhmError(f"{path}: mask contains NaN or infinite values")
        gray = arr.astype(np.float64).mean(axis=0)
        return (gray >= threshold).astype(np.int64)
    if arr.shape[0] > 1 and not (arr == arr[:1]).all():
        raise AhmError(
            f"{path}: mask has {arr.shape[0]} channels with different values; expected a single-channel "
            "label map (grey, palette, or colour with equal channels)"
        )
    mask = arr[0]
    check_label_values(path, mask, "mask", "values")
    mask = mask.astype(np.int64)
    values = np.unique(mask)
    if values.size and values.max() == 255 and np.isin(values, (0, 255)).all():
        mask = mask // 255  # 0/255 binary masks, the usual export of drawing tools
    return np.ascontiguousarray(mask)


def image_pixel_size(path: str | os.PathLike) -> tuple[float, float] | None:
    """(between rows, between columns) in mm of a 2D image file, from its header, where it records one: a DICOM
    file's PixelSpacing, a 2D NRRD/MetaImage's voxel size. None otherwise: PNG, JPEG, TIFF, BMP (a dpi field is
    no physical pixel size), a DICOM file without PixelSpacing > 0, a NRRD/MetaImage header without a spacing
    (ITK would invent 1 mm)."""
    path = Path(path)
    reader = _image_reader(path)
    return None if reader is None else reader.pixel_size(path)


# -------------------------------------------------------------------------------------------- volumes


def is_volume_file(path: str | os.PathLike) -> bool:
    """Whether a file is read as a volume (NIfTI; multi-frame DICOM; NRRD/MetaImage of several slices) or as a
    2D image (everything else), from its name and, for DICOM and NRRD/MetaImage, its header."""
    path = Path(path)
    reader = next((r for r in registered() if r.handles(path)), None)
    return reader is not None and reader.is_volume(path)


def volume_spacing_problem(path: str | os.PathLike) -> str | None:
    """Why a volume cannot be resampled in 3D (one line naming it), from its header(s); None when it can.

    A 2D file (one frame, one slice) has no slice spacing. A DICOM series or multi-frame file needs
    PixelSpacing > 0 and a slice step (distinct first and last ImagePositionPatient, SpacingBetweenSlices or
    SliceThickness > 0): without them the reader puts an invented 1 mm in the affine, which the 2D path may
    use (it never resamples) but 3D resampling must not. The same holds for a NRRD header without 'space
    directions' or 'spacings' and a MetaImage header without ElementSpacing (ITK assumes 1 mm). NIfTI always
    stores a voxel size and is taken as it is.
    """
    path = Path(path)
    reader = _volume_reader(path)
    if reader is None or not reader.is_volume(path):
        return f"{path}: a 2D image has no slice spacing; data.spatial_dims 3 needs a volume"
    return reader.spacing_problem(path)


def read_volume(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a volume as float32: NIfTI (.nii, .nii.gz), a DICOM file (its frames), NRRD/MetaImage (.nrrd,
    .nhdr, .mha, .mhd; a 2D file is one slice), or a folder holding one DICOM series.

    Data is [X, Y, Z] or [X, Y, Z, C] with scaling applied (NIfTI scl_slope/inter, DICOM rescale
    slope/intercept or modality LUT, MONOCHROME1 inverted); `affine` maps voxel indices to RAS+ millimetres.
    DICOM slices are ordered by their position along the slice normal (InstanceNumber, then file name, when
    positions are missing). Sizes are checked from the header before decoding.
    """
    path = Path(path)
    return _open_volume(path).read_volume(path, max_voxels, labels=False)


def read_label_volume(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a label volume [X, Y, Z] with integer data (uint8 when labels fit, else int32/int64).

    Non-integral, negative, NaN/inf values or a multi-channel volume are refused.
    """
    path = Path(path)
    return _open_volume(path).read_volume(path, max_voxels, labels=True)


def read_volume_info(path: str | os.PathLike) -> tuple[tuple[int, int, int], int]:
    """Spatial shape [X, Y, Z] and channel count of a volume, from its header(s) only (what `read_volume`
    would return). Raw NIfTI and NRRD/MetaImage data shorter than the header declares is refused here too."""
    path = Path(path)
    return _open_volume(path).volume_info(path)


def count_slices(path: str | os.PathLike, axis: int) -> int:
    """Number of slices along `axis`, from headers only (NIfTI, DICOM, NRRD/MetaImage headers; a DICOM
    series: its slice files, or rows/columns)."""
    path = Path(path)
    if axis not in (0, 1, 2):
        raise AhmError(f"{path}: slice axis must be 0, 1 or 2, got {axis}")
    return _open_volume(path).count_slices(path, axis)
