"""Fuzzing the readers: any byte string ends in a valid array or an AhmError naming the path.

Mutations of valid seed files: random bytes, truncation at a random offset, byte flips (anywhere and in
the header), zero size, huge declared dimensions, and headers declaring another sample type than the
data holds. Every case is counted; with $AHM_FUZZ_REPORT set, the counts are written there as JSON.
The hypothesis profile (tests/conftest.py) bounds the number of examples: "ci" by default, "long" for
a deeper run (AHM_FUZZ_PROFILE=long).
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import struct
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reader_samples import (
    gradient,
    png_chunk,
    set_nifti_shape,
    set_png_size,
    write_dicom_series,
    write_nifti,
    write_png,
    write_tiff,
)

from ahm.data.formats import Volume, read_image, read_label_volume, read_mask, read_volume
from ahm.errors import AhmError

# Corrupt headers make pydicom, nibabel and tifffile warn; the outcome, not the chatter, is under test.
pytestmark = pytest.mark.filterwarnings("ignore")

# A case that runs longer than this is a hang (the seeds are a few hundred bytes).
CASE_TIMEOUT_S = 20

STATS: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "valid": 0, "ahm_error": 0, "escaped": 0})
ESCAPES: list[str] = []


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in library code can swallow it."""


def _on_alarm(signum, frame):
    raise _Hang()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    target = os.environ.get("AHM_FUZZ_REPORT")
    if target:
        from ahm.io import write_json

        totals = {k: sum(s[k] for s in STATS.values()) for k in ("cases", "valid", "ahm_error", "escaped")}
        write_json(
            Path(target) / "fuzz_readers.json",
            {
                "profile": os.environ.get("AHM_FUZZ_PROFILE", "ci"),
                "max_examples": settings().max_examples,
                "totals": totals,
                "by_target": dict(STATS),
                "escapes": ESCAPES[:20],
            },
        )


def _valid_output(kind: str, out) -> bool:
    if kind == "image":
        return (
            isinstance(out, np.ndarray)
            and out.dtype == np.float32
            and out.ndim == 3
            and min(out.shape) > 0
            and bool(np.isfinite(out).all())
        )
    if kind == "mask":
        return (
            isinstance(out, np.ndarray)
            and out.dtype == np.int64
            and out.ndim == 2
            and min(out.shape) > 0
            and (out.size == 0 or out.min() >= 0)
        )
    if kind in ("volume", "labels"):
        if not isinstance(out, Volume) or out.affine.shape != (4, 4) or not np.isfinite(out.affine).all():
            return False
        if kind == "labels":
            return out.data.dtype.kind in "ui" and out.data.ndim == 3
        return out.data.dtype == np.float32 and out.data.ndim in (3, 4) and bool(np.isfinite(out.data).all())
    raise AssertionError(kind)


