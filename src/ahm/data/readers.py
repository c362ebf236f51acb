"""Readers for 2D images, masks and 3D volumes, plus normalisation and resizing.

Every reader turns any failure (missing, empty, truncated, corrupt, unsupported, oversized, NaN voxels)
into an `AhmError` whose message starts with the offending path. Sizes are checked from headers before
any pixel is decoded, so a file that merely claims to be huge costs nothing.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ahm.data.dicom_file import DICOM_SUFFIXES
from ahm.data.itk_files import ITK_SUFFIXES
from ahm.errors import AhmError

DEFAULT_MAX_PIXELS = 64_000_000
# 2**28 voxels is 1 GiB as float32: larger than any CT/MRI series we expect, small enough to be safe.
DEFAULT_MAX_VOXELS = 2**28
# More channels than this is not an image we can learn from; it is almost always a misread stack.
MAX_CHANNELS = 64

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Files that hold a 2D image or a volume, which of the two their header says (frames, slices).
HEADER_KIND_SUFFIXES = DICOM_SUFFIXES + ITK_SUFFIXES

Modality = Literal["mri", "ct", "photo", "auto"]


@dataclass
class Volume:
    """A 3D (or 3D multi-channel) volume: `data` [X, Y, Z] or [X, Y, Z, C], `affine` voxel -> RAS+ mm.

    `voxel_mm`: the voxel size along X, Y, Z in mm where the source records it, None per axis where the affine
    holds an invented 1 mm (DICOM without PixelSpacing or slice step, NRRD/MetaImage without a voxel size).
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    voxel_mm: tuple[float | None, float | None, float | None] = (None, None, None)


