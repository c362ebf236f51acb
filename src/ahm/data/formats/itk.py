"""NRRD and MetaImage files (.nrrd, .nhdr, .mha, .mhd), as written by 3D Slicer, ITK-SNAP and pyradiomics.

SimpleITK reads them (header first, then pixels); this module adds what `ahm` needs around it: the size
and truncation checks before any pixel is decoded, the detached data file of a `.nhdr`/`.mhd` kept inside
its folder, geometry as a RAS+ affine, and one-line errors naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ahm.data.formats.base import (
    ImageInfo,
    Reader,
    Volume,
    check_channels,
    check_file,
    check_numeric,
    check_pixels,
    check_voxels,
    header_volume,
    positive_pair,
    register,
)
from ahm.errors import AhmError

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# Each suffix is read by its own ImageIO only: a PNG renamed .mha is refused, not silently decoded.
_IMAGE_IO = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}
# A text header longer than this is not one (NRRD/MetaImage headers are a few hundred bytes).
_MAX_HEADER_BYTES = 1 << 20


@dataclass
class ItkInfo:
    """What the header declares: `size` in ITK order (x, y[, z[, t]]), components per pixel, sample type."""

    path: Path
    size: tuple[int, ...]
    components: int
    dtype: np.dtype
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def is_volume(self) -> bool:
        """3D or more with more than one slice; a 2D file (or one slice) is an image."""
        return self.dimension >= 3 and self.size[2] > 1


def _sitk():
    import SimpleITK as sitk

    # ITK would print warnings (e.g. about non-orthogonal directions) on stderr; library code never prints.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _describe(exc: BaseException) -> str:
    # ITK messages span several lines (source file, line, object address); the last non-empty line says why.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")] or lines
    text = (lines[-1] if lines else type(exc).__name__)[:200]
    return text


def _dtype_of(sitk, pixel_id: int) -> np.dtype | None:
    table = {
        "UInt8": np.uint8,
        "Int8": np.int8,
        "UInt16": np.uint16,
        "Int16": np.int16,
        "UInt32": np.uint32,
        "Int32": np.int32,
        "UInt64": np.uint64,
        "Int64": np.int64,
        "Float32": np.float32,
        "Float64": np.float64,
    }
    for name, dtype in table.items():
        for prefix in ("sitk", "sitkVector"):
            if getattr(sitk, prefix + name, None) == pixel_id:
                return np.dtype(dtype)
    return None


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def read_itk_info(path: Path) -> ItkInfo:
    """The header of a NRRD/MetaImage file; no pixel is decoded. AhmError naming the file on failure."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_IMAGE_IO[_suffix(path)])
    _check_header(path)
    try:
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
        pixel_id = reader.GetPixelID()
        spacing = tuple(float(v) for v in reader.GetSpacing())
        origin = tuple(float(v) for v in reader.GetOrigin())
        direction = tuple(float(v) for v in reader.GetDirection())
    except Exception as exc:
        raise AhmError(f"{path}: not a readable {_kind(path)} file ({_describe(exc)})") from exc
    dtype = _dtype_of(sitk, pixel_id)
    if dtype is None:
        raise AhmError(
            f"{path}: unsupported voxel type {sitk.GetPixelIDValueAsString(pixel_id)} "
            "(expected integers or real numbers)"
        )
    if not size or min(size) <= 0:
        raise AhmError(f"{path}: the header declares no voxels (size {size})")
    if len(size) > 4:
        raise AhmError(f"{path}: {len(size)}-dimensional image; expected 2D, 3D or 4D")
    return ItkInfo(path, size, max(components, 1), dtype, spacing, origin, direction)


def _kind(path: Path) -> str:
    return "NRRD" if _suffix(path) in (".nrrd", ".nhdr") else "MetaImage"


# --------------------------------------------------------------------------------------------- headers
# Hand-written because ITK exposes neither where the pixel data starts nor which file holds it, and both
# are needed to refuse a truncated file, or a header pointing outside its folder, before decoding.


