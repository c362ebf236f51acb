"""A DICOM series: a folder of single-frame files, one slice each, read as one volume.

Slices are ordered by their position along the slice normal (InstanceNumber, then file name, when positions are
missing); each is decoded as `ahm.data.formats.dicom` decodes a file, without a display window, so the slices
of a series stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ahm.data.formats.base import (
    Reader,
    Volume,
    check_numeric,
    describe_error,
    image_voxels,
    known_sizes,
    label_voxels,
    register,
)
from ahm.data.formats.dicom import read_header, series_slice, slice_step
from ahm.errors import AhmError


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
        ds = read_header(p)
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
    """One slice of a series through pydicom's decoders and LUT functions (`ahm.data.formats.dicom.series_slice`)."""
    try:
        slope = float(s.ds.RescaleSlope) if getattr(s.ds, "RescaleSlope", None) is not None else 1.0
        intercept = float(s.ds.RescaleIntercept) if getattr(s.ds, "RescaleIntercept", None) is not None else 0.0
    except Exception as exc:
        raise AhmError(f"{s.path}: unreadable RescaleSlope/RescaleIntercept ({describe_error(exc)})") from exc
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise AhmError(f"{s.path}: RescaleSlope/RescaleIntercept is not a finite number")
    arr = series_slice(s.path, s.ds, labels)
    rows, cols = int(s.ds.Rows), int(s.ds.Columns)
    if arr.shape[:2] != (rows, cols) or arr.ndim not in (2, 3):
        raise AhmError(f"{s.path}: pixel data shape {arr.shape} does not match {rows}x{cols}")
    return check_numeric(s.path, arr)


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
    voxel_mm = known_sizes(affine, (pixel_spacing is not None, pixel_spacing is not None, step is not None))
    values = label_voxels(folder, stack) if labels else image_voxels(folder, stack)
    return Volume(values, affine, folder, voxel_mm)


@register
class DicomSeriesReader(Reader):
    """Any folder: the only folders read as images are DICOM series."""

    name = "dicom-series"
    rank = 90
    reads_volumes = True
    volume_kinds = "a folder of DICOM files"

    def handles(self, path: Path) -> bool:
        return path.is_dir()

    def is_volume(self, path: Path) -> bool:
        return True

    def read_volume(self, path: Path, max_voxels: int, labels: bool) -> Volume:
        return _dicom_read(path, max_voxels, labels)

    def volume_info(self, path: Path) -> tuple[tuple[int, int, int], int]:
        slices = _dicom_scan(path)
        ds = slices[0].ds
        try:
            samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        except Exception:  # noqa: BLE001 - a corrupt header field counts as absent
            samples = 1
        return (int(ds.Columns), int(ds.Rows), len(slices)), samples

    def count_slices(self, path: Path, axis: int) -> int:
        slices = _dicom_scan(path)
        ds = slices[0].ds
        return [int(ds.Columns), int(ds.Rows), len(slices)][axis]

    def spacing_problem(self, path: Path) -> str | None:
        """PixelSpacing > 0 and a slice step (distinct first and last ImagePositionPatient, SpacingBetweenSlices
        or SliceThickness > 0) are what 3D resampling needs: without them the affine holds an invented 1 mm,
        which the 2D path may use (it never resamples)."""
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
