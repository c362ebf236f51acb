"""Single DICOM files (2D images and multi-frame volumes), on the real files of `pydicom-data` and of pydicom's
own test set, and on generated files whose header fields are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from ahm.data.formats import (
    count_slices,
    is_volume_file,
    read_image,
    read_image_info,
    read_label_volume,
    read_mask,
    read_volume,
)
from ahm.errors import AhmError

# Odd headers make pydicom warn; the outcome, not the chatter, is under test.
pytestmark = pytest.mark.filterwarnings("ignore")

PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"  # the pydicom-data package
PYDICOM_TESTS = Path(pydicom.__file__).parent / "data" / "test_files"

# Files of those sets that cannot be decoded, with the reason each gives (anything else must read).
EXPECTED_REFUSALS = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": "no 'Pixel Data'",  # the pixel data element is cut short
    "MR_truncated.dcm": "truncated DICOM file",
    "JPEG-lossy.dcm": "undecodable",  # a 12-bit lossy JPEG whose stream no installed plugin accepts
    "JPEG2000-embedded-sequence-delimiter.dcm": "undecodable",
    "badVR.dcm": "undecodable",  # NumberOfFrames is '1A'
}
# Files with no image in them (reports, plans, structure sets, waveforms): refused as "not a DICOM image".
_NO_IMAGE = ("no Rows/Columns",)
_SLOW = {"color3d_jpeg_baseline.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG1_UNCR.dcm", "RG1_UNCI.dcm"}


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def _params():
    out = []
    for folder in (PYDICOM_DATA, PYDICOM_TESTS):
        for path in _dicom_files(folder):
            marks = [pytest.mark.slow] if path.name in _SLOW or path.stat().st_size > 3_000_000 else []
            out.append(pytest.param(path, id=f"{folder.parent.name}/{path.name}", marks=marks))
    return out


def _header(path: Path):
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    channels = 3 if int(getattr(ds, "SamplesPerPixel", 1)) == 3 or ds.PhotometricInterpretation == "PALETTE COLOR" else 1
    return int(ds.Rows), int(ds.Columns), frames, channels


@pytest.mark.parametrize("path", _params())
def test_every_sample_file_reads_to_its_shape_or_is_refused_in_one_line(path):
    try:
        rows, cols, frames, channels = _header(path)
    except Exception:  # noqa: BLE001 - no image header: it must be refused
        rows = None
    try:
        if is_volume_file(path):
            data = read_volume(path).data
            expected: tuple[int, ...] = (cols, rows, frames) + ((channels,) if channels > 1 else ())
        else:
            data = read_image(path)
            expected = (channels, rows, cols)
    except AhmError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message, message
        reason = EXPECTED_REFUSALS.get(path.name)
        if reason is None:
            assert rows is None or any(r in message for r in _NO_IMAGE), f"unexpected refusal: {message}"
        else:
            assert reason in message, message
        return
    assert path.name not in EXPECTED_REFUSALS, f"{path.name} was expected to be refused"
    assert rows is not None
    assert data.shape == expected
    assert data.dtype == np.float32 and np.isfinite(data).all()
    assert data.max() > data.min()  # every sample image has some contrast


# Compressed with a lossless syntax beside the same pixels uncompressed: decoding must give them exactly.
LOSSLESS_PAIRS = [
    (PYDICOM_DATA / "693_J2KR.dcm", PYDICOM_DATA / "693_UNCR.dcm"),  # JPEG 2000 lossless, CT
    (PYDICOM_DATA / "MR2_J2KR.dcm", PYDICOM_DATA / "MR2_UNCR.dcm"),
    (PYDICOM_DATA / "US1_J2KR.dcm", PYDICOM_DATA / "US1_UNCR.dcm"),  # JPEG 2000 lossless, YBR_RCT -> RGB
    (PYDICOM_DATA / "emri_small_RLE.dcm", PYDICOM_DATA / "emri_small.dcm"),  # RLE, 10 frames
    (PYDICOM_DATA / "emri_small_jpeg_ls_lossless.dcm", PYDICOM_DATA / "emri_small.dcm"),  # JPEG-LS
    (PYDICOM_DATA / "emri_small_jpeg_2k_lossless.dcm", PYDICOM_DATA / "emri_small.dcm"),
    (PYDICOM_DATA / "emri_small_big_endian.dcm", PYDICOM_DATA / "emri_small.dcm"),
    (PYDICOM_DATA / "OBXXXX1A_rle.dcm", PYDICOM_DATA / "OBXXXX1A.dcm"),  # RLE, palette colour
    (PYDICOM_TESTS / "MR_small_jpeg_ls_lossless.dcm", PYDICOM_TESTS / "MR_small.dcm"),
    (PYDICOM_TESTS / "MR_small_jp2klossless.dcm", PYDICOM_TESTS / "MR_small.dcm"),
    (PYDICOM_TESTS / "SC_rgb_rle.dcm", PYDICOM_DATA / "SC_rgb.dcm"),
    (PYDICOM_TESTS / "SC_rgb_rle_2frame.dcm", PYDICOM_DATA / "SC_rgb_2frame.dcm"),
    (PYDICOM_DATA / "color-pl.dcm", PYDICOM_DATA / "color-px.dcm"),  # planar configuration 1 vs 0
]


def _read(path: Path) -> np.ndarray:
    return read_volume(path).data if is_volume_file(path) else read_image(path)


@pytest.mark.parametrize("compressed,plain", LOSSLESS_PAIRS, ids=[p[0].name for p in LOSSLESS_PAIRS])
def test_lossless_transfer_syntaxes_decode_to_the_uncompressed_pixels(compressed, plain):
    np.testing.assert_array_equal(_read(compressed), _read(plain))


@pytest.mark.parametrize(
    "compressed,plain",
    [
        (PYDICOM_DATA / "MR2_J2KI.dcm", PYDICOM_DATA / "MR2_UNCI.dcm"),  # lossy JPEG 2000; UNCI is its decode
        (PYDICOM_DATA / "US1_J2KI.dcm", PYDICOM_DATA / "US1_UNCI.dcm"),
        (PYDICOM_TESTS / "SC_rgb_jpeg_dcmtk.dcm", PYDICOM_TESTS / "SC_rgb_dcmtk_+eb+cr.dcm"),  # JPEG baseline
    ],
    ids=["j2k-lossy-mr", "j2k-lossy-us", "jpeg-baseline-rgb"],
)
def test_lossy_transfer_syntaxes_decode_close_to_the_reference(compressed, plain):
    a, b = _read(compressed), _read(plain)
    assert a.shape == b.shape
    span = float(b.max() - b.min())
    assert np.abs(a - b).mean() < 0.02 * span


def test_deflate_and_ybr_are_read_as_rgb():
    dfl = read_image(PYDICOM_TESTS / "image_dfl.dcm")  # Deflated Explicit VR Little Endian
    assert dfl.shape == (1, 512, 512) and dfl.max() > dfl.min()
    ybr = read_image(PYDICOM_DATA / "SC_ybr_full_uncompressed.dcm")
    rgb = read_image(PYDICOM_DATA / "SC_rgb.dcm")
    # YBR_FULL converted back to RGB, up to the rounding of the colour transform
    assert np.abs(ybr - rgb).mean() < 1.5 and np.abs(ybr - rgb).max() <= 8
    assert read_image(PYDICOM_TESTS / "SC_ybr_full_422_uncompressed.dcm").shape == (3, 100, 100)


def test_enhanced_multiframe_ct_applies_functional_group_rescale_and_geometry():
    path = PYDICOM_DATA / "eCT_Supplemental.dcm"
    vol = read_volume(path)
    ds = pydicom.dcmread(path)
    groups = ds.SharedFunctionalGroupsSequence[0]
    transform = (
        groups.PixelValueTransformationSequence[0]
        if "PixelValueTransformationSequence" in groups
        else ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    )
    stored = ds.pixel_array[0].T.astype(np.float64)  # frame 0 as [columns, rows]
    expected = stored * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_allclose(vol.data[..., 0], expected)
    assert vol.data.min() < -500  # Hounsfield units: air is about -1000
    spacing = [float(v) for v in groups.PixelMeasuresSequence[0].PixelSpacing]
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :2], axis=0), [spacing[1], spacing[0]])
    assert count_slices(path, 2) == 2 and count_slices(path, 0) == 512


# ------------------------------------------------------------------------------- generated, known headers


def _write(path: Path, stored: np.ndarray, **fields) -> Path:
    """A one-file DICOM image (frames first when 3D) in explicit VR little endian, with `fields` set."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    signed = stored.dtype.kind == "i"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, int(signed)
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored.astype("<i2" if signed else "<u2")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(h=6, w=8):
    return (np.arange(h * w).reshape(h, w) * 4000 // (h * w - 1)).astype(np.uint16)  # 0..4000, 12-bit


def test_monochrome1_is_inverted_over_the_stored_range(tmp_path):
    stored = _ramp()
    img = read_image(_write(tmp_path / "m1.dcm", stored, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(img[0], 4095.0 - stored)  # 12 bits stored: white is 0, black 4095
    assert read_image_info(tmp_path / "m1.dcm").channels == 1
    # A mask keeps the stored values: labels are never inverted or windowed.
    labels = np.zeros((6, 8), np.uint16)
    labels[2:4, 3:5] = 2
    mask = read_mask(_write(tmp_path / "lab.dcm", labels, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(mask, labels)


def test_rescale_and_window_apply_to_radiographs_not_to_ct(tmp_path):
    stored = _ramp()
    fields = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2000)
    dx = read_image(_write(tmp_path / "dx.dcm", stored, **fields))[0]
    values = stored * 2.0 - 1000
    # Window 2000..4000 of the rescaled values onto the output range, monotone inside, clipped outside.
    assert (dx[values <= 2000] == dx.min()).all() and (dx[values >= 4000] == dx.max()).all()
    inside = (values > 2000) & (values < 4000)
    assert inside.sum() > 3 and (np.diff(dx[inside]) > 0).all()
    ct = read_image(_write(tmp_path / "ct.dcm", stored, Modality="CT", **fields))[0]
    np.testing.assert_array_equal(ct, values)  # Hounsfield units kept for ct_window normalisation
    voi_off = read_image(_write(tmp_path / "plain.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000))[0]
    np.testing.assert_array_equal(voi_off, values)


def test_rle_compressed_file_written_by_pydicom_reads_back(tmp_path):
    from pydicom.uid import RLELossless

    stored = _ramp(10, 12)
    path = _write(tmp_path / "plain.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "rle.dcm"), read_image(path))


def test_multiframe_file_is_a_volume_of_frames(tmp_path):
    frames = np.stack([_ramp() + k for k in range(3)])
    path = _write(
        tmp_path / "mf.dcm", frames, Modality="MR", PixelSpacing=[0.5, 0.25], SliceThickness=3.0,
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[10, 20, 30],
    )
    assert is_volume_file(path)
    vol = read_volume(path)
    assert vol.data.shape == (8, 6, 3)  # [columns, rows, frames]
    np.testing.assert_array_equal(vol.data[:, :, 2], (frames[2].T).astype(np.float32))
    # column step 0.25 mm along x, row step 0.5 mm along y, 3 mm between frames; LPS -> RAS.
    np.testing.assert_allclose(vol.affine @ [1, 1, 1, 1], [-(10 + 0.25), -(20 + 0.5), 30 + 3, 1])
    assert read_label_volume(path).data.dtype.kind in "ui"
    assert [count_slices(path, a) for a in (0, 1, 2)] == [8, 6, 3]
    with pytest.raises(AhmError, match="multi-frame DICOM .3 frames. is a volume"):
        read_image(path)
    assert not is_volume_file(_write(tmp_path / "one.dcm", _ramp()))


def test_huge_truncated_and_junk_dicom_files_are_one_line_each(tmp_path):
    path = _write(tmp_path / "ok.dcm", _ramp())
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-40])
    for reader in (read_image, read_volume):
        with pytest.raises(AhmError, match=r"^.*cut\.dcm: truncated DICOM file"):
            reader(cut)
    # A header claiming 60000 x 60000 over a few bytes: refused from the header, before decoding.
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(AhmError, match="huge.dcm: image is 60000x60000 .* refused before decoding"):
        read_image(tmp_path / "huge.dcm")
    ds.NumberOfFrames = 100
    ds.save_as(tmp_path / "huge3d.dcm")
    with pytest.raises(AhmError, match="huge3d.dcm: volume of shape .* above the limit"):
        read_volume(tmp_path / "huge3d.dcm")
    assert count_slices(tmp_path / "huge3d.dcm", 2) == 100  # counting reads the header only
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    for reader in (read_image, read_volume, is_volume_file):
        with pytest.raises(AhmError) as info:
            reader(junk)
        assert str(info.value).startswith(str(junk)) and "\n" not in str(info.value)


def test_series_slices_go_through_the_same_header_pipeline(tmp_path):
    from reader_samples import write_dicom_series

    stored = np.stack([np.full((6, 5), 100 * (k + 1), np.int16) for k in range(3)])
    paths = write_dicom_series(tmp_path / "s", stored, slope=2.0, intercept=-1024.0)
    plain = read_volume(tmp_path / "s").data
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.WindowCenter, ds.WindowWidth = 0, 100  # a display window: never applied to a series
        ds.save_as(path, enforce_file_format=True)
    inverted = read_volume(tmp_path / "s").data
    # Inverted over the stored 16-bit signed range mapped by the rescale: lo + hi - value.
    lo, hi = -32768 * 2.0 - 1024, 32767 * 2.0 - 1024
    np.testing.assert_array_equal(inverted, (lo + hi) - plain)
