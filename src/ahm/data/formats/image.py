"""2D raster files: PNG, JPEG, BMP, GIF, WebP through Pillow; TIFF through tifffile (8/16-bit, float,
multi-channel, the first page of a stack)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ahm.data.formats.base import (
    ImageInfo,
    Reader,
    check_channels,
    check_numeric,
    check_pixels,
    describe_error,
    register,
)
from ahm.errors import AhmError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES

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
            f"{path}: image dimensions are too large ({describe_error(exc)}); refused before decoding"
        ) from exc
    except Exception as exc:
        raise AhmError(f"{path}: not a readable image ({describe_error(exc)})") from exc
    try:
        width, height = im.size
        check_pixels(path, height, width, max_pixels)
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
        raise AhmError(f"{path}: truncated or unreadable image ({describe_error(exc)})") from exc
    arr = check_numeric(path, np.array(arr))
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return np.ascontiguousarray(arr), source


@register
class PilReader(Reader):
    name = "pillow"
    rank = 10
    suffixes = PIL_SUFFIXES
    reads_images = True

    def read_pixels(self, path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
        im = _pil_open(path, max_pixels)
        with im:
            return _pil_decode(path, im, as_mask)

    def image_info(self, path: Path, max_pixels: int) -> ImageInfo:
        im = _pil_open(path, max_pixels)
        with im:
            width, height = im.size
            try:
                channels = _pil_channels(im)
            except Exception as exc:
                raise AhmError(f"{path}: unreadable image header ({describe_error(exc)})") from exc
            return ImageInfo(path, height, width, channels, _PIL_DTYPES.get(im.mode, "uint8"))


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
        raise AhmError(f"{path}: truncated or unreadable TIFF ({describe_error(exc)})") from exc
    dims = dict(zip(axes, shape))
    if "Y" not in dims or "X" not in dims or len(axes) != len(shape):
        raise AhmError(f"{path}: TIFF has no 2D image plane (axes {axes!r})")
    check_pixels(path, dims["Y"], dims["X"], max_pixels)
    channels = 1
    for ax in ("C", "S"):
        channels *= dims.get(ax, 1)
    if photometric == 2 and dims.get("S", 1) == 4 and extrasamples:  # RGB + alpha: alpha is dropped
        channels = channels // 4 * 3
    check_channels(path, channels)
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


def _tiff_file(path: Path):
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as exc:
        raise AhmError(f"{path}: not a readable TIFF ({describe_error(exc)})") from exc


def _stored_dtype(plan: dict) -> str:
    return "uint8" if plan["dtype"] == bool else str(plan["dtype"])  # noqa: E721 (a numpy dtype compares equal to bool)


@register
class TiffReader(Reader):
    name = "tiff"
    rank = 20
    suffixes = TIFF_SUFFIXES
    reads_images = True

    def read_pixels(self, path: Path, max_pixels: int, as_mask: bool) -> tuple[np.ndarray, str]:
        with _tiff_file(path) as tf:
            plan = _tiff_plan(path, tf, max_pixels)
            try:
                arr = _tiff_decode(path, tf, plan)
            except AhmError:
                raise
            except MemoryError as exc:
                raise AhmError(f"{path}: not enough memory to decode the image") from exc
            except Exception as exc:
                raise AhmError(f"{path}: truncated or unreadable TIFF ({describe_error(exc)})") from exc
        arr = check_numeric(path, np.array(arr))
        return np.ascontiguousarray(arr), _stored_dtype(plan)

    def image_info(self, path: Path, max_pixels: int) -> ImageInfo:
        with _tiff_file(path) as tf:
            plan = _tiff_plan(path, tf, max_pixels)
        dims = dict(zip(plan["axes"], plan["shape"]))
        return ImageInfo(path, dims["Y"], dims["X"], plan["channels"], _stored_dtype(plan))
