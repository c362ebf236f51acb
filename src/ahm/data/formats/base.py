"""What every file-format reader shares: the `Reader` interface and its registry, the image and volume records,
and the checks that turn any bad file into one `AhmError` line starting with its path.

Sizes are checked from headers before any pixel is decoded, so a file that merely claims to be huge costs
nothing. Readers import their decoding library (Pillow, tifffile, nibabel, pydicom, SimpleITK) on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahm.errors import AhmError

DEFAULT_MAX_PIXELS = 64_000_000
# 2**28 voxels is 1 GiB as float32: larger than any CT/MRI series we expect, small enough to be safe.
DEFAULT_MAX_VOXELS = 2**28
# More channels than this is not an image we can learn from; it is almost always a misread stack.
MAX_CHANNELS = 64

VoxelSizes = tuple[float | None, float | None, float | None]


@dataclass
class Volume:
    """A 3D (or 3D multi-channel) volume: `data` [X, Y, Z] or [X, Y, Z, C], `affine` voxel -> RAS+ mm.

    `voxel_mm`: the voxel size along X, Y, Z in mm where the source records it, None per axis where the affine
    holds an invented 1 mm (DICOM without PixelSpacing or slice step, NRRD/MetaImage without a voxel size).
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    voxel_mm: VoxelSizes = (None, None, None)


@dataclass
class ImageInfo:
    """What a 2D image file declares in its header; nothing is decoded to obtain it."""

    path: Path
    height: int
    width: int
    channels: int
    dtype: str  # numpy name of the stored sample type, e.g. "uint8", "uint16", "float32"


class Reader:
    """One format family. The entry points in `ahm.data.formats` ask the registry which reader handles a path
    and never branch on a format themselves.

    A reader declares what it handles (`suffixes`, or its own `handles`) and whether it reads 2D images
    (`reads_images`: `read_pixels`, `image_info`) and volumes (`reads_volumes`: `read_voxels`, `volume_info`,
    `count_slices`). A file it handles may be either, as its header says (`is_volume`). Every method raises
    AhmError naming the file; the entry points add the checks common to all formats.
    """

    name = "reader"
    # Readers are asked, and named in messages, in rising rank; the import order does not matter.
    rank = 100
    suffixes: tuple[str, ...] = ()
    reads_images = False
    reads_volumes = False
    # How the unsupported-volume message names what this reader takes ("" when it reads no volumes).
    volume_kinds = ""

    def handles(self, path: Path) -> bool:
        return suffix_of(path) in self.suffixes and not path.is_dir()

    def is_volume(self, path: Path) -> bool:
        """Whether the file is read as a volume rather than as a 2D image."""
        return False

    def read_pixels(self, path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
        """[C, H, W] as stored, and the stored sample type's numpy name."""
        raise NotImplementedError

    def image_info(self, path: Path, max_pixels: int) -> ImageInfo:
        raise NotImplementedError

    def pixel_size(self, path: Path) -> tuple[float, float] | None:
        """(between rows, between columns) in mm where the header records one."""
        return None

    def read_volume(self, path: Path, max_voxels: int, labels: bool) -> Volume:
        """Data [X, Y, Z(, C)] with the format's scaling applied, as `image_voxels` or (`labels`) `label_voxels`
        leave it, with its voxel -> RAS+ affine and the voxel sizes the file records."""
        raise NotImplementedError

    def volume_info(self, path: Path) -> tuple[tuple[int, int, int], int]:
        """Spatial shape [X, Y, Z] and channels, from the header."""
        raise NotImplementedError

    def count_slices(self, path: Path, axis: int) -> int:
        raise NotImplementedError

    def spacing_problem(self, path: Path) -> str | None:
        """Why the volume cannot be resampled in 3D (one line naming it), None when its voxel size is known."""
        return None


_READERS: list[Reader] = []


def register(reader: type[Reader]) -> type[Reader]:
    """Class decorator: add one instance of `reader` to the registry."""
    _READERS.append(reader())
    _READERS.sort(key=lambda r: r.rank)
    return reader


def registered() -> tuple[Reader, ...]:
    return tuple(_READERS)


# ------------------------------------------------------------------------------------------------ checks


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def check_file(path: Path) -> None:
    if not path.exists():
        raise AhmError(f"{path}: file not found")
    if not path.is_file():
        raise AhmError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AhmError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if size == 0:
        raise AhmError(f"{path}: empty file (0 bytes)")


def describe_error(exc: BaseException) -> str:
    """A library's exception in a few words, for the end of a one-line message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise AhmError(f"{path}: image has no pixels ({height}x{width})")
    if height * width > max_pixels:
        raise AhmError(
            f"{path}: image is {width}x{height} = {height * width} pixels, above the limit of "
            f"{max_pixels} (max_pixels); refused before decoding"
        )


def check_channels(path: Path, channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise AhmError(f"{path}: image has {channels} channels; at most {MAX_CHANNELS} are supported")


def check_numeric(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise AhmError(f"{path}: unsupported sample type {arr.dtype} (expected integers or real numbers)")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def check_voxels(path: Path, shape: tuple[int, ...], max_voxels: int) -> None:
    n_vox = int(np.prod(shape, dtype=np.float64))
    if n_vox > max_voxels:
        raise AhmError(
            f"{path}: volume of shape {shape} has {n_vox} voxels, above the limit of {max_voxels}; "
            "refused before decoding"
        )


def check_label_values(path: Path, data: np.ndarray, noun: str, unit: str) -> None:
    """Refuse what cannot be a label map (2D mask or label volume): NaN/inf, fractions, huge or negative values."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise AhmError(f"{path}: contains NaN or infinite {unit}")
        if not (data == np.round(data)).all():
            raise AhmError(f"{path}: {noun} has non-integral values (a probability map, not a label map?)")
        if data.size and np.abs(data).max() > 2**31:
            raise AhmError(f"{path}: {noun} values are too large to be labels")
    if data.size and data.min() < 0:
        raise AhmError(f"{path}: {noun} has negative values; labels must be 0, 1, 2, ...")


# ---------------------------------------------------------------------------------------------- geometry


def known_sizes(affine: np.ndarray, known: tuple[bool, bool, bool]) -> VoxelSizes:
    """The voxel size along each axis (the lengths of the affine's first three columns) where `known`."""
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(z) if k and math.isfinite(float(z)) and z > 0 else None  # type: ignore[return-value]
                 for z, k in zip(zooms, known))