def _run_case(target: str, kind: str, fn, path: Path, note: str) -> None:
    """One fuzz case: count it, and fail the test on anything but a valid result or an AhmError naming `path`."""
    stats = STATS[target]
    stats["cases"] += 1
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        try:
            out = fn(path)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    except AhmError as exc:
        if str(path) in str(exc):
            stats["ahm_error"] += 1
            return
        stats["escaped"] += 1
        ESCAPES.append(f"{target} [{note}]: AhmError without the path: {exc}")
        raise AssertionError(f"AhmError does not name {path}: {exc}") from exc
    except _Hang:
        stats["escaped"] += 1
        ESCAPES.append(f"{target} [{note}]: no answer within {CASE_TIMEOUT_S} s")
        raise AssertionError(f"{target} [{note}]: hang") from None
    except Exception as exc:
        stats["escaped"] += 1
        ESCAPES.append(f"{target} [{note}]: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    if not _valid_output(kind, out):
        stats["escaped"] += 1
        ESCAPES.append(f"{target} [{note}]: invalid output {type(out).__name__}")
        raise AssertionError(f"{target} [{note}]: invalid output")
    stats["valid"] += 1


# ------------------------------------------------------------------------------------------------ seeds


def _build_seeds(root: Path) -> dict[str, list[tuple[str, bytes]]]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    g = gradient(12, 10)

    def data_of(path: Path) -> bytes:
        return path.read_bytes()

    pal = Image.fromarray((g % 3).astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(root / "pal.png")
    Image.fromarray(np.stack([g, g // 2, 255 - g], -1)).save(root / "c.jpg", quality=80)
    mask = np.zeros((12, 10), np.uint8)
    mask[3:8, 2:7] = 255
    seeds = {
        "png": [
            (".png", data_of(write_png(root / "g.png", g))),
            (".png", data_of(write_png(root / "rgb.png", np.stack([g, 255 - g, g // 2], -1)))),
            (".png", data_of(write_png(root / "rgba.png", np.stack([g, g, g, 255 - g], -1)))),
            (".png", data_of(write_png(root / "g16.png", gradient(12, 10, 60000, np.uint16)))),
            (".png", data_of(root / "pal.png")),
        ],
        "jpeg": [(".jpg", data_of(root / "c.jpg"))],
        "tiff": [
            (".tif", data_of(write_tiff(root / "u8.tif", g))),
            (".tif", data_of(write_tiff(root / "rgb.tif", np.stack([g, g, 255 - g], -1), photometric="rgb"))),
            (
                ".tif",
                data_of(
                    write_tiff(
                        root / "mc.tif",
                        rng.integers(0, 4000, (4, 12, 10), dtype=np.uint16),
                        photometric="minisblack",
                        planarconfig="separate",
                    )
                ),
            ),
            (".tif", data_of(write_tiff(root / "f.tif", rng.normal(size=(12, 10)).astype(np.float32)))),
            (".tif", data_of(write_tiff(root / "z.tif", g, compression="zlib"))),
            (".tif", data_of(write_tiff(root / "stack.tif", np.stack([g, g]), photometric="minisblack"))),
            (".tif", data_of(write_tiff(root / "i8.tif", (g.astype(np.int16) - 128).astype(np.int8)))),
            (".tif", data_of(write_tiff(root / "f64.tif", rng.normal(size=(12, 10))))),
            (".tif", data_of(write_tiff(root / "cx.tif", np.ones((4, 4), np.complex64)))),
            (".tif", data_of(write_tiff(root / "b.tif", g > 100))),
        ],
        "mask": [
            (".png", data_of(write_png(root / "m.png", mask))),
            (".png", data_of(root / "pal.png")),
            (".png", data_of(write_png(root / "m3.png", np.repeat(mask[..., None], 3, -1)))),
            (".tif", data_of(write_tiff(root / "mf.tif", (mask // 255).astype(np.float32)))),
        ],
    }
    vol = rng.normal(100, 20, (6, 5, 4)).astype(np.float32)
    labels = (rng.random((6, 5, 4)) > 0.6).astype(np.uint8) * 2
    import nibabel as nib

    scaled = nib.Nifti1Image(rng.integers(-100, 100, (5, 4, 3)).astype(np.int16), np.eye(4))
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, str(root / "s.nii"))
    seeds["nifti"] = [
        (".nii", data_of(write_nifti(root / "v.nii", vol))),
        (".nii", data_of(write_nifti(root / "v4.nii", rng.normal(size=(4, 3, 3, 2)).astype(np.float32)))),
        (".nii", data_of(root / "s.nii")),
        (".nii", data_of(write_nifti(root / "l.nii", labels))),
        (".nii", data_of(write_nifti(root / "c.nii", np.ones((3, 3, 3), np.complex64)))),
    ]
    seeds["nifti_gz"] = [
        (".nii.gz", data_of(write_nifti(root / "v.nii.gz", vol))),
        (".nii.gz", data_of(write_nifti(root / "l.nii.gz", labels))),
    ]
    seeds["dicom_file"] = _dicom_file_seeds(root, rng)
    seeds["itk"] = _itk_seeds(root, rng, vol, labels)
    return seeds


def _dicom_file_seeds(root: Path, rng) -> list[tuple[str, bytes]]:
    """Single DICOM files: a CT slice, a MONOCHROME1 radiograph with a window, a multi-frame MR, RGB, RLE."""
    import pydicom
    from pydicom.uid import RLELossless

    ct = write_dicom_series(root / "one", rng.integers(-500, 1500, (1, 8, 6)).astype(np.int16))[0]
    out = [(".dcm", ct.read_bytes())]
    ds = pydicom.dcmread(ct)
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 0, 800
    ds.save_as(root / "dx.dcm", enforce_file_format=True)
    out.append((".dcm", (root / "dx.dcm").read_bytes()))
    ds.compress(RLELossless)
    ds.save_as(root / "rle.dcm", enforce_file_format=True)
    out.append((".dcm", (root / "rle.dcm").read_bytes()))
    ds = pydicom.dcmread(ct)
    ds.NumberOfFrames, ds.Modality = 3, "MR"
    ds.PixelData = rng.integers(0, 900, (3, 8, 6)).astype("<i2").tobytes()
    ds.save_as(root / "mf.dcm", enforce_file_format=True)
    out.append((".dcm", (root / "mf.dcm").read_bytes()))
    ds = pydicom.dcmread(ct)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = rng.integers(0, 255, (8, 6, 3)).astype(np.uint8).tobytes()
    ds.save_as(root / "rgb.dcm", enforce_file_format=True)
    out.append((".dcm", (root / "rgb.dcm").read_bytes()))
    return out


def _itk_seeds(root: Path, rng, vol: np.ndarray, labels: np.ndarray) -> list[tuple[str, bytes]]:
    """NRRD and MetaImage with their data attached (raw and gzip), 3D, 2D and vector."""
    import SimpleITK as sitk

    def written(name: str, arr: np.ndarray, **kwargs) -> tuple[str, bytes]:
        image = sitk.GetImageFromArray(arr, isVector=kwargs.pop("vector", False))
        image.SetSpacing((0.5,) * image.GetDimension())
        sitk.WriteImage(image, str(root / name), **kwargs)
        return Path(name).suffix, (root / name).read_bytes()

    return [
        written("v.nrrd", vol),
        written("z.nrrd", labels, useCompression=True),
        written("v.mha", vol.astype(np.int16)),
        written("z.mha", labels, useCompression=True),
        written("flat.mha", vol[0]),
        written("rgb.nrrd", rng.integers(0, 255, (5, 4, 3)).astype(np.uint8), vector=True),
    ]


with tempfile.TemporaryDirectory(prefix="ahm-fuzz-seeds-") as _tmp:
    SEEDS = _build_seeds(Path(_tmp))
    _ct = np.random.default_rng(1).integers(-500, 1500, (3, 8, 6)).astype(np.int16)
    DICOM_SEED = {p.name: p.read_bytes() for p in write_dicom_series(Path(_tmp) / "ct", _ct)}
    _labels = np.random.default_rng(2).integers(0, 4, (3, 8, 6)).astype(np.int16)
    DICOM_LABEL_SEED = {
        p.name: p.read_bytes()
        for p in write_dicom_series(Path(_tmp) / "labels", _labels, slope=1.0, intercept=0.0)
    }


# -------------------------------------------------------------------------------------------- mutations


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, xor in flips:
        if out:
            out[pos % len(out)] ^= xor
    return bytes(out)


def _png_header(data: bytes, depth: int, colour: int) -> bytes:
    ihdr = bytearray(data[16:29])
    ihdr[8], ihdr[9] = depth, colour
    return data[:8] + png_chunk(b"IHDR", bytes(ihdr)) + data[33:]


def _tiff_tag(data: bytes, code: int, value: int) -> bytes:
    import tifffile

    out = bytearray(data)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            tag = tf.pages[0].tags.get(code)
            if tag is None or tag.count != 1 or int(tag.dtype) not in (3, 4):
                return data
            fmt = {3: "<H", 4: "<I"}[int(tag.dtype)]
            out[tag.valueoffset : tag.valueoffset + struct.calcsize(fmt)] = struct.pack(
                fmt, value % (2 ** (8 * struct.calcsize(fmt)))
            )
    except Exception:  # noqa: BLE001 - a seed without that tag is left as it is
        return data
    return bytes(out)


def _nifti_dtype(data: bytes, code: int, bitpix: int) -> bytes:
    out = bytearray(data)
    out[70:74] = struct.pack("<hh", code, bitpix)
    return bytes(out)


NIFTI_CODES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 0, 7, 9999]


@st.composite
def mutated(draw, seeds: list[tuple[str, bytes]], fmt: str):
    suffix, data = draw(st.sampled_from(seeds))
    kinds = ["random", "truncate", "flip", "header_flip", "zero", "huge", "dtype"]
    kind = draw(st.sampled_from(kinds))
    note = kind
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=2048))
    elif kind == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        data, note = data[:cut], f"truncate@{cut}"
    elif kind in ("flip", "header_flip"):
        hi = len(data) - 1 if kind == "flip" else min(len(data) - 1, 400)
        flips = draw(st.lists(st.tuples(st.integers(0, hi), st.integers(1, 255)), min_size=1, max_size=8))
        data, note = _flip(data, flips), f"{kind}{flips}"
    elif kind == "zero":
        data = b""
    elif kind == "huge":
        dims = draw(st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)))
        note = f"huge{dims}"
        if fmt in ("png", "mask") and suffix == ".png":
            data = set_png_size(data, *dims)
        elif suffix == ".tif":
            data = _tiff_tag(_tiff_tag(data, 256, dims[0]), 257, dims[1])
        elif fmt.startswith("nifti"):
            shape = draw(st.tuples(*[st.integers(1, 32767)] * draw(st.integers(1, 7))))
            raw = gzip.decompress(data) if suffix == ".nii.gz" else data
            raw = set_nifti_shape(raw, shape)
            data, note = (gzip.compress(raw) if suffix == ".nii.gz" else raw), f"huge{shape}"
        else:
            data = _flip(data, [(draw(st.integers(0, min(len(data) - 1, 200))), 0xFF)])
    elif kind == "dtype":
        if suffix == ".png":
            depth, colour = (
                draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0])),
                draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])),
            )
            data, note = _png_header(data, depth, colour), f"dtype(depth={depth}, colour={colour})"
        elif suffix == ".tif":
            code = draw(st.sampled_from([258, 339, 277, 262, 259, 284, 278]))
            value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 65535]))
            data, note = _tiff_tag(data, code, value), f"dtype(tag {code}={value})"
        elif fmt.startswith("nifti"):
            code, bitpix = (
                draw(st.sampled_from(NIFTI_CODES)),
                draw(st.sampled_from([0, 1, 8, 16, 32, 64, 128, 7])),
            )
            raw = gzip.decompress(data) if suffix == ".nii.gz" else data
            raw = _nifti_dtype(raw, code, bitpix)
            data, note = (gzip.compress(raw) if suffix == ".nii.gz" else raw), f"dtype({code}, {bitpix})"
        else:  # JPEG: no sample type field worth changing; flip the frame header instead
            data = _flip(
                data,
                draw(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), min_size=1, max_size=3)),
            )
    return suffix, data, note


