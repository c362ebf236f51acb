"""From stored pixels to what a 2D network sees: one slice cut from a volume, intensities mapped to [0, 1] by
modality, and the aspect-preserving resize to the model grid (with its inverse for predictions)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ahm.data.formats.base import positive_pair
from ahm.errors import AhmError

Modality = Literal["mri", "ct", "photo", "auto"]


# ------------------------------------------------------------------------------------ slicing


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
    return None if rows is None or cols is None else positive_pair(rows, cols)


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

    Kept in numpy rather than MONAI `ScaleIntensityRangePercentiles` / `ScaleIntensityRange`: those compute the
    percentiles and the scaling in float32 (up to 3e-6 from these float64 figures on the test volumes), and a
    channel whose 0.5 and 99.5 percentiles coincide would give `x - lo` there, not the min/max fallback below.

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


def fit_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
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
    enlarging), keep the aspect ratio, zero-pad the rest centrally (MONAI `Resize`, then `SpatialPad`)."""
    import torch
    from monai.transforms import Resize, SpatialPad

    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 3:
        raise AhmError(f"resize_image expects [C, H, W], got shape {arr.shape}")
    _, h, w = arr.shape
    # The scaled shape is `fit_geometry`'s rather than Resize(size_mode="longest")'s: that mode rounds a side
    # of a very thin image (1000x3 to 64) down to 0 pixels where this keeps 1, and masks, pixel sizes and
    # `undo_resize` must share the geometry. SpatialPad's symmetric padding puts the odd pixel after, as
    # `fit_geometry`'s top/left do.
    new_h, new_w, _, _ = fit_geometry(h, w, size)
    scaled = torch.from_numpy(np.ascontiguousarray(arr))
    if (new_h, new_w) != (h, w):
        mode = "area" if new_h <= h and new_w <= w else "bilinear"
        with torch.no_grad():
            scaled = Resize((new_h, new_w), mode=mode, align_corners=False if mode == "bilinear" else None)(scaled)
    out = SpatialPad((size, size), mode="constant")(scaled)
    return np.asarray(out.as_tensor() if hasattr(out, "as_tensor") else out, dtype=np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """[H, W] labels -> [size, size] with the geometry of `resize_image` and nearest sampling (no blending).

    Not MONAI `Resize(mode="nearest-exact")`: it samples the same pixel centres, but torch computes the source
    index in float32, so where a centre falls exactly on a pixel edge it picks the neighbour (51 of 2,700
    shape/size pairs swept, e.g. 26x37 to 16); these indices are float64, shared with `undo_resize`."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise AhmError(f"resize_mask expects [H, W], got shape {mask.shape}")
    h, w = mask.shape
    new_h, new_w, top, left = fit_geometry(h, w, size)
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
    new_h, new_w, top, left = fit_geometry(h, w, size)
    inner = mask[..., top : top + new_h, left : left + new_w]
    return np.ascontiguousarray(inner[..., _nearest_index(new_h, h), :][..., _nearest_index(new_w, w)])