def positive_pair(a: float, b: float) -> tuple[float, float] | None:
    a, b = float(a), float(b)
    return (a, b) if all(math.isfinite(v) and v > 0 for v in (a, b)) else None


def affine_or_identity(affine) -> np.ndarray:
    if affine is None:
        return np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return np.eye(4)
    return affine


# ------------------------------------------------------------------------------------------ voxel values


def image_voxels(path: Path, data: np.ndarray) -> np.ndarray:
    """An image volume's voxels as float32, refused when any is NaN or infinite."""
    with np.errstate(all="ignore"):
        out = data.astype(np.float32)
    if not np.isfinite(out).all():
        raise AhmError(f"{path}: contains NaN or infinite voxels")
    return np.ascontiguousarray(out)


def label_voxels(path: Path, data: np.ndarray) -> np.ndarray:
    """A label volume [X, Y, Z] in the smallest integer type that holds its labels, refused when it is no label
    map (several channels, fractions, negative values)."""
    if data.ndim == 4:
        if data.shape[3] != 1:
            raise AhmError(f"{path}: label volume has {data.shape[3]} channels; expected a 3D label map")
        data = data[..., 0]
    check_label_values(path, data, "label volume", "voxels")
    top = int(data.max()) if data.size else 0
    # Compact storage: label volumes can be large and rarely hold more than 255 classes.
    dtype = np.uint8 if top < 256 else np.int32 if top < 2**31 else np.int64
    return np.ascontiguousarray(data.astype(dtype))


def header_volume(path: Path, data: np.ndarray, affine: np.ndarray | None, known: tuple[bool, bool, bool],
                  labels: bool) -> Volume:
    """A volume decoded from a file whose header declares its geometry (DICOM, NRRD/MetaImage): `known` says
    which axes' voxel sizes the header records; the identity stands in for a missing or non-finite affine, and
    then no size is known."""
    if data.ndim == 4 and data.shape[3] > MAX_CHANNELS:
        raise AhmError(f"{path}: volume has {data.shape[3]} channels; at most {MAX_CHANNELS} are supported")
    if affine is None or not np.isfinite(np.asarray(affine, dtype=np.float64)).all():
        known = (False, False, False)
    data, affine = check_numeric(path, data), affine_or_identity(affine)
    values = label_voxels(path, data) if labels else image_voxels(path, data)
    return Volume(values, affine, path, known_sizes(affine, known))