def _zooms(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each of the three voxel axes: the lengths of the affine's first three columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _known_sizes(affine: np.ndarray, known: tuple[bool, bool, bool]) -> tuple[float | None, float | None, float | None]:
    zooms = _zooms(affine)
    return tuple(float(z) if k and math.isfinite(float(z)) and z > 0 else None  # type: ignore[return-value]
                 for z, k in zip(zooms, known))


@dataclass
class ImageInfo:
    """What a 2D image file declares in its header; nothing is decoded to obtain it."""

    path: Path
    height: int
    width: int
    channels: int
    dtype: str  # numpy name of the stored sample type, e.g. "uint8", "uint16", "float32"


# --------------------------------------------------------------------------------------------- helpers


def _check_file(path: Path) -> None:
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


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise AhmError(f"{path}: image has no pixels ({height}x{width})")
    if height * width > max_pixels:
        raise AhmError(
            f"{path}: image is {width}x{height} = {height * width} pixels, above the limit of "
            f"{max_pixels} (max_pixels); refused before decoding"
        )


def _check_channels(path: Path, channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise AhmError(f"{path}: image has {channels} channels; at most {MAX_CHANNELS} are supported")


def _check_numeric(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise AhmError(f"{path}: unsupported sample type {arr.dtype} (expected integers or real numbers)")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


# ------------------------------------------------------------------------------------------ PIL formats

# Stored sample type per PIL mode, for ImageInfo and for normalize("auto").
_PIL_DTYPES = {
    "I;16": "uint16",
    "I;16B": "uint16",
    "I;16L": "uint16",
    "I;16N": "uint16",
    "I": "int32",
    "F": "float32",
}


_PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP")


def _pil_open(path: Path, max_pixels: int):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only plain raster decoders: some Pillow plugins (EPS) would run external programs.
            im = Image.open(path, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise AhmError(
            f"{path}: image dimensions are too large ({_describe(exc)}); refused before decoding"
        ) from exc
    except Exception as exc:
        raise AhmError(f"{path}: not a readable image ({_describe(exc)})") from exc
    try:
        width, height = im.size
        _check_pixels(path, height, width, max_pixels)
    except BaseException:
        im.close()
        raise
    return im


def _palette_is_gray(im) -> bool:
    palette = im.getpalette() or []
    triples = [palette[i : i + 3] for i in range(0, len(palette) - 2, 3)]
    return all(t[0] == t[1] == t[2] for t in triples)


def _pil_channels(im) -> int:
    mode = im.mode
    if mode in ("P", "PA"):
        return 1 if _palette_is_gray(im) else 3
    if mode in ("1", "L", "LA", "La") or mode in _PIL_DTYPES:
        return 1
    return 3


def _pil_decode(path: Path, im, as_mask: bool) -> tuple[np.ndarray, str]:
    """Decode an opened PIL image to [C, H, W] in its stored dtype."""
    mode = im.mode
    source = _PIL_DTYPES.get(mode, "uint8")
    try:
        im.load()
        if mode == "1":
            arr = np.asarray(im, dtype=np.uint8)
            if not as_mask:
                arr = arr * np.uint8(255)  # a bilevel image is black/white, not 0/1 intensities
        elif mode in ("P", "PA"):
            if as_mask:
                arr = np.asarray(im.convert("P") if mode == "PA" else im)  # palette indices are the labels
            else:
                rgb = np.asarray(im.convert("RGB"))
                arr = rgb[..., 0] if _palette_is_gray(im) else rgb
        elif mode in ("LA", "La"):
            arr = np.asarray(im.getchannel(0))
        elif mode in ("L",) or mode in _PIL_DTYPES:
            arr = np.asarray(im)
        else:
            # RGBA -> RGB drops alpha (masks and medical photos carry no meaning in it); CMYK/YCbCr -> RGB.
            arr = np.asarray(im.convert("RGB"))
    except AhmError:
        raise
    except MemoryError as exc:
        raise AhmError(f"{path}: not enough memory to decode the image") from exc
    except Exception as exc:
        raise AhmError(f"{path}: truncated or unreadable image ({_describe(exc)})") from exc
    arr = _check_numeric(path, np.array(arr))
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return np.ascontiguousarray(arr), source


# ----------------------------------------------------------------------------------------------- TIFF


def _tiff_plan(path: Path, tf, max_pixels: int) -> dict:
    """Work out, from the TIFF header only, what will be read: first page of a stack, all channels."""
    try:
        series = tf.series[0]
        axes, shape = series.axes, tuple(int(s) for s in series.shape)
        page = series.pages[0] if len(series.pages) else tf.pages[0]
        page_axes = page.axes
        dtype = np.dtype(series.dtype)
        photometric = int(getattr(page, "photometric", 0) or 0)
        extrasamples = tuple(getattr(page, "extrasamples", ()) or ())
    except AhmError:
        raise
    except Exception as exc:
        raise AhmError(f"{path}: truncated or unreadable TIFF ({_describe(exc)})") from exc
    dims = dict(zip(axes, shape))
    if "Y" not in dims or "X" not in dims or len(axes) != len(shape):
        raise AhmError(f"{path}: TIFF has no 2D image plane (axes {axes!r})")
    _check_pixels(path, dims["Y"], dims["X"], max_pixels)
    channels = 1
    for ax in ("C", "S"):
        channels *= dims.get(ax, 1)
    if photometric == 2 and dims.get("S", 1) == 4 and extrasamples:  # RGB + alpha: alpha is dropped
        channels = channels // 4 * 3
    _check_channels(path, channels)
    return {
        "axes": axes,
        "shape": shape,
        "page_axes": page_axes,
        "dtype": dtype,
        "channels": channels,
        "photometric": photometric,
        "extrasamples": extrasamples,
    }


def _tiff_decode(path: Path, tf, plan: dict) -> np.ndarray:
    axes, shape, page_axes = plan["axes"], plan["shape"], plan["page_axes"]
    series = tf.series[0]
    lead = len(axes) - len(page_axes)
    if lead < 0 or axes[lead:] != page_axes:
        lead = 0
    # Pages along channel axes are kept; every other stacking axis (Z, T, pages) is cut to its first index.
    lead_axes, lead_shape = axes[:lead], shape[:lead]
    keep = [range(n) if ax == "C" else range(1) for ax, n in zip(lead_axes, lead_shape)]
    if lead_shape:
        keys = [int(i) for i in np.ravel_multi_index(np.ix_(*keep), lead_shape).ravel()] if keep else [0]
        arr = series.asarray(key=keys if len(keys) > 1 else keys[0])
        if len(keys) > 1:
            arr = arr.reshape((len(keys),) + tuple(shape[lead:]))
            cur_axes = "C" + axes[lead:]
        else:
            arr = arr.reshape(tuple(shape[lead:]))
            cur_axes = axes[lead:]
    else:
        arr = series.asarray()
        cur_axes = axes
    arr = np.asarray(arr)
    # Inside-page stacking axes (rare, e.g. SGI depth) are also cut to the first index.
    index = tuple(slice(None) if ax in "YXCS" else 0 for ax in cur_axes)
    arr = arr[index]
    cur_axes = "".join(ax for ax in cur_axes if ax in "YXCS")
    if (
        plan["photometric"] == 2
        and "S" in cur_axes
        and arr.shape[cur_axes.index("S")] == 4
        and plan["extrasamples"]
    ):
        arr = np.take(arr, [0, 1, 2], axis=cur_axes.index("S"))
    chan_axes = [i for i, ax in enumerate(cur_axes) if ax in "CS"]
    order = chan_axes + [cur_axes.index("Y"), cur_axes.index("X")]
    arr = np.transpose(arr, order)
    return arr.reshape((-1,) + arr.shape[-2:])


def _tiff_read(path: Path, max_pixels: int) -> tuple[np.ndarray, str]:
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:
        raise AhmError(f"{path}: not a readable TIFF ({_describe(exc)})") from exc
    with tf:
        plan = _tiff_plan(path, tf, max_pixels)
        try:
            arr = _tiff_decode(path, tf, plan)
        except AhmError:
            raise
        except MemoryError as exc:
            raise AhmError(f"{path}: not enough memory to decode the image") from exc
        except Exception as exc:
            raise AhmError(f"{path}: truncated or unreadable TIFF ({_describe(exc)})") from exc
    arr = _check_numeric(path, np.array(arr))
    return np.ascontiguousarray(arr), str(plan["dtype"]) if plan["dtype"] != bool else "uint8"  # noqa: E721 (a numpy dtype compares equal to bool)


# --------------------------------------------------------------------------------------- 2D public API


def _read_any(path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
    _check_file(path)
    suffix = _suffix(path)
    if suffix in TIFF_SUFFIXES:
        arr, source = _tiff_read(path, max_pixels)
    elif suffix in PIL_SUFFIXES:
        im = _pil_open(path, max_pixels)
        with im:
            arr, source = _pil_decode(path, im, as_mask)
    elif suffix in DICOM_SUFFIXES:
        from ahm.data.dicom_file import dicom_image

        info = _dicom_file_info(path)
        _check_pixels(path, info.rows, info.cols, max_pixels)
        _check_channels(path, info.channels)
        arr, source = _check_numeric(path, dicom_image(info, as_mask=as_mask)), info.dtype
    elif suffix in ITK_SUFFIXES:
        from ahm.data.itk_files import itk_image

        itk = _itk_info(path)
        _check_pixels(path, itk.size[1] if itk.dimension > 1 else 1, itk.size[0], max_pixels)
        _check_channels(path, itk.components)
        arr, source = _check_numeric(path, itk_image(itk)), str(itk.dtype)
    else:
        raise AhmError(
            f"{path}: unsupported image type {suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(IMAGE_SUFFIXES + HEADER_KIND_SUFFIXES)}"
        )
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise AhmError(f"{path}: image has no pixels (shape {arr.shape})")
    _check_channels(path, arr.shape[0])
    return arr, source


def read_image_info(path: str | os.PathLike, max_pixels: int | None = None) -> ImageInfo:
    """Height, width, channels and stored sample type of a 2D image, from its header only.

    `channels` is what `read_image` will return (RGBA counts 3, a grey palette 1).
    """
    path = Path(path)
    _check_file(path)
    limit = max_pixels if max_pixels is not None else 2**62
    suffix = _suffix(path)
    if suffix in TIFF_SUFFIXES:
        import tifffile

        try:
            tf = tifffile.TiffFile(path)
        except Exception as exc:
            raise AhmError(f"{path}: not a readable TIFF ({_describe(exc)})") from exc
        with tf:
            plan = _tiff_plan(path, tf, limit)
        dims = dict(zip(plan["axes"], plan["shape"]))
        dtype = "uint8" if plan["dtype"] == bool else str(plan["dtype"])  # noqa: E721
        return ImageInfo(path, dims["Y"], dims["X"], plan["channels"], dtype)
    if suffix in PIL_SUFFIXES:
        im = _pil_open(path, limit)
        with im:
            width, height = im.size
            try:
                channels = _pil_channels(im)
            except Exception as exc:
                raise AhmError(f"{path}: unreadable image header ({_describe(exc)})") from exc
            return ImageInfo(path, height, width, channels, _PIL_DTYPES.get(im.mode, "uint8"))
    if suffix in DICOM_SUFFIXES:
        info = _dicom_file_info(path)
        if info.is_volume:
            raise AhmError(f"{path}: multi-frame DICOM ({info.frames} frames) is a volume, not a 2D image")
        _check_pixels(path, info.rows, info.cols, limit)
        return ImageInfo(path, info.rows, info.cols, info.channels, info.dtype)
    if suffix in ITK_SUFFIXES:
        itk = _itk_info(path)
        if itk.is_volume or itk.dimension > 3:
            raise AhmError(f"{path}: {'x'.join(map(str, itk.size))} image is a volume, not a 2D image")
        height = itk.size[1] if itk.dimension > 1 else 1
        _check_pixels(path, height, itk.size[0], limit)
        return ImageInfo(path, height, itk.size[0], itk.components, str(itk.dtype))
    raise AhmError(f"{path}: unsupported image type {suffix or '(no suffix)'!r}")


def _dicom_file_info(path: Path):
    from ahm.data.dicom_file import read_dicom_info

    return read_dicom_info(path)


def _itk_info(path: Path):
    from ahm.data.itk_files import read_itk_info

    _check_file(path)
    return read_itk_info(path)


def is_volume_file(path: str | os.PathLike) -> bool:
    """Whether a file is read as a volume (NIfTI; multi-frame DICOM; NRRD/MetaImage of several slices) or as a
    2D image (everything else), from its name and, for DICOM and NRRD/MetaImage, its header."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return True
    if suffix in DICOM_SUFFIXES:
        return _dicom_file_info(path).is_volume
    if suffix in ITK_SUFFIXES:
        itk = _itk_info(path)
        return itk.is_volume or itk.dimension > 3
    return False


def volume_spacing_problem(path: str | os.PathLike) -> str | None:
    """Why a volume cannot be resampled in 3D (one line naming it), from its header(s); None when it can.

    A 2D file (one frame, one slice) has no slice spacing. A DICOM series or multi-frame file needs
    PixelSpacing > 0 and a slice step (distinct first and last ImagePositionPatient, SpacingBetweenSlices or
    SliceThickness > 0): without them the reader puts an invented 1 mm in the affine, which the 2D path may
    use (it never resamples) but 3D resampling must not. The same holds for a NRRD header without 'space
    directions' or 'spacings' and a MetaImage header without ElementSpacing (ITK assumes 1 mm). NIfTI always
    stores a voxel size and is taken as it is (nibabel itself turns a zero pixdim into 1 mm when reading, so a
    zero there cannot be seen from here).
    """
    path = Path(path)
    if path.is_dir():
        slices = _dicom_scan(path)
        if len(slices) < 2:
            return f"{path}: a DICOM series of one slice has no slice spacing; data.spatial_dims 3 needs a volume"
        _, _, spacing, step = _series_geometry(slices)
        if spacing is None:
            return f"{path}: the DICOM series has no PixelSpacing > 0, so its voxel size is unknown"
        if step is None:
            return (f"{path}: the DICOM series gives no slice step (distinct ImagePositionPatient, "
                    "SpacingBetweenSlices or SliceThickness > 0), so its slice spacing is unknown")
        return None
    if not is_volume_file(path):
        return f"{path}: a 2D image has no slice spacing; data.spatial_dims 3 needs a volume"
    if _suffix(path) in DICOM_SUFFIXES:
        from ahm.data.dicom_file import spacing_problem

        return spacing_problem(_dicom_file_info(path))
    if _suffix(path) in ITK_SUFFIXES:
        from ahm.data.itk_files import spacing_problem as itk_spacing_problem

        return itk_spacing_problem(path)
    return None


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
    arr, _ = _read_any(path, max_pixels, as_mask=False)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise AhmError(f"{path}: contains NaN or infinite pixel values")
    return out


def image_pixel_size(path: str | os.PathLike) -> tuple[float, float] | None:
    """(between rows, between columns) in mm of a 2D image file, from its header, where it records one: a DICOM
    file's PixelSpacing, a 2D NRRD/MetaImage's voxel size. None otherwise: PNG, JPEG, TIFF, BMP (a dpi field is
    no physical pixel size), a DICOM file without PixelSpacing > 0, a NRRD/MetaImage header without a spacing
    (ITK would invent 1 mm)."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in DICOM_SUFFIXES:
        from ahm.data.dicom_file import _geometry

        info = _dicom_file_info(path)
        spacing = None if info.is_volume else _geometry(info)[2]
        return None if spacing is None else _positive_pair(spacing[0], spacing[1])
    if suffix in ITK_SUFFIXES:
        from ahm.data.itk_files import spacing_problem as itk_spacing_problem

        itk = _itk_info(path)
        if itk.is_volume or itk.dimension < 2 or itk_spacing_problem(path) is not None:
            return None
        return _positive_pair(itk.spacing[1], itk.spacing[0])  # rows run along y, columns along x
    return None


def _positive_pair(a: float, b: float) -> tuple[float, float] | None:
    a, b = float(a), float(b)
    return (a, b) if all(math.isfinite(v) and v > 0 for v in (a, b)) else None


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
    arr, _ = _read_any(path, max_pixels, as_mask=True)
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
    _check_label_values(path, mask, "mask", "values")
    mask = mask.astype(np.int64)
    values = np.unique(mask)
    if values.size and values.max() == 255 and np.isin(values, (0, 255)).all():
        mask = mask // 255  # 0/255 binary masks, the usual export of drawing tools
    return np.ascontiguousarray(mask)


# -------------------------------------------------------------------------------------------- volumes


def _is_nifti(path: Path) -> bool:
    return _suffix(path) in NIFTI_SUFFIXES


def _nifti_open(path: Path, max_voxels: int, check_size: bool = True):
    import nibabel as nib

    _check_file(path)
    try:
        img: Any = nib.load(str(path), mmap=False)  # a Nifti1Image; nibabel types it as the base class
        shape = tuple(int(s) for s in img.shape)
        header = img.header
        dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:
        raise AhmError(f"{path}: not a readable NIfTI file ({_describe(exc)})") from exc
    shape = _nifti_shape(path, shape)
    if dtype.kind not in "uifb" or dtype.fields is not None:
        raise AhmError(f"{path}: unsupported voxel type {dtype} (expected integers or real numbers)")
    n_vox = int(np.prod(shape, dtype=np.float64))
    if n_vox > max_voxels:
        raise AhmError(f"{path}: volume of shape {shape} has {n_vox} voxels, above the limit of {max_voxels}")
    if check_size and _suffix(path) == ".nii":
        try:
            needed = int(header.get_data_offset()) + n_vox * dtype.itemsize
        except Exception as exc:
            raise AhmError(f"{path}: not a readable NIfTI file ({_describe(exc)})") from exc
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
        raise AhmError(f"{path}: truncated or unreadable NIfTI data ({_describe(exc)})") from exc
    data = _check_numeric(path, data)
    return data.reshape(shape)


def _affine_or_identity(affine) -> np.ndarray:
    if affine is None:
        return np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return np.eye(4)
    return affine


_VOLUME_TYPES = ".nii, .nii.gz, .dcm (multi-frame), .nrrd, .nhdr, .mha, .mhd or a folder of DICOM files"


def _header_volume(path: Path, max_voxels: int,
                   labels: bool) -> tuple[np.ndarray, np.ndarray, tuple[bool, bool, bool]] | None:
    """DICOM file or NRRD/MetaImage: checked from the header, then decoded, with which axes' voxel sizes the
    header records; None for other suffixes."""
    suffix = _suffix(path)
    if suffix in DICOM_SUFFIXES:
        from ahm.data.dicom_file import _geometry as dicom_geometry
        from ahm.data.dicom_file import dicom_volume

        info = _dicom_file_info(path)
        shape: tuple[int, ...] = (info.cols, info.rows, info.frames) + ((info.channels,) if info.channels > 1 else ())
        _check_voxels(path, shape, max_voxels)
        data, affine = dicom_volume(info, labels=labels)
        _, _, pixel_spacing, _, step = dicom_geometry(info)
        known = (pixel_spacing is not None, pixel_spacing is not None, step is not None)
    elif suffix in ITK_SUFFIXES:
        from ahm.data.itk_files import itk_volume
        from ahm.data.itk_files import spacing_problem as itk_spacing_problem

        itk = _itk_info(path)
        shape = itk.size + ((itk.components,) if itk.components > 1 else ())
        _check_voxels(path, shape, max_voxels)
        data, affine = itk_volume(itk)
        # itk_volume puts the identity in place of a non-finite geometry: then no size is recorded either
        recorded = itk_spacing_problem(path) is None and all(
            np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in (itk.spacing, itk.origin, itk.direction))
        known = (recorded, recorded and itk.dimension >= 2, recorded and itk.dimension >= 3)
    else:
        return None
    if data.ndim == 4 and data.shape[3] > MAX_CHANNELS:
        raise AhmError(f"{path}: volume has {data.shape[3]} channels; at most {MAX_CHANNELS} are supported")
    if affine is None or not np.isfinite(np.asarray(affine, dtype=np.float64)).all():
        known = (False, False, False)  # the identity stands in for the geometry: no size is recorded
    return _check_numeric(path, data), _affine_or_identity(affine), known


def _check_voxels(path: Path, shape: tuple[int, ...], max_voxels: int) -> None:
    n_vox = int(np.prod(shape, dtype=np.float64))
    if n_vox > max_voxels:
        raise AhmError(
            f"{path}: volume of shape {shape} has {n_vox} voxels, above the limit of {max_voxels}; "
            "refused before decoding"
        )


def _volume_source(path: Path) -> None:
    if not path.exists():
        raise AhmError(f"{path}: file not found")
    if not _is_nifti(path) and _suffix(path) not in HEADER_KIND_SUFFIXES:
        raise AhmError(f"{path}: unsupported volume type; expected {_VOLUME_TYPES}")


def read_volume(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a volume as float32: NIfTI (.nii, .nii.gz), a DICOM file (its frames), NRRD/MetaImage (.nrrd,
    .nhdr, .mha, .mhd; a 2D file is one slice), or a folder holding one DICOM series.

    Data is [X, Y, Z] or [X, Y, Z, C] with scaling applied (NIfTI scl_slope/inter, DICOM rescale
    slope/intercept or modality LUT, MONOCHROME1 inverted); `affine` maps voxel indices to RAS+ millimetres.
    DICOM slices are ordered by their position along the slice normal (InstanceNumber, then file name, when
    positions are missing). Sizes are checked from the header before decoding.
    """
    path = Path(path)
    if path.is_dir():
        return _dicom_read(path, max_voxels, labels=False)
    _volume_source(path)
    decoded = _header_volume(path, max_voxels, labels=False)
    if decoded is not None:
        with np.errstate(all="ignore"):
            data = decoded[0].astype(np.float32)
        if not np.isfinite(data).all():
            raise AhmError(f"{path}: contains NaN or infinite voxels")
        return Volume(np.ascontiguousarray(data), decoded[1], path, _known_sizes(decoded[1], decoded[2]))
    img, shape = _nifti_open(path, max_voxels)
    data = _nifti_data(path, img, shape)
    with np.errstate(all="ignore"):
        data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise AhmError(f"{path}: contains NaN or infinite voxels")
    affine, voxel_mm = _nifti_geometry(img)
    return Volume(np.ascontiguousarray(data), affine, path, voxel_mm)


def _nifti_geometry(img) -> tuple[np.ndarray, tuple[float | None, float | None, float | None]]:
    """Affine and voxel sizes of a NIfTI image: it always stores a voxel size (a missing affine: none known), in
    the header's spatial unit (`xyzt_units`: metres and microns are converted to mm; unknown is taken as mm, as
    nibabel and ITK do)."""
    affine = _affine_or_identity(img.affine)
    known = img.affine is not None and np.isfinite(np.asarray(img.affine, dtype=np.float64)).all()
    sizes = _known_sizes(affine, (known, known, known))
    units = getattr(img.header, "get_xyzt_units", None)  # NIfTI-1 and -2 headers have it
    unit = units()[0] if units is not None else "unknown"
    scale = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)
    return affine, tuple(None if v is None else v * scale for v in sizes)  # type: ignore[return-value]


def _check_label_values(path: Path, data: np.ndarray, noun: str, unit: str) -> None:
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


def _to_labels(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4:
        if data.shape[3] != 1:
            raise AhmError(f"{path}: label volume has {data.shape[3]} channels; expected a 3D label map")
        data = data[..., 0]
    _check_label_values(path, data, "label volume", "voxels")
    top = int(data.max()) if data.size else 0
    # Compact storage: label volumes can be large and rarely hold more than 255 classes.
    dtype = np.uint8 if top < 256 else np.int32 if top < 2**31 else np.int64
    return np.ascontiguousarray(data.astype(dtype))


def read_label_volume(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a label volume [X, Y, Z] with integer data (uint8 when labels fit, else int32/int64).

    Non-integral, negative, NaN/inf values or a multi-channel volume are refused.
    """
    path = Path(path)
    if path.is_dir():
        return _dicom_read(path, max_voxels, labels=True)
    _volume_source(path)
    decoded = _header_volume(path, max_voxels, labels=True)
    if decoded is not None:
        return Volume(_to_labels(path, decoded[0]), decoded[1], path, _known_sizes(decoded[1], decoded[2]))
    img, shape = _nifti_open(path, max_voxels)
    data = _nifti_data(path, img, shape)
    affine, voxel_mm = _nifti_geometry(img)
    return Volume(_to_labels(path, data), affine, path, voxel_mm)


# ----------------------------------------------------------------------------------------------- DICOM


@dataclass
class _Slice:
    path: Path
    ds: Any  # pydicom Dataset, header only
    position: np.ndarray | None
    instance: int | None


def _dicom_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise AhmError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc
    # Hidden files (.DS_Store, macOS ._ forks) and the DICOMDIR index are never slices.
    return [p for p in entries if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"]


def _dicom_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.stat().st_size == 0:
        raise AhmError(f"{path}: empty file (0 bytes)")
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            # Old files without the 128-byte preamble; accepted only if they look like an image below.
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        # pydicom parses elements lazily; parse them all now so a corrupt one fails here, naming the file,
        # rather than on some later attribute access.
        for _ in ds.iterall():
            pass
        if "Rows" not in ds or "Columns" not in ds:
            raise AhmError(f"{path}: not a DICOM image (no Rows/Columns)")
        rows, cols = int(ds.Rows), int(ds.Columns)
    except AhmError:
        raise
    except Exception as exc:
        raise AhmError(f"{path}: not a readable DICOM file ({_describe(exc)})") from exc
    if rows <= 0 or cols <= 0:
        raise AhmError(f"{path}: DICOM image has no pixels ({rows}x{cols})")
    return ds


def _float_list(ds, name: str, n: int) -> np.ndarray | None:
    try:
        value = getattr(ds, name, None)
        if value is None:
            return None
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
        return None
    if arr.shape != (n,) or not np.isfinite(arr).all():
        return None
    return arr


def _dicom_scan(folder: Path) -> list[_Slice]:
    files = _dicom_files(folder)
    if not files:
        raise AhmError(f"{folder}: folder holds no DICOM files")
    slices = []
    for p in files:
        ds = _dicom_header(p)
        try:
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
            frames = 1
        if frames > 1:
            raise AhmError(
                f"{p}: multi-frame DICOM ({frames} frames) inside a series folder; a multi-frame file is a "
                "volume by itself: put it where volumes go, not in a folder of slices"
            )
        try:
            instance = int(ds.InstanceNumber) if getattr(ds, "InstanceNumber", None) is not None else None
        except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
            instance = None
        slices.append(_Slice(p, ds, _float_list(ds, "ImagePositionPatient", 3), instance))
    series = {str(getattr(s.ds, "SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise AhmError(
            f"{folder}: folder holds {len(series)} DICOM series; put each series in its own folder"
        )
    first = slices[0].ds
    for s in slices[1:]:
        if (int(s.ds.Rows), int(s.ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise AhmError(
                f"{s.path}: slice is {int(s.ds.Rows)}x{int(s.ds.Columns)} but {slices[0].path.name} is "
                f"{int(first.Rows)}x{int(first.Columns)}; one series must have one slice size"
            )
    return _dicom_sort(slices)


def _orientation(ds) -> tuple[np.ndarray, np.ndarray]:
    iop = _float_list(ds, "ImageOrientationPatient", 6)
    if iop is None:
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    row, col = iop[:3], iop[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6 or np.linalg.norm(np.cross(row, col)) < 1e-6:
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _dicom_sort(slices: list[_Slice]) -> list[_Slice]:
    row, col = _orientation(slices[0].ds)
    normal = np.cross(row, col)
    if all(s.position is not None for s in slices):
        return sorted(slices, key=lambda s: (float(s.position @ normal), s.instance or 0, s.path.name))
    if all(s.instance is not None for s in slices):
        return sorted(slices, key=lambda s: (s.instance, s.path.name))
    return sorted(slices, key=lambda s: s.path.name)


def _series_geometry(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Row and column directions, PixelSpacing (None when absent or not > 0) and slice step (None when the
    positions, SpacingBetweenSlices and SliceThickness give none), LPS, of a sorted series."""
    from ahm.data.dicom_file import slice_step

    ds = slices[0].ds
    row, col = _orientation(ds)
    spacing = _float_list(ds, "PixelSpacing", 2)
    if spacing is not None and (spacing <= 0).any():
        spacing = None
    step = slice_step(slices[0].position, slices[-1].position, len(slices), np.cross(row, col),
                      _float_scalar(ds, "SpacingBetweenSlices"), _float_scalar(ds, "SliceThickness"))
    return row, col, spacing, step


def _float_scalar(ds, name: str) -> np.ndarray | None:
    """A one-number header field as a 1-array (the form `slice_step` takes), None when absent or not finite."""
    try:
        value = getattr(ds, name, None)
        out = None if value is None or value == "" else np.array([float(value)], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
        return None
    return out if out is not None and np.isfinite(out).all() else None


def _dicom_affine(slices: list[_Slice]) -> np.ndarray:
    """Voxel (column i, row j, slice k) -> RAS+ mm, the orientation NIfTI readers expect; 1 mm where the header
    gives no spacing (the 2D path reads such series; the 3D path refuses them first, `volume_spacing_problem`)."""
    row, col, spacing, step = _series_geometry(slices)
    if spacing is None:
        spacing = np.array([1.0, 1.0])
    if step is None:
        step = np.cross(row, col)
    row_spacing, col_spacing = spacing  # PixelSpacing is (between rows, between columns)
    origin = slices[0].position if slices[0].position is not None else np.zeros(3)
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS+, NIfTI is RAS+


def _dicom_pixels(s: _Slice, labels: bool) -> np.ndarray:
    """One slice of a series through pydicom's decoders and LUT helpers (`dicom_file.series_slice`)."""
    from ahm.data.dicom_file import series_slice

    try:
        slope = float(s.ds.RescaleSlope) if getattr(s.ds, "RescaleSlope", None) is not None else 1.0
        intercept = float(s.ds.RescaleIntercept) if getattr(s.ds, "RescaleIntercept", None) is not None else 0.0
    except Exception as exc:
        raise AhmError(f"{s.path}: unreadable RescaleSlope/RescaleIntercept ({_describe(exc)})") from exc
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise AhmError(f"{s.path}: RescaleSlope/RescaleIntercept is not a finite number")
    arr = series_slice(s.path, s.ds, labels)
    rows, cols = int(s.ds.Rows), int(s.ds.Columns)
    if arr.shape[:2] != (rows, cols) or arr.ndim not in (2, 3):
        raise AhmError(f"{s.path}: pixel data shape {arr.shape} does not match {rows}x{cols}")
    return _check_numeric(s.path, arr)


def _dicom_read(folder: Path, max_voxels: int, labels: bool) -> Volume:
    slices = _dicom_scan(folder)
    first = slices[0].ds
    rows, cols = int(first.Rows), int(first.Columns)
    try:
        samples = int(getattr(first, "SamplesPerPixel", 1) or 1)
    except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
        samples = 1
    n_vox = rows * cols * len(slices) * max(samples, 1)
    if n_vox > max_voxels:
        raise AhmError(
            f"{folder}: series of {len(slices)} slices of {rows}x{cols} has {n_vox} voxels, above the limit "
            f"of {max_voxels}"
        )
    planes = [_dicom_pixels(s, labels) for s in slices]
    for s, plane in zip(slices, planes):
        if plane.shape != planes[0].shape:
            raise AhmError(f"{s.path}: pixel data shape {plane.shape} differs from the rest of the series")
    stack = np.stack(planes, axis=-1 if planes[0].ndim == 2 else 2)  # [rows, cols, Z] or [rows, cols, Z, C]
    stack = np.swapaxes(stack, 0, 1)  # -> [cols, rows, ...] = [X, Y, Z(, C)]
    affine = _dicom_affine(slices)
    _, _, pixel_spacing, step = _series_geometry(slices)
    voxel_mm = _known_sizes(affine, (pixel_spacing is not None, pixel_spacing is not None, step is not None))
    if labels:
        return Volume(_to_labels(folder, stack), affine, folder, voxel_mm)
    with np.errstate(all="ignore"):
        data = stack.astype(np.float32)
    if not np.isfinite(data).all():
        raise AhmError(f"{folder}: contains NaN or infinite voxels")
    return Volume(np.ascontiguousarray(data), affine, folder, voxel_mm)


# ------------------------------------------------------------------------------------ slicing, counting


def volume_slice(vol_data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Cut one 2D slice: float images [X,Y,Z(,C)] give float32 [C, H, W]; integer label maps give int64 [H, W].

    H and W are the two remaining spatial axes in their stored order.
    """
    if axis not in (0, 1, 2):
        raise AhmError(f"slice axis must be 0, 1 or 2, got {axis}")
    if vol_data.ndim not in (3, 4):
        raise AhmError(f"expected a 3D or 4D volume, got shape {vol_data.shape}")
    n = vol_data.shape[axis]
    if not 0 <= index < n:
        raise AhmError(f"slice {index} is outside the volume (axis {axis} has {n} slices)")
    plane = np.take(vol_data, index, axis=axis)
    if vol_data.dtype.kind in "uib":
        if plane.ndim == 3:
            if plane.shape[2] != 1:
                raise AhmError(f"a label volume must have one channel, got shape {vol_data.shape}")
            plane = plane[..., 0]
        return np.ascontiguousarray(plane.astype(np.int64))
    plane = plane[None] if plane.ndim == 2 else np.moveaxis(plane, -1, 0)
    return np.ascontiguousarray(plane.astype(np.float32))


def slice_pixel_size(voxel_mm: tuple[float | None, ...], axis: int) -> tuple[float, float] | None:
    """(rows, columns) pixel size in mm of `volume_slice(data, axis, k)`: the voxel sizes of the two remaining
    axes in their stored order; None when either is not recorded (`Volume.voxel_mm`)."""
    if axis not in (0, 1, 2):
        raise AhmError(f"slice axis must be 0, 1 or 2, got {axis}")
    rows, cols = (voxel_mm[a] for a in range(3) if a != axis)
    return None if rows is None or cols is None else _positive_pair(rows, cols)


def read_volume_info(path: str | os.PathLike) -> tuple[tuple[int, int, int], int]:
    """Spatial shape [X, Y, Z] and channel count of a volume, from its header(s) only (what `read_volume`
    would return). Raw NIfTI and NRRD/MetaImage data shorter than the header declares is refused here too."""
    path = Path(path)
    if path.is_dir():
        slices = _dicom_scan(path)
        ds = slices[0].ds
        try:
            samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
            samples = 1
        return (int(ds.Columns), int(ds.Rows), len(slices)), samples
    _volume_source(path)
    suffix = _suffix(path)
    if suffix in DICOM_SUFFIXES:
        info = _dicom_file_info(path)
        return (info.cols, info.rows, info.frames), info.channels
    if suffix in ITK_SUFFIXES:
        from ahm.data.itk_files import _check_truncation

        itk = _itk_info(path)
        _check_truncation(itk)
        size = tuple(itk.size) + (1, 1)
        channels = itk.components * (itk.size[3] if itk.dimension == 4 else 1)
        return (int(size[0]), int(size[1]), int(size[2])), int(channels)
    _, shape = _nifti_open(path, max_voxels=2**62)
    return (int(shape[0]), int(shape[1]), int(shape[2])), int(shape[3]) if len(shape) == 4 else 1


def count_slices(path: str | os.PathLike, axis: int) -> int:
    """Number of slices along `axis`, from headers only (NIfTI, DICOM, NRRD/MetaImage headers; a DICOM
    series: its slice files, or rows/columns)."""
    path = Path(path)
    if axis not in (0, 1, 2):
        raise AhmError(f"{path}: slice axis must be 0, 1 or 2, got {axis}")
    if path.is_dir():
        slices = _dicom_scan(path)
        ds = slices[0].ds
        return [int(ds.Columns), int(ds.Rows), len(slices)][axis]
    _volume_source(path)
    if _suffix(path) in DICOM_SUFFIXES:
        info = _dicom_file_info(path)
        return [info.cols, info.rows, info.frames][axis]
    if _suffix(path) in ITK_SUFFIXES:
        size = _itk_info(path).size
        return int((tuple(size) + (1, 1))[axis])
    _, shape = _nifti_open(path, max_voxels=2**62, check_size=False)
    return int(shape[axis])


# ------------------------------------------------------------------------------------- normalisation


def _scale01(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        return np.zeros_like(arr, dtype=np.float32)
    out = (np.clip(arr.astype(np.float64), lo, hi) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)  # float rounding must not step outside [0, 1]


def _looks_8bit(arr: np.ndarray) -> bool:
    return arr.size > 0 and arr.min() >= 0 and arr.max() <= 255 and bool((arr == np.round(arr)).all())


def normalize(
    arr: np.ndarray,
    modality: Modality = "auto",
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    *,
    source_dtype: str | np.dtype | None = None,
) -> np.ndarray:
    """Map intensities of a [C, H, W] image to float32 in [0, 1].

    mri: per channel, clip to the 0.5/99.5 percentiles then scale; ct: clip to `ct_window` (HU) then scale;
    photo: /255 for 8-bit, /65535 for 16-bit sources (from `source_dtype`, else from the value range);
    auto: photo for 8-bit sources, mri otherwise. Without `source_dtype`, "auto" treats an image of
    integers within 0..255 as 8-bit. A constant image (or channel) becomes zeros; the result has no NaN.
    """
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    src = np.dtype(source_dtype) if source_dtype is not None else None
    if modality == "auto":
        is8 = src in (np.dtype(np.uint8), np.dtype(bool)) if src is not None else _looks_8bit(arr)
        modality = "photo" if is8 else "mri"
    if modality == "ct":
        lo, hi = (float(v) for v in ct_window)
        if not hi > lo:
            raise AhmError(f"ct_window: upper bound must exceed lower bound, got {tuple(ct_window)}")
        return _scale01(arr, lo, hi)
    if modality == "photo":
        if src in (np.dtype(np.uint8), np.dtype(bool)):
            top = 255.0
        elif src == np.dtype(np.uint16):
            top = 65535.0
        elif arr.size == 0 or arr.max() <= 1.0:
            top = 1.0
        elif arr.max() <= 255.0:
            top = 255.0
        elif arr.max() <= 65535.0:
            top = 65535.0
        else:
            return normalize(arr, "mri")
        return np.clip(arr / top, 0.0, 1.0).astype(np.float32)
    if modality == "mri":
        out = np.empty_like(arr, dtype=np.float32)
        for c in range(arr.shape[0]):
            channel = arr[c]
            if channel.size == 0:
                out[c] = channel
                continue
            lo, hi = np.percentile(channel, (0.5, 99.5))
            if not hi > lo:  # a few bright voxels only: fall back to the full range before giving up
                lo, hi = float(channel.min()), float(channel.max())
            out[c] = _scale01(channel, float(lo), float(hi))
        return out
    raise AhmError(f"modality: expected one of mri, ct, photo, auto, got {modality!r}")


# ------------------------------------------------------------------------------------------- resizing


def _fit(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Shared geometry of image and mask resizing: scaled (h, w) and the top/left zero padding."""
    if height <= 0 or width <= 0:
        raise AhmError(f"cannot resize an empty image ({height}x{width})")
    if size <= 0:
        raise AhmError(f"image_size must be positive, got {size}")
    scale = size / max(height, width)
    new_h = min(size, max(1, round(height * scale)))
    new_w = min(size, max(1, round(width * scale)))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def _nearest_index(src: int, dst: int) -> np.ndarray:
    # Pixel-centre sampling, the same grid as area/bilinear (align_corners=False) interpolation.
    idx = np.floor((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64)
    return np.clip(idx, 0, src - 1)


def resize_image(arr: np.ndarray, size: int) -> np.ndarray:
    """[C, H, W] -> [C, size, size]: scale the longest side to `size` (area when shrinking, bilinear when
    enlarging), keep the aspect ratio, zero-pad the rest centrally."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 3:
        raise AhmError(f"resize_image expects [C, H, W], got shape {arr.shape}")
    c, h, w = arr.shape
    new_h, new_w, top, left = _fit(h, w, size)
    if (new_h, new_w) == (h, w):
        scaled = arr
    else:
        mode = "area" if new_h <= h and new_w <= w else "bilinear"
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        with torch.no_grad():
            scaled = F.interpolate(
                torch.from_numpy(np.ascontiguousarray(arr))[None], size=(new_h, new_w), mode=mode, **kwargs
            )[0].numpy()
    out = np.zeros((c, size, size), dtype=np.float32)
    out[:, top : top + new_h, left : left + new_w] = scaled
    return out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """[H, W] labels -> [size, size] with the geometry of `resize_image` and nearest sampling (no blending)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise AhmError(f"resize_mask expects [H, W], got shape {mask.shape}")
    h, w = mask.shape
    new_h, new_w, top, left = _fit(h, w, size)
    scaled = mask[np.ix_(_nearest_index(h, new_h), _nearest_index(w, new_w))]
    out = np.zeros((size, size), dtype=mask.dtype)
    out[top : top + new_h, left : left + new_w] = scaled
    return out


def undo_resize(mask: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
    """Map a [..., size, size] prediction back to the original [..., H, W] geometry (crop padding, nearest)."""
    mask = np.asarray(mask)
    if mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        raise AhmError(f"undo_resize expects [..., size, size], got shape {mask.shape}")
    h, w = (int(v) for v in original_hw)
    size = mask.shape[-1]
    new_h, new_w, top, left = _fit(h, w, size)
    inner = mask[..., top : top + new_h, left : left + new_w]
    return np.ascontiguousarray(inner[..., _nearest_index(new_h, h), :][..., _nearest_index(new_w, w)])