def _header_text(path: Path) -> tuple[list[str], int]:
    """The header lines and the byte offset where attached data begins (end of header)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAX_HEADER_BYTES)
    except OSError as exc:
        raise AhmError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    lines: list[str] = []
    offset = 0
    nrrd = _suffix(path) in (".nrrd", ".nhdr")
    for raw in head.split(b"\n"):
        end = offset + len(raw) + 1
        line = raw.rstrip(b"\r").decode("latin-1")
        if nrrd and not line.strip() and lines:  # a blank line ends a NRRD header
            return lines, end
        lines.append(line)
        offset = end
        if not nrrd and line.split("=", 1)[0].strip() == "ElementDataFile":  # the last MetaImage field
            return lines, offset
    return lines, min(offset, len(head))


def _field(lines: list[str], names: tuple[str, ...], sep: str) -> str | None:
    for line in lines:
        if sep in line:
            key, value = line.split(sep, 1)
            if key.strip().lower() in names:
                return value.strip()
    return None


def _data_files(path: Path, lines: list[str]) -> list[str] | None:
    """Names of the detached data files a header refers to; None when the data is in the file itself."""
    if _suffix(path) in (".nrrd", ".nhdr"):
        value = _field(lines, ("data file", "datafile"), ":")
        if value is None:
            return None
        if value.split()[0].upper() == "LIST":
            start = next(i for i, ln in enumerate(lines) if ln.lower().lstrip().startswith(("data file", "datafile")))
            return [ln.strip() for ln in lines[start + 1 :] if ln.strip()]
        return [value.split()[0] if "%" in value else value]
    value = _field(lines, ("elementdatafile",), "=")
    if value is None or value.upper() == "LOCAL":
        return None
    if value.split()[0].upper() == "LIST":
        start = next(i for i, ln in enumerate(lines) if ln.split("=", 1)[0].strip() == "ElementDataFile")
        return [ln.strip() for ln in lines[start + 1 :] if ln.strip()]
    return [value]


def detached_data_files(path: str | Path) -> list[Path]:
    """The data files a `.nhdr`/`.mhd` header names (beside it); [] for a file that holds its own data."""
    path = Path(path)
    if _suffix(path) not in (".nhdr", ".mhd", ".nrrd", ".mha"):
        return []
    names = _data_files(path, _header_text(path)[0]) or []
    return [path.parent / name for name in names if "%" not in name]


_METAIMAGE_REQUIRED = ("NDims", "DimSize", "ElementType", "ElementDataFile")


def _check_header(path: Path) -> None:
    """The fields ITK needs, before ITK sees the file: its MetaImage parser reports a missing field on the
    terminal and then only 'cannot parse', without saying which."""
    lines = _header_text(path)[0]
    if _suffix(path) in (".nrrd", ".nhdr"):
        if not lines or not lines[0].startswith("NRRD"):
            raise AhmError(f"{path}: not a NRRD file (it does not start with the NRRD magic)")
    else:
        keys = {line.split("=", 1)[0].strip() for line in lines if "=" in line}
        missing = [k for k in _METAIMAGE_REQUIRED if k not in keys]
        if missing:
            raise AhmError(f"{path}: not a MetaImage file (no {', '.join(missing)} in the header)")
    for name in _data_files(path, lines) or []:
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
            raise AhmError(
                f"{path}: the header's data file {name!r} points outside its folder "
                "(absolute paths and '..' are not allowed)"
            )


def _spacing_problem(path: str | Path) -> str | None:
    """Why a NRRD/MetaImage volume's voxel size is unknown (one line naming it), or None. ITK reads a header
    without one as 1 mm per voxel, which the 2D path may use (it never resamples) but 3D resampling must not."""
    path = Path(path)
    lines = _header_text(path)[0]
    if _suffix(path) in (".nrrd", ".nhdr"):
        if _field(lines, ("space directions", "spacings"), ":") is None:
            return (f"{path}: the NRRD header gives no voxel size (no 'space directions' or 'spacings' field), "
                    "so data.spatial_dims 3 cannot resample it")
        return None
    if _field(lines, ("elementspacing", "elementsize"), "=") is None:
        return (f"{path}: the MetaImage header gives no voxel size (no ElementSpacing or ElementSize), so "
                "data.spatial_dims 3 cannot resample it")
    return None


def _raw_encoding(path: Path, lines: list[str]) -> bool:
    if _suffix(path) in (".nrrd", ".nhdr"):
        encoding = (_field(lines, ("encoding",), ":") or "").lower()
        return encoding == "raw" and _field(lines, ("byte skip", "byteskip", "line skip", "lineskip"), ":") is None
    compressed = (_field(lines, ("compresseddata",), "=") or "false").lower()
    return compressed in ("false", "0") and _field(lines, ("headersize",), "=") is None


def _check_truncation(info: ItkInfo) -> None:
    """Refuse raw data shorter than the header declares (compressed data is checked by the decoder)."""
    path = info.path
    lines, data_offset = _header_text(path)
    if not _raw_encoding(path, lines):
        return
    needed = int(np.prod(info.size, dtype=np.float64)) * info.components * info.dtype.itemsize
    names = _data_files(path, lines)
    if names is None:
        have = path.stat().st_size - data_offset
        where = path
    else:
        if len(names) != 1 or "%" in names[0]:
            return  # data split over several files: left to the decoder
        where = path.parent / names[0]
        if not where.is_file():
            raise AhmError(f"{path}: its data file {where.name} is missing")
        have = where.stat().st_size
    if have < needed:
        raise AhmError(f"{path}: truncated {_kind(path)} data ({have} bytes in {where.name}, the header needs {needed})")


def read_itk_pixels(info: ItkInfo) -> np.ndarray:
    """Pixels in ITK order reversed by SimpleITK ([z, y, x] or [y, x], then components), as stored."""
    _check_truncation(info)
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(info.path))
    reader.SetImageIO(_IMAGE_IO[_suffix(info.path)])
    try:
        image = reader.Execute()
        arr = sitk.GetArrayFromImage(image)
    except MemoryError as exc:
        raise AhmError(f"{info.path}: not enough memory to read the image") from exc
    except Exception as exc:
        raise AhmError(f"{info.path}: truncated or unreadable {_kind(info.path)} data ({_describe(exc)})") from exc
    return np.asarray(arr)


def itk_volume(info: ItkInfo) -> tuple[np.ndarray, np.ndarray]:
    """Data [X, Y, Z] or [X, Y, Z, C] (a 2D file gives Z = 1; a 4th axis or vector pixels give C) and its
    voxel -> RAS+ affine (ITK geometry is LPS+)."""
    dim = info.dimension
    if dim == 4 and info.components > 1:
        raise AhmError(f"{info.path}: 4D image with vector pixels is not supported")
    arr = read_itk_pixels(info)
    spatial = min(dim, 3)
    # SimpleITK returns the axes reversed ([t,] z, y, x), components last.
    order = list(range(dim))[::-1]
    if info.components > 1:
        order.append(dim)
    arr = np.transpose(arr, order)  # -> x, y[, z[, t]][, c]
    if dim == 2:
        arr = arr[:, :, None] if info.components == 1 else arr[:, :, None, :]
    direction = np.asarray(info.direction, dtype=np.float64).reshape(dim, dim)[:spatial, :spatial]
    lps = np.eye(4)
    lps[:spatial, :spatial] = direction * np.asarray(info.spacing[:spatial])[None, :]
    lps[:spatial, 3] = info.origin[:spatial]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if not np.isfinite(affine).all():
        affine = np.eye(4)
    return arr, affine


def itk_image(info: ItkInfo) -> np.ndarray:
    """A 2D file (or a 3D file of one slice) as [C, H, W]: H along y, W along x, as viewers show it."""
    if info.is_volume or info.dimension > 3:
        raise AhmError(
            f"{info.path}: {'x'.join(map(str, info.size))} image is a volume, not a 2D image; "
            "list it where volumes go"
        )
    arr = read_itk_pixels(info)
    if info.dimension == 3:
        arr = arr[0]  # [1, y, x(, c)] -> [y, x(, c)]
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def _info(path: Path) -> ItkInfo:
    check_file(path)
    return read_itk_info(path)


@register
class ItkReader(Reader):
    """A 2D file, or a 3D one of one slice, is an image; more slices (or a 4th axis) make a volume."""

    name = "itk"
    rank = 50
    suffixes = ITK_SUFFIXES
    reads_images = True
    reads_volumes = True
    volume_kinds = ".nrrd, .nhdr, .mha, .mhd"

    def is_volume(self, path: Path) -> bool:
        itk = _info(path)
        return itk.is_volume or itk.dimension > 3

    def read_pixels(self, path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
        itk = _info(path)
        check_pixels(path, itk.size[1] if itk.dimension > 1 else 1, itk.size[0], max_pixels)
        check_channels(path, itk.components)
        return check_numeric(path, itk_image(itk)), str(itk.dtype)

    def image_info(self, path: Path, max_pixels: int) -> ImageInfo:
        itk = _info(path)
        if itk.is_volume or itk.dimension > 3:
            raise AhmError(f"{path}: {'x'.join(map(str, itk.size))} image is a volume, not a 2D image")
        height = itk.size[1] if itk.dimension > 1 else 1
        check_pixels(path, height, itk.size[0], max_pixels)
        return ImageInfo(path, height, itk.size[0], itk.components, str(itk.dtype))

    def pixel_size(self, path: Path) -> tuple[float, float] | None:
        itk = _info(path)
        if itk.is_volume or itk.dimension < 2 or _spacing_problem(path) is not None:
            return None
        return positive_pair(itk.spacing[1], itk.spacing[0])  # rows run along y, columns along x

    def read_volume(self, path: Path, max_voxels: int, labels: bool) -> Volume:
        itk = _info(path)
        shape = itk.size + ((itk.components,) if itk.components > 1 else ())
        check_voxels(path, shape, max_voxels)
        data, affine = itk_volume(itk)
        # itk_volume puts the identity in place of a non-finite geometry: then no size is recorded either
        recorded = _spacing_problem(path) is None and all(
            np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in (itk.spacing, itk.origin, itk.direction))
        known = (recorded, recorded and itk.dimension >= 2, recorded and itk.dimension >= 3)
        return header_volume(path, data, affine, known, labels)

    def volume_info(self, path: Path) -> tuple[tuple[int, int, int], int]:
        itk = _info(path)
        _check_truncation(itk)
        size = tuple(itk.size) + (1, 1)
        channels = itk.components * (itk.size[3] if itk.dimension == 4 else 1)
        return (int(size[0]), int(size[1]), int(size[2])), int(channels)

    def count_slices(self, path: Path, axis: int) -> int:
        return int((tuple(_info(path).size) + (1, 1))[axis])

    def spacing_problem(self, path: Path) -> str | None:
        return _spacing_problem(path)
