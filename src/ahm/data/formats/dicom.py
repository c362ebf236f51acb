"""A single DICOM file: one 2D image (radiograph, mammogram, ultrasound, one CT/MR slice) or, with several
frames, a volume.

pydicom decodes the pixel data (compressed transfer syntaxes through its pylibjpeg plugins: JPEG baseline,
extended and lossless, JPEG-LS, JPEG 2000, RLE; deflate natively) and converts YBR colour to RGB; its
`pydicom.pixels` functions apply what the header says (modality LUT or rescale slope/intercept, VOI LUT or
window, palette colour). What is added here: the size and truncation checks before decoding, MONOCHROME1
inversion, the enhanced multi-frame functional groups, geometry, and one-line errors naming the file.
A folder of single-frame files, one series, is read by `ahm.data.formats.dicom_series`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    describe_error,
    header_volume,
    positive_pair,
    register,
)
from ahm.errors import AhmError

DICOM_SUFFIXES = (".dcm", ".dicom")
# Modalities whose values are calibrated (Hounsfield units, SUV, counts) or meant to be compared across a
# series: a display window would throw that away, so it is applied only to the others (radiographs,
# mammograms, ultrasound, secondary captures), where the window is part of how the image is meant to be seen.
_CALIBRATED = ("CT", "MR", "PT", "NM")
_NATIVE_SYNTAXES = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
)


@dataclass
class DicomInfo:
    """From the header only: geometry of the pixel data and what decoding will return."""

    path: Path
    ds: Any  # the pydicom Dataset without pixel data
    rows: int
    cols: int
    frames: int
    samples: int  # stored samples per pixel
    channels: int  # returned channels (palette colour: 3)
    photometric: str
    dtype: str  # stored sample type, numpy name

    @property
    def is_volume(self) -> bool:
        return self.frames > 1


def _int(ds, name: str, default: int) -> int:
    try:
        value = getattr(ds, name, None)
        return int(value) if value is not None and value != "" else default
    except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
        return default


def read_dicom_info(path: Path) -> DicomInfo:
    """Header of one DICOM file (pixel data not read); AhmError naming the file when it is no image."""
    check_file(path)
    return _info_from(path, read_header(path))


def read_header(path: Path):
    """The pydicom Dataset of one file without its pixel data, every element parsed; AhmError naming the file
    when it is not a DICOM image."""
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
        raise AhmError(f"{path}: not a readable DICOM file ({describe_error(exc)})") from exc
    if rows <= 0 or cols <= 0:
        raise AhmError(f"{path}: DICOM image has no pixels ({rows}x{cols})")
    return ds


def _info_from(path: Path, ds) -> DicomInfo:
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = _int(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise AhmError(f"{path}: NumberOfFrames is {frames}; the file holds no image")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "") or "MONOCHROME2").strip().upper()
    if samples not in (1, 3):
        raise AhmError(f"{path}: {samples} samples per pixel; expected 1 (grey) or 3 (colour)")
    bits = _int(ds, "BitsAllocated", 0)
    if bits not in (1, 8, 16, 32, 64):
        raise AhmError(f"{path}: BitsAllocated is {bits}; expected 1, 8, 16, 32 or 64")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        dtype = "float32" if bits == 32 else "float64"
    else:
        signed = _int(ds, "PixelRepresentation", 0) == 1
        dtype = "uint8" if bits in (1, 8) and not signed else f"{'int' if signed else 'uint'}{max(bits, 8)}"
    channels = samples
    if photometric == "PALETTE COLOR":
        channels = 3
        desc = getattr(ds, "RedPaletteColorLookupTableDescriptor", None)
        try:
            dtype = "uint8" if desc is not None and int(desc[2]) <= 8 else "uint16"
        except Exception:  # noqa: BLE001 - a corrupt descriptor fails when the palette is applied
            dtype = "uint16"
    return DicomInfo(path, ds, rows, cols, frames, samples, channels, photometric, dtype)


def _check_truncation(info: DicomInfo, ds) -> None:
    """Uncompressed pixel data shorter than the header declares is refused before it is read.

    `ds` was read with the pixel data deferred, so the element's declared length and file offset are known
    without loading it.
    """
    try:
        syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - no file meta: the decoder checks the length
        syntax = ""
    raw = ds.get_item(0x7FE00010)
    if raw is None or syntax not in _NATIVE_SYNTAXES:
        return  # float pixel data, encapsulated (compressed) frames: left to the decoder
    length = getattr(raw, "length", None)
    if length is None:  # small enough to have been read already
        value = getattr(raw, "value", None)
        length = len(value) if isinstance(value, bytes | bytearray) else None
    if length is None or length == 0xFFFFFFFF:
        return
    bits = _int(info.ds, "BitsAllocated", 8)
    # YBR_FULL_422 stores two samples per pixel (chroma shared by pixel pairs), not three.
    samples = 2 if info.photometric == "YBR_FULL_422" and info.samples == 3 else info.samples
    n = info.rows * info.cols * info.frames * samples
    needed = (n + 7) // 8 if bits == 1 else n * bits // 8
    size = info.path.stat().st_size
    tell = getattr(raw, "value_tell", None)
    have = int(length) if tell is None else min(int(length), max(0, size - int(tell)))
    if have < needed:
        raise AhmError(
            f"{info.path}: truncated DICOM file ({have} bytes of pixel data, the header needs {needed})"
        )


def _decode(info: DicomInfo):
    import pydicom

    try:
        ds = pydicom.dcmread(info.path, force=True, defer_size=4096)
        _guess_transfer_syntax(ds)
        _check_truncation(info, ds)
        arr = np.asarray(ds.pixel_array)  # YBR_* colour comes back as RGB
    except MemoryError as exc:
        raise AhmError(f"{info.path}: not enough memory to decode the image") from exc
    except Exception as exc:
        syntax = ""
        with contextlib.suppress(Exception):  # the syntax name only decorates the message
            syntax = f", transfer syntax {ds.file_meta.TransferSyntaxUID.name}"  # type: ignore[possibly-undefined]
        raise AhmError(f"{info.path}: truncated or undecodable DICOM pixel data ({describe_error(exc)}{syntax})") from exc
    expect: tuple[int, ...] = (info.rows, info.cols)
    if info.frames > 1:
        expect = (info.frames,) + expect
    if arr.shape[: len(expect)] != expect or arr.ndim not in (len(expect), len(expect) + 1):
        raise AhmError(
            f"{info.path}: pixel data shape {arr.shape} does not match the header "
            f"({info.frames} frame(s) of {info.rows}x{info.cols})"
        )
    if arr.dtype.kind not in "uif" and arr.dtype != bool:
        raise AhmError(f"{info.path}: unsupported sample type {arr.dtype}")
    return ds, arr


def _guess_transfer_syntax(ds) -> None:
    """Old files without file meta: their encoding, as pydicom parsed it, is their (uncompressed) syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return
    meta = meta if meta is not None else FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    ds.file_meta = meta