def _case_file(folder: str, suffix: str, data: bytes) -> Path:
    path = Path(folder) / f"case{suffix}"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- targets


@given(mutated(SEEDS["png"], "png"))
def test_fuzz_read_image_png(case):
    suffix, data, note = case
    with tempfile.TemporaryDirectory() as d:
        _run_case("read_image.png", "image", read_image, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["jpeg"], "jpeg"))
def test_fuzz_read_image_jpeg(case):
    suffix, data, note = case
    with tempfile.TemporaryDirectory() as d:
        _run_case("read_image.jpeg", "image", read_image, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["tiff"], "tiff"))
def test_fuzz_read_image_tiff(case):
    suffix, data, note = case
    with tempfile.TemporaryDirectory() as d:
        _run_case("read_image.tiff", "image", read_image, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["mask"], "mask"))
def test_fuzz_read_mask(case):
    suffix, data, note = case
    with tempfile.TemporaryDirectory() as d:
        _run_case("read_mask", "mask", read_mask, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["nifti"], "nifti"), st.booleans())
def test_fuzz_read_volume_nifti(case, as_labels):
    suffix, data, note = case
    with tempfile.TemporaryDirectory() as d:
        if as_labels:
            _run_case("read_label_volume.nii", "labels", read_label_volume, _case_file(d, suffix, data), note)
        else:
            _run_case("read_volume.nii", "volume", read_volume, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["nifti_gz"], "nifti_gz"))
