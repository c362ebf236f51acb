"""NIfTI volumes (.nii, .nii.gz) through nibabel, with their scaling (scl_slope/inter) and spatial unit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ahm.data.formats.base import (
    Reader,
    Volume,
    VoxelSizes,
    affine_or_identity,
    check_file,
    check_numeric,
    describe_error,
    image_voxels,
    known_sizes,
    label_voxels,
    register,
    suffix_of,
)
from ahm.errors import AhmError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_open(path: Path, max_voxels: int, check_size: bool = True):
    import nibabel as nib

    check_file(path)
    try:
        img: Any = nib.load(str(path), mmap=False)  # a Nifti1Image; nibabel types it as the base class
        shape = tuple(int(s) for s in img.shape)
        header = img.header
        dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:
        raise AhmError(f"{path}: not a readable NIfTI file ({describe_error(exc)})") from exc
    shape = _nifti_shape(path, shape)
    if dtype.kind not in "uifb" or dtype.fields is not None:
        raise AhmError(f"{path}: unsupported voxel type {dtype} (expected integers or real numbers)")
    n_vox = int(np.prod(shape, dtype=np.float64))
    if n_vox > max_voxels:
        raise AhmError(f"{path}: volume of shape {shape} has {n_vox} voxels, above the limit of {max_voxels}")
    if check_size and suffix_of(path) == ".nii":
        try:
            needed = int(header.get_data_offset()) + n_vox * dtype.itemsize
        except Exception as exc:
            raise AhmError(f"{path}: not a readable NIfTI file ({describe_error(exc)})") from exc
        if path.stat().st_size < needed:
            raise AhmError(
                f"{path}: truncated NIfTI file ({path.stat().st_size} bytes, header needs {needed})"
            )
    return img, shape


def _nifti_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 5 and shape[3] == 1:  # NIfTI puts vector components in dim 5 after a unit time dim
        shape = shape[:3] + shape[4:]
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) not in (3, 4) or min(shape) <= 0:
        raise AhmError(f"{path}: expected a 3D or 4D volume, the header says shape {shape}")
    return shape


def _nifti_data(path: Path, img, shape: tuple[int, ...]) -> np.ndarray:
    try:
        data = np.asarray(img.dataobj)
    except MemoryError as exc:
        raise AhmError(f"{path}: not enough memory to read the volume") from exc
    except Exception as exc:
        raise AhmError(f"{path}: truncated or unreadable NIfTI data ({describe_error(exc)})") from exc
    data = check_numeric(path, data)
    return data.reshape(shape)


def _nifti_geometry(img) -> tuple[np.ndarray, VoxelSizes]:
    """Affine and voxel sizes of a NIfTI image: it always stores a voxel size (a missing affine: none known), in
    the header's spatial unit (`xyzt_units`: metres and microns are converted to mm; unknown is taken as mm, as
    nibabel and ITK do)."""
    affine = affine_or_identity(img.affine)
    known = img.affine is not None and np.isfinite(np.asarray(img.affine, dtype=np.float64)).all()
    sizes = known_sizes(affine, (known, known, known))
    units = getattr(img.header, "get_xyzt_units", None)  # NIfTI-1 and -2 headers have it
    unit = units()[0] if units is not None else "unknown"
    scale = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)
    return affine, tuple(None if v is None else v * scale for v in sizes)  # type: ignore[return-value]


@register
class NiftiReader(Reader):
    """Always a volume; it always stores a voxel size, taken as it is (nibabel itself turns a zero pixdim into
    1 mm when reading, so a zero there cannot be seen from here)."""

    name = "nifti"
    rank = 30
    suffixes = NIFTI_SUFFIXES
    reads_volumes = True
    volume_kinds = ".nii, .nii.gz"

    def is_volume(self, path: Path) -> bool:
        return True

    def read_volume(self, path: Path, max_voxels: int, labels: bool) -> Volume:
        img, shape = _nifti_open(path, max_voxels)
        data = _nifti_data(path, img, shape)
        if labels:
            affine, voxel_mm = _nifti_geometry(img)
            return Volume(label_voxels(path, data), affine, path, voxel_mm)
        data = image_voxels(path, data)
        affine, voxel_mm = _nifti_geometry(img)
        return Volume(data, affine, path, voxel_mm)

    def volume_info(self, path: Path) -> tuple[tuple[int, int, int], int]:
        _, shape = _nifti_open(path, max_voxels=2**62)
        return (int(shape[0]), int(shape[1]), int(shape[2])), int(shape[3]) if len(shape) == 4 else 1

    def count_slices(self, path: Path, axis: int) -> int:
        _, shape = _nifti_open(path, max_voxels=2**62, check_size=False)
        return int(shape[axis])