def _frame_rescale(ds, frames: int) -> list[Any] | None:
    """Enhanced multi-frame files keep slope/intercept in functional groups, per frame or shared."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return None
    items = []
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared_item = None
    try:
        if shared and "PixelValueTransformationSequence" in shared[0]:
            shared_item = shared[0].PixelValueTransformationSequence[0]
        for k in range(frames):
            item = shared_item
            if per_frame and k < len(per_frame) and "PixelValueTransformationSequence" in per_frame[k]:
                item = per_frame[k].PixelValueTransformationSequence[0]
            items.append(item)
    except Exception as exc:
        raise AhmError(f"{ds.filename}: unreadable functional groups ({describe_error(exc)})") from exc
    return items if any(i is not None for i in items) else None


def _modality_lut(ds, arr: np.ndarray, frames: int, ends: bool = False) -> np.ndarray:
    """pydicom's modality LUT/rescale; with `ends`, `arr` is the stored range, mapped as frame 0 is."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)  # the LUT is indexed by the stored values
    per_frame = _frame_rescale(ds, frames) if frames > 1 else None
    if per_frame is None:
        return apply_modality_lut(arr, ds)
    if ends:
        return apply_modality_lut(arr, per_frame[0]) if per_frame[0] is not None else arr
    out = np.empty(arr.shape, dtype=np.float64)
    for k, item in enumerate(per_frame):
        out[k] = apply_modality_lut(arr[k], item) if item is not None else arr[k]
    return out