def test_fuzz_read_volume_nifti_gz(case):
    suffix, data, note = case
    with tempfile.TemporaryDirectory() as d:
        _run_case("read_volume.nii.gz", "volume", read_volume, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["dicom_file"], "dicom_file"), st.sampled_from(["image", "volume", "labels"]))
def test_fuzz_read_dicom_file(case, kind):
    suffix, data, note = case
    reader = {"image": read_image, "volume": read_volume, "labels": read_label_volume}[kind]
    with tempfile.TemporaryDirectory() as d:
        _run_case(f"{reader.__name__}.dcm", kind, reader, _case_file(d, suffix, data), note)


@given(mutated(SEEDS["itk"], "itk"), st.sampled_from(["image", "volume", "labels"]))
def test_fuzz_read_nrrd_metaimage(case, kind):
    suffix, data, note = case
    reader = {"image": read_image, "volume": read_volume, "labels": read_label_volume}[kind]
    with tempfile.TemporaryDirectory() as d:
        _run_case(f"{reader.__name__}{suffix}", kind, reader, _case_file(d, suffix, data), note)


def _dicom_variant(path: Path, draw) -> str:
    """Rewrite one slice's header so it declares another sample type or size than its pixels hold."""
    import pydicom

    ds = pydicom.dcmread(path)
    field = draw(
        st.sampled_from(
            [
                "BitsAllocated",
                "PixelRepresentation",
                "SamplesPerPixel",
                "Rows",
                "Columns",
                "RescaleSlope",
                "PhotometricInterpretation",
                "NumberOfFrames",
            ]
        )
    )
    if field == "BitsAllocated":
        value = draw(st.sampled_from([1, 8, 12, 32, 64]))
    elif field == "PixelRepresentation":
        value = draw(st.sampled_from([0, 1, 2]))
    elif field == "SamplesPerPixel":
        value = draw(st.sampled_from([0, 3, 4]))
    elif field in ("Rows", "Columns"):
        value = draw(st.sampled_from([0, 1, 7, 9, 4096, 65535]))
    elif field == "RescaleSlope":
        value = draw(st.sampled_from(["nan", "inf", "1e308", "0", "abc"]))
    elif field == "PhotometricInterpretation":
        value = draw(st.sampled_from(["RGB", "PALETTE COLOR", "YBR_FULL", "MONOCHROME1"]))
    else:
        value = draw(st.sampled_from([0, 2, 3, 1000]))
    try:
        setattr(ds, field, value)
        ds.save_as(path, enforce_file_format=True)
    except Exception:  # noqa: BLE001
        # pydicom refused to write an invalid value; flip its raw bytes instead.
        data = path.read_bytes()
        path.write_bytes(_flip(data, [(len(data) // 3, 0x5A)]))
    return f"header {field}={value!r}"


@given(st.data())
def test_fuzz_read_volume_dicom_folder(data):
    as_labels = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "series"
        folder.mkdir()
        for name, content in (DICOM_LABEL_SEED if as_labels else DICOM_SEED).items():
            (folder / name).write_bytes(content)
        files = sorted(folder.iterdir())
        victim = data.draw(st.sampled_from(files))
        kind = data.draw(
            st.sampled_from(["random", "truncate", "flip", "header_flip", "zero", "dtype", "extra"])
        )
        raw = victim.read_bytes()
        note = kind
        if kind == "random":
            victim.write_bytes(data.draw(st.binary(min_size=1, max_size=1024)))
        elif kind == "truncate":
            cut = data.draw(st.integers(0, len(raw) - 1))
            victim.write_bytes(raw[:cut])
            note = f"truncate@{cut}"
        elif kind in ("flip", "header_flip"):
            hi = len(raw) - 1 if kind == "flip" else min(len(raw) - 1, 600)
            flips = data.draw(
                st.lists(st.tuples(st.integers(0, hi), st.integers(1, 255)), min_size=1, max_size=8)
            )
            victim.write_bytes(_flip(raw, flips))
            note = f"{kind}{flips}"
        elif kind == "zero":
            victim.write_bytes(b"")
        elif kind == "dtype":
            note = _dicom_variant(victim, data.draw)
        else:  # a stray non-DICOM file next to the series
            (folder / "stray.bin").write_bytes(data.draw(st.binary(min_size=0, max_size=256)))
        note = f"{victim.name}: {note}"
        if as_labels:
            _run_case("read_label_volume.dicom", "labels", read_label_volume, folder, note)
        else:
            _run_case("read_volume.dicom", "volume", read_volume, folder, note)