def _stored_range(ds) -> np.ndarray:
    bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 8))
    if _int(ds, "PixelRepresentation", 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.float64)
    return np.array([0, 2**bits - 1], dtype=np.float64)


def _inverted(ds, photometric: str) -> bool:
    shape = str(getattr(ds, "PresentationLUTShape", "") or "").upper()
    return (photometric == "MONOCHROME1") != (shape == "INVERSE")


def _grey_pipeline(info: DicomInfo, ds, arr: np.ndarray, window: bool) -> np.ndarray:
    """Modality LUT (rescale), then for non-calibrated modalities the VOI LUT/window, then MONOCHROME1
    inversion: the values a viewer shows, with white for dense tissue."""
    from pydicom.pixels import apply_voi_lut

    try:
        out = _modality_lut(ds, arr, info.frames)
        ends = np.asarray(_modality_lut(ds, _stored_range(ds), info.frames, ends=True), dtype=np.float64)
        if window:
            out = apply_voi_lut(out, ds)
            ends = np.asarray(apply_voi_lut(ends, ds), dtype=np.float64)
    except AhmError:
        raise
    except Exception as exc:
        raise AhmError(f"{info.path}: unusable modality/VOI LUT in the header ({describe_error(exc)})") from exc
    if _inverted(ds, info.photometric):
        # Invert over the range the pipeline can produce (the stored range mapped the same way), so the
        # result does not depend on which values this particular image happens to hold.
        lo, hi = float(np.min(ends)), float(np.max(ends))
        out = (lo + hi) - np.asarray(out, dtype=np.float64)
    return np.asarray(out)


def _uses_window(ds) -> bool:
    return str(getattr(ds, "Modality", "") or "").strip().upper() not in _CALIBRATED


def _finish(info: DicomInfo, ds, arr: np.ndarray, as_labels: bool) -> np.ndarray:
    """Decoded pixels -> display values (or stored labels), channels last, frames first."""
    if as_labels:
        if info.samples != 1:
            raise AhmError(f"{info.path}: a colour DICOM image cannot be a label map")
        return arr
    if info.photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            return np.asarray(apply_color_lut(arr, ds))
        except Exception as exc:
            raise AhmError(f"{info.path}: unusable palette colour table ({describe_error(exc)})") from exc
    if info.samples == 1:
        return _grey_pipeline(info, ds, arr, window=info.frames == 1 and _uses_window(ds))
    return arr


def series_slice(path: Path, ds, labels: bool) -> np.ndarray:
    """One file of a DICOM series, its header `ds` already read: [rows, cols(, C)] with the modality LUT or
    rescale applied (labels too, as series readers do), MONOCHROME1 inverted and colour as RGB for images; no
    VOI window, so the slices of a series stay comparable."""
    info = _info_from(path, ds)
    full, arr = _decode(info)
    if labels:
        if info.samples != 1:
            raise AhmError(f"{path}: a colour DICOM image cannot be a label map")
        try:
            return np.asarray(_modality_lut(full, arr, 1))
        except AhmError:
            raise
        except Exception as exc:
            raise AhmError(f"{path}: unusable modality LUT in the header ({describe_error(exc)})") from exc
    if info.samples == 1 and info.photometric != "PALETTE COLOR":
        return _grey_pipeline(info, full, arr, window=False)
    return _finish(info, full, arr, as_labels=False)


def dicom_image(info: DicomInfo, as_mask: bool = False) -> np.ndarray:
    """One-frame file -> [C, H, W] (rows, columns) as shown, or stored values for a mask."""
    if info.is_volume:
        raise AhmError(
            f"{info.path}: multi-frame DICOM ({info.frames} frames) is a volume, not a 2D image; "
            "list it where volumes go"
        )
    ds, arr = _decode(info)
    if as_mask and info.photometric == "PALETTE COLOR":
        out = arr  # palette indices are the labels
    else:
        out = _finish(info, ds, arr, as_labels=as_mask and info.samples == 1)
    out = out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)
    return np.ascontiguousarray(out)


def dicom_volume(info: DicomInfo, labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Any file -> data [X, Y, Z(, C)] (columns, rows, frames) and a voxel -> RAS+ affine."""
    ds, arr = _decode(info)
    arr = _finish(info, ds, arr, as_labels=labels)
    if info.frames == 1:
        arr = arr[None]
    # [Z, rows, cols(, C)] -> [cols, rows, Z(, C)]
    order = (2, 1, 0) if arr.ndim == 3 else (2, 1, 0, 3)
    return np.ascontiguousarray(np.transpose(arr, order)), _affine(info)


def _group_value(ds, seq: str, name: str, frame: int | None = None):
    """A geometry field from the top level, else the shared or per-frame functional groups."""
    if frame is None and name in ds:
        return getattr(ds, name)
    sources = []
    if frame is not None:
        per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        if per_frame and frame < len(per_frame):
            sources.append(per_frame[frame])
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared:
        sources.append(shared[0])
    for item in sources:
        if seq in item and item[seq].value and name in item[seq].value[0]:
            return getattr(item[seq].value[0], name)
    return getattr(ds, name, None) if frame is not None else None


def _floats(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a corrupt or absent field counts as absent
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def slice_step(first: np.ndarray | None, last: np.ndarray | None, count: int, normal: np.ndarray,
               between: np.ndarray | None, thickness: np.ndarray | None) -> np.ndarray | None:
    """The voxel step along the slice axis (LPS mm): first to last slice position over `count - 1`, else
    `normal` times SpacingBetweenSlices, else times SliceThickness (each used only when > 0); None when the
    header gives none of them. Shared by multi-frame files and series so the affine and the 3D spacing check
    agree on what is known."""
    if count > 1 and first is not None and last is not None and np.linalg.norm(last - first) > 1e-9:
        return (last - first) / (count - 1)
    for value in (between, thickness):
        if value is not None and float(value[0]) > 0:
            return normal * float(value[0])
    return None


def _measure(ds, name: str) -> Any:
    """A PixelMeasuresSequence field: top level or shared groups, else the first frame's own groups."""
    value = _group_value(ds, "PixelMeasuresSequence", name)
    return value if value is not None else _group_value(ds, "PixelMeasuresSequence", name, 0)


def _geometry(info: DicomInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None,
                                       np.ndarray | None]:
    """Row and column directions, PixelSpacing (None when absent or not > 0), first frame position and slice
    step (None when unknown), all LPS, as the header gives them."""
    ds = info.ds
    try:
        iop = _floats(_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        spacing = _floats(_measure(ds, "PixelSpacing"), 2)
        first = _floats(_group_value(ds, "PlanePositionSequence", "ImagePositionPatient", 0), 3)
        last = (
            _floats(_group_value(ds, "PlanePositionSequence", "ImagePositionPatient", info.frames - 1), 3)
            if info.frames > 1
            else None
        )
        between = _floats([_measure(ds, "SpacingBetweenSlices")], 1)
        thickness = _floats([_measure(ds, "SliceThickness")], 1)
    except Exception:  # noqa: BLE001 - geometry is optional; without it the affine is the identity
        iop = spacing = first = last = between = thickness = None
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    if iop is not None and np.linalg.norm(np.cross(iop[:3], iop[3:])) > 1e-6:
        row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    if spacing is not None and (spacing <= 0).any():
        spacing = None
    step = slice_step(first, last, info.frames, np.cross(row, col), between, thickness)
    return row, col, spacing, first, step


def _spacing_problem(info: DicomInfo) -> str | None:
    """Why a multi-frame file's voxel size is unknown (one line naming it), or None: PixelSpacing > 0 and a
    slice step are what 3D resampling needs; `_affine` would otherwise put 1 mm in their place."""
    _, _, spacing, _, step = _geometry(info)
    if spacing is None:
        return (f"{info.path}: the multi-frame DICOM file has no PixelSpacing > 0 (top level or "
                "PixelMeasuresSequence), so its voxel size is unknown")
    if step is None:
        return (f"{info.path}: the multi-frame DICOM file gives no slice step (distinct ImagePositionPatient "
                "of its frames, SpacingBetweenSlices or SliceThickness > 0), so its slice spacing is unknown")
    return None


def _affine(info: DicomInfo) -> np.ndarray:
    """Voxel (column, row, frame) -> RAS+ mm; 1 mm and the identity where the header gives no geometry (the 2D
    path reads such files; the 3D path refuses them first, `spacing_problem`)."""
    row, col, spacing, first, step = _geometry(info)
    if spacing is None:
        spacing = np.array([1.0, 1.0])
    if step is None:
        step = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]  # PixelSpacing is (between rows, between columns)
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = first if first is not None else np.zeros(3)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@register
class DicomFileReader(Reader):
    """One file: a 2D image with one frame, a volume with several."""

    name = "dicom"
    rank = 40
    suffixes = DICOM_SUFFIXES
    reads_images = True
    reads_volumes = True
    volume_kinds = ".dcm (multi-frame)"

    def is_volume(self, path: Path) -> bool:
        return read_dicom_info(path).is_volume

    def read_pixels(self, path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
        info = read_dicom_info(path)
        check_pixels(path, info.rows, info.cols, max_pixels)
        check_channels(path, info.channels)
        return check_numeric(path, dicom_image(info, as_mask=as_mask)), info.dtype

    def image_info(self, path: Path, max_pixels: int) -> ImageInfo:
        info = read_dicom_info(path)
        if info.is_volume:
            raise AhmError(f"{path}: multi-frame DICOM ({info.frames} frames) is a volume, not a 2D image")
        check_pixels(path, info.rows, info.cols, max_pixels)
        return ImageInfo(path, info.rows, info.cols, info.channels, info.dtype)

    def pixel_size(self, path: Path) -> tuple[float, float] | None:
        info = read_dicom_info(path)
        spacing = None if info.is_volume else _geometry(info)[2]
        return None if spacing is None else positive_pair(spacing[0], spacing[1])

    def read_volume(self, path: Path, max_voxels: int, labels: bool) -> Volume:
        info = read_dicom_info(path)
        shape: tuple[int, ...] = (info.cols, info.rows, info.frames) + ((info.channels,) if info.channels > 1 else ())
        check_voxels(path, shape, max_voxels)
        data, affine = dicom_volume(info, labels=labels)
        _, _, pixel_spacing, _, step = _geometry(info)
        known = (pixel_spacing is not None, pixel_spacing is not None, step is not None)
        return header_volume(path, data, affine, known, labels)

    def volume_info(self, path: Path) -> tuple[tuple[int, int, int], int]:
        info = read_dicom_info(path)
        return (info.cols, info.rows, info.frames), info.channels

    def count_slices(self, path: Path, axis: int) -> int:
        info = read_dicom_info(path)
        return [info.cols, info.rows, info.frames][axis]

    def spacing_problem(self, path: Path) -> str | None:
        return _spacing_problem(read_dicom_info(path))
