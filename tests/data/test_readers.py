"""Readers: what each format gives, and that every bad input is one AhmError naming its file."""

from __future__ import annotations

import numpy as np
import pytest
from reader_samples import (
    gradient,
    png_claiming,
    set_nifti_shape,
    set_tiff_size,
    write_dicom_series,
    write_nifti,
    write_png,
    write_tiff,
)

from ahm.data.formats import (
    Volume,
    count_slices,
    read_image,
    read_image_info,
    read_label_volume,
    read_mask,
    read_volume,
)
from ahm.data.preprocess import normalize, resize_image, resize_mask, undo_resize, volume_slice
from ahm.errors import AhmError

# ------------------------------------------------------------------------------------------ 2D images


def test_png_gray_8bit_is_one_channel_float_as_stored(tmp_path):
    arr = gradient(12, 20)
    img = read_image(write_png(tmp_path / "g.png", arr))
    assert img.dtype == np.float32 and img.shape == (1, 12, 20)
    np.testing.assert_array_equal(img[0], arr)
    info = read_image_info(tmp_path / "g.png")
    assert (info.height, info.width, info.channels, info.dtype) == (12, 20, 1, "uint8")


def test_png_rgb_keeps_channel_order(tmp_path):
    arr = np.stack([gradient(10, 14), 255 - gradient(10, 14), np.full((10, 14), 7, np.uint8)], axis=-1)
    img = read_image(write_png(tmp_path / "rgb.png", arr))
    assert img.shape == (3, 10, 14)
    np.testing.assert_array_equal(img, np.moveaxis(arr, -1, 0))


def test_png_rgba_drops_alpha(tmp_path):
    rgb = np.stack([gradient(9, 11), gradient(9, 11) // 2, 255 - gradient(9, 11)], axis=-1)
    alpha = np.zeros((9, 11, 1), np.uint8)  # fully transparent: alpha must not alter the colours
    img = read_image(write_png(tmp_path / "rgba.png", np.concatenate([rgb, alpha], axis=-1)))
    assert img.shape == (3, 9, 11)
    np.testing.assert_array_equal(img, np.moveaxis(rgb, -1, 0))
    assert read_image_info(tmp_path / "rgba.png").channels == 3


def test_palette_image_gives_colours_and_palette_mask_gives_indices(tmp_path):
    from PIL import Image

    indices = (np.arange(48).reshape(6, 8) % 3).astype(np.uint8)
    im = Image.fromarray(indices, mode="P")
    im.putpalette([0, 0, 0, 200, 10, 10, 10, 10, 200] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "pal.png")
    img = read_image(tmp_path / "pal.png")
    assert img.shape == (3, 6, 8)
    np.testing.assert_array_equal(
        img[:, indices == 1], np.array([[200], [10], [10]]).repeat((indices == 1).sum(), 1)
    )
    np.testing.assert_array_equal(read_mask(tmp_path / "pal.png"), indices)

    gray = Image.fromarray(indices, mode="P")
    gray.putpalette([0, 0, 0, 100, 100, 100, 250, 250, 250] + [0] * (256 * 3 - 9))
    gray.save(tmp_path / "palgray.png")
    img = read_image(tmp_path / "palgray.png")
    assert img.shape == (1, 6, 8)
    np.testing.assert_array_equal(img[0], np.array([0, 100, 250])[indices])


def test_png_16bit_keeps_full_range(tmp_path):
    arr = gradient(8, 16, top=60000, dtype=np.uint16)
    img = read_image(write_png(tmp_path / "g16.png", arr))
    assert img.shape == (1, 8, 16) and img.max() == 60000
    np.testing.assert_array_equal(img[0], arr)
    assert read_image_info(tmp_path / "g16.png").dtype == "uint16"


def test_tiff_16bit_float_and_rgb(tmp_path):
    a16 = gradient(7, 9, top=65535, dtype=np.uint16)
    np.testing.assert_array_equal(read_image(write_tiff(tmp_path / "a.tif", a16))[0], a16)
    af = np.linspace(-3.5, 1e4, 63, dtype=np.float32).reshape(7, 9)
    np.testing.assert_array_equal(read_image(write_tiff(tmp_path / "f.tiff", af))[0], af)
    rgb = np.stack([gradient(7, 9), gradient(7, 9) // 3, 255 - gradient(7, 9)], axis=-1)
    img = read_image(write_tiff(tmp_path / "rgb.tif", rgb, photometric="rgb"))
    np.testing.assert_array_equal(img, np.moveaxis(rgb, -1, 0))
    assert read_image_info(tmp_path / "rgb.tif").channels == 3


def test_tiff_multichannel_planar_and_imagej(tmp_path):
    stack = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    img = read_image(
        write_tiff(tmp_path / "planar.tif", stack, photometric="minisblack", planarconfig="separate")
    )
    assert img.shape == (5, 6, 7)
    np.testing.assert_array_equal(img, stack)
    hyper = np.arange(4 * 6 * 7, dtype=np.float32).reshape(4, 6, 7)
    img = read_image(write_tiff(tmp_path / "ij.tif", hyper, imagej=True, metadata={"axes": "CYX"}))
    np.testing.assert_array_equal(img, hyper)


def test_multipage_tiff_reads_first_page(tmp_path):
    pages = np.stack([np.full((6, 7), v, np.uint8) for v in (11, 22, 33)])
    img = read_image(write_tiff(tmp_path / "pages.tif", pages, photometric="minisblack"))
    assert img.shape == (1, 6, 7) and (img == 11).all()


def test_jpeg_reads_close_to_source(tmp_path):
    from PIL import Image

    arr = np.stack([gradient(16, 24), gradient(16, 24), gradient(16, 24)], axis=-1)
    Image.fromarray(arr).save(tmp_path / "p.jpg", quality=95)
    img = read_image(tmp_path / "p.jpg")
    assert img.shape == (3, 16, 24)
    assert np.abs(img - np.moveaxis(arr, -1, 0)).mean() < 4


# ------------------------------------------------------------------------------------------------ masks


def test_mask_0_255_becomes_0_1(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 255
    out = read_mask(write_png(tmp_path / "m.png", mask))
    assert out.dtype == np.int64 and out.shape == (10, 12)
    np.testing.assert_array_equal(out, mask // 255)


def test_mask_multi_label_kept_and_bilevel_png(tmp_path):
    mask = (np.arange(60).reshape(6, 10) % 4).astype(np.uint8)
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "m.png", mask)), mask)
    bits = np.zeros((6, 10), bool)
    bits[1:4, 2:5] = True
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "b.png", bits)), bits.astype(np.int64))
    assert read_image(tmp_path / "b.png").max() == 255  # as an image, bilevel white is 255


def test_rgb_mask_with_equal_channels_collapses_unequal_refused(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    rgb = np.repeat(mask[..., None], 3, axis=-1)
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "rgbm.png", rgb)), mask // 255)
    rgb[0, 0] = (255, 0, 0)
    path = write_png(tmp_path / "colour.png", rgb)
    with pytest.raises(AhmError, match=str(path) + ".*channels"):
        read_mask(path)


def test_float_mask_integral_ok_fractional_refused(tmp_path):
    good = np.array([[0, 1, 2], [2, 1, 0]], np.float32)
    np.testing.assert_array_equal(read_mask(write_tiff(tmp_path / "ok.tif", good)), good.astype(np.int64))
    path = write_tiff(tmp_path / "prob.tif", good * 0.4)
    with pytest.raises(AhmError, match="prob.tif: mask has non-integral"):
        read_mask(path)
    neg = write_tiff(tmp_path / "neg.tif", np.array([[0, -1]], np.int16))
    with pytest.raises(AhmError, match="neg.tif: mask has negative"):
        read_mask(neg)


def test_jpeg_mask_with_threshold(tmp_path):
    from PIL import Image

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(np.repeat(mask[..., None], 3, -1)).save(tmp_path / "m.jpg", quality=70)
    out = read_mask(tmp_path / "m.jpg", threshold=128)
    assert set(np.unique(out)) == {0, 1}
    assert (out != mask // 255).mean() < 0.02


# ---------------------------------------------------------------------------------------------- volumes


def test_nifti_3d_and_gz_keep_data_and_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[0, 0, 2.0, -5], [1.5, 0, 0, 3], [0, 1.0, 0, 7], [0, 0, 0, 1]])
    for name in ("v.nii", "v.nii.gz"):
        vol = read_volume(write_nifti(tmp_path / name, data, affine))
        assert isinstance(vol, Volume) and vol.data.dtype == np.float32 and vol.data.shape == (4, 5, 6)
        np.testing.assert_array_equal(vol.data, data)
        np.testing.assert_allclose(vol.affine, affine)
        assert count_slices(tmp_path / name, 0) == 4 and count_slices(tmp_path / name, 2) == 6


def test_nifti_scaling_is_applied(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii"))
    np.testing.assert_allclose(read_volume(tmp_path / "s.nii").data.ravel(), np.arange(8) * 0.5 + 10)


def test_nifti_4d_is_channels_last(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 3, 2)).astype(np.float32)
    vol = read_volume(write_nifti(tmp_path / "m.nii.gz", data))
    assert vol.data.shape == (4, 5, 3, 2)
    np.testing.assert_array_equal(vol.data, data)
    sl = volume_slice(vol.data, 2, 1)
    assert sl.shape == (2, 4, 5)
    np.testing.assert_array_equal(sl, np.moveaxis(data[:, :, 1, :], -1, 0))


def test_label_volume_integer_and_refusals(tmp_path):
    labels = np.zeros((4, 4, 3), np.float32)
    labels[1:3, 1:3, 1] = 2
    vol = read_label_volume(write_nifti(tmp_path / "l.nii.gz", labels))
    assert vol.data.dtype.kind in "ui"
    np.testing.assert_array_equal(vol.data, labels)
    s = volume_slice(vol.data, 2, 1)
    assert s.dtype == np.int64 and s.shape == (4, 4) and s.max() == 2
    with pytest.raises(AhmError, match="frac.nii.gz: label volume has non-integral"):
        read_label_volume(write_nifti(tmp_path / "frac.nii.gz", labels + 0.25))


def test_volume_slice_along_each_axis():
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    np.testing.assert_array_equal(volume_slice(data, 0, 2), data[2][None])
    np.testing.assert_array_equal(volume_slice(data, 1, 3), data[:, 3][None])
    np.testing.assert_array_equal(volume_slice(data, 2, 4), data[:, :, 4][None])
    assert volume_slice(data, 1, 0).shape == (1, 3, 5)
    with pytest.raises(AhmError, match="outside the volume"):
        volume_slice(data, 2, 5)


def _ct_series(tmp_path, **kwargs):
    stored = np.stack([np.full((6, 5), 100 * (k + 1), np.int16) for k in range(4)])
    stored[:, 0, 1] = 7  # row 0, column 1: shows the [column, row] voxel order
    folder = tmp_path / "series"
    write_dicom_series(folder, stored, **kwargs)
    return folder, stored


def test_dicom_series_sorted_by_position_and_rescaled(tmp_path):
    # File names and InstanceNumbers both disagree with the positions; positions must win.
    folder, stored = _ct_series(
        tmp_path,
        instance_order=[4, 2, 3, 1],
        names=["d.dcm", "a.dcm", "c.dcm", "b.dcm"],
        slope=2.0,
        intercept=-1024,
    )
    vol = read_volume(folder)
    assert vol.data.shape == (5, 6, 4)  # [columns, rows, slices]
    expected = np.transpose(stored, (2, 1, 0)).astype(np.float32) * 2 - 1024
    np.testing.assert_array_equal(vol.data, expected)
    assert vol.data[1, 0, 0] == 7 * 2 - 1024
    # Voxel (i=column, j=row, k=slice) -> RAS+: LPS x,y flipped; spacing (rows 0.5, columns 0.75), slice 2 mm.
    ras = vol.affine @ np.array([2, 3, 1, 1.0])
    lps = np.array([-10 + 2 * 0.75, 20 + 3 * 0.5, 30 + 1 * 2.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]))
    assert [count_slices(folder, a) for a in (0, 1, 2)] == [5, 6, 4]


def test_dicom_without_positions_falls_back_to_instance_number(tmp_path):
    folder, stored = _ct_series(
        tmp_path, positions=False, instance_order=[3, 1, 4, 2], slope=1.0, intercept=0.0
    )
    vol = read_volume(folder)
    order = np.argsort([3, 1, 4, 2])
    np.testing.assert_array_equal(vol.data[0, 2, :], stored[order, 2, 0])


def test_dicom_folder_problems_name_the_file(tmp_path):
    folder, _ = _ct_series(tmp_path)
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    assert read_volume(folder).data.shape[2] == 4
    (folder / "notes.txt").write_bytes(b"not dicom at all")
    with pytest.raises(AhmError, match="notes.txt: not a"):
        read_volume(folder)
    (folder / "notes.txt").unlink()
    other = tmp_path / "other"
    write_dicom_series(other, np.zeros((1, 6, 5), np.int16), names=["x.dcm"])
    (folder / "x.dcm").write_bytes((other / "x.dcm").read_bytes())
    with pytest.raises(AhmError, match="2 DICOM series"):
        read_volume(folder)
    with pytest.raises(AhmError, match="no DICOM files"):
        (tmp_path / "empty").mkdir()
        read_volume(tmp_path / "empty")


# ----------------------------------------------------------------------------------------- normalisation


def test_normalize_mri_clips_percentiles_per_channel():
    rng = np.random.default_rng(0)
    arr = np.stack([rng.normal(100, 10, (32, 32)), rng.normal(5000, 500, (32, 32))]).astype(np.float32)
    arr[0, 0, 0] = 1e6  # one hot voxel must not squash the rest
    out = normalize(arr, "mri")
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert 0.3 < out[0].mean() < 0.7 and 0.3 < out[1].mean() < 0.7


def test_normalize_ct_window_and_photo_depths():
    ct = np.array([[[-2000, -1000, 0, 1000, 3000]]], np.float32)
    np.testing.assert_allclose(normalize(ct, "ct", (-1000, 1000))[0, 0], [0, 0, 0.5, 1, 1])
    with pytest.raises(AhmError, match="ct_window"):
        normalize(ct, "ct", (10, 10))
    p8 = np.array([[[0, 51, 255]]], np.float32)
    np.testing.assert_allclose(normalize(p8, "photo", source_dtype="uint8")[0, 0], [0, 0.2, 1])
    p16 = np.array([[[0, 65535]]], np.float32)
    np.testing.assert_allclose(normalize(p16, "photo", source_dtype="uint16")[0, 0], [0, 1])
    np.testing.assert_allclose(normalize(p16, "photo")[0, 0], [0, 1])


def test_normalize_auto_chooses_photo_for_8bit_sources():
    arr = np.array([[[0, 10, 20, 255]]], np.float32)
    np.testing.assert_allclose(normalize(arr, "auto", source_dtype="uint8")[0, 0], arr[0, 0] / 255)
    np.testing.assert_allclose(normalize(arr, "auto")[0, 0], arr[0, 0] / 255)
    mri = np.array([[[0.0, 300.0, 1200.0, 2400.0]]], np.float32)
    assert normalize(mri, "auto", source_dtype="int16").max() == 1


@pytest.mark.parametrize("modality", ["mri", "ct", "photo", "auto"])
def test_normalize_constant_image_is_zeros(modality):
    for value in (0.0, 7.0, 3000.0):
        out = normalize(
            np.full((2, 5, 5), value, np.float32),
            modality,
            (value, value + 1) if modality == "ct" else (-1000, 1000),
        )
        if modality in ("mri", "ct") or value == 0:
            assert (out == 0).all()
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


# ----------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("hw,size", [((40, 24), 32), ((10, 30), 64), ((33, 33), 16), ((7, 50), 16)])
def test_resize_keeps_labels_and_geometry(hw, size):
    h, w = hw
    mask = np.zeros((h, w), np.int64)
    mask[: h // 2, : w // 2] = 1
    mask[h // 2 :, w // 2 :] = 3
    mask[: h // 2, w // 2 :] = 7
    out = resize_mask(mask, size)
    assert out.shape == (size, size) and out.dtype == mask.dtype
    assert set(np.unique(out[out > 0])) == {1, 3, 7}  # no label lost, none invented
    assert set(np.unique(out)) <= {0, 1, 3, 7}
    ones = resize_image(np.ones((2, h, w), np.float32), size)
    assert ones.shape == (2, size, size)
    content = resize_mask(np.ones((h, w), np.int64), size) > 0
    np.testing.assert_array_equal(ones[0] > 0, content)  # image and mask occupy the same pixels
    # Wherever the interpolated image of a label is unambiguous, the resized mask must say the same.
    onehot = resize_image(np.stack([(mask == v) for v in (1, 3, 7)]).astype(np.float32), size)
    for channel, value in zip(onehot, (1, 3, 7)):
        assert (out[channel > 0.999] == value).all()
        assert (out[content & (channel < 0.001)] != value).all()


def test_resize_aspect_and_central_padding():
    out = resize_mask(np.ones((10, 40), np.int64), 32)
    rows = np.where(out.any(axis=1))[0]
    assert out.any(axis=0).all() and len(rows) == 8 and rows[0] == 12  # 10*32/40 = 8 rows, centred


@pytest.mark.parametrize("hw,size", [((16, 8), 32), ((20, 13), 64), ((100, 37), 32), ((5, 5), 5)])
def test_undo_resize_round_trips(hw, size):
    mask = np.random.default_rng(1).integers(0, 4, hw)
    back = undo_resize(resize_mask(mask, size), hw)
    assert back.shape == hw
    if size >= max(hw):  # no information was lost: the round trip is exact
        np.testing.assert_array_equal(back, mask)
    probs = undo_resize(np.zeros((3, size, size), np.float32), hw)
    assert probs.shape == (3, *hw)


# ------------------------------------------------------------------------------------------- bad inputs


def _raises_naming(path, fn, *args, match="", **kwargs):
    with pytest.raises(AhmError) as info:
        fn(path, *args, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert match in message, message
    return message


def test_truncated_png(tmp_path):
    good = write_png(
        tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    )
    data = good.read_bytes()
    bad = tmp_path / "img3.png"
    bad.write_bytes(data[: len(data) // 2])
    _raises_naming(bad, read_image, match="truncated or unreadable")
    _raises_naming(bad, read_mask)


def test_random_bytes_zero_size_missing_and_unsupported(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    _raises_naming(junk, read_image, match="not a readable image")
    tif = tmp_path / "junk.tif"
    tif.write_bytes(junk.read_bytes())
    _raises_naming(tif, read_image)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    _raises_naming(empty, read_image, match="empty file")
    _raises_naming(tmp_path / "missing.png", read_image, match="not found")
    _raises_naming(tmp_path / "missing.nii.gz", read_volume, match="not found")
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    _raises_naming(other, read_image, match="unsupported image type")
    nii = tmp_path / "junk.nii.gz"
    nii.write_bytes(junk.read_bytes())
    _raises_naming(nii, read_volume, match="not a readable NIfTI")
    zero = tmp_path / "zero.nii"
    zero.write_bytes(b"")
    _raises_naming(zero, read_volume, match="empty file")


def test_nan_voxels_refused(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    path = write_nifti(tmp_path / "vol.nii.gz", data)
    _raises_naming(path, read_volume, match="contains NaN or infinite voxels")
    data[1, 1, 1] = np.inf
    _raises_naming(write_nifti(tmp_path / "inf.nii", data), read_volume, match="NaN or infinite")


def test_truncated_nifti(tmp_path):
    data = write_nifti(tmp_path / "v.nii", np.ones((8, 8, 8), np.float32)).read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:600])
    _raises_naming(tmp_path / "cut.nii", read_volume, match="truncated")
    gz = write_nifti(
        tmp_path / "v.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    ).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    _raises_naming(tmp_path / "cut.nii.gz", read_volume)


def test_huge_declared_sizes_refused_before_decoding(tmp_path):
    # The files hold a few bytes of pixels: decoding would fail as "truncated", so the message proves
    # the refusal came from the header check, before any allocation.
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(100_000, 100_000))
    _raises_naming(huge, read_image, match="too large")
    _raises_naming(huge, read_mask, match="too large")
    big = tmp_path / "big.png"
    big.write_bytes(png_claiming(9000, 9000))
    _raises_naming(big, read_image, match="above the limit of 64000000 (max_pixels); refused before decoding")
    _raises_naming(big, read_image_info, max_pixels=1000, match="max_pixels")
    small = write_tiff(tmp_path / "small.tif", np.zeros((8, 8), np.uint8)).read_bytes()
    (tmp_path / "huge.tif").write_bytes(set_tiff_size(small, 100_000, 100_000))
    _raises_naming(tmp_path / "huge.tif", read_image, match="refused before decoding")
    nii = write_nifti(tmp_path / "v.nii", np.zeros((2, 2, 2), np.float32)).read_bytes()
    (tmp_path / "huge.nii").write_bytes(set_nifti_shape(nii, (30000, 30000, 30000)))
    _raises_naming(tmp_path / "huge.nii", read_volume, match="above the limit")
    _raises_naming(tmp_path / "huge.nii", read_label_volume, match="above the limit")
    assert count_slices(tmp_path / "huge.nii", 1) == 30000  # header only: counting is still possible


def test_small_max_pixels_is_honoured(tmp_path):
    path = write_png(tmp_path / "g.png", gradient(20, 20))
    _raises_naming(path, read_image, max_pixels=399, match="400 pixels")
    assert read_image(path, max_pixels=400).shape == (1, 20, 20)


def test_unsupported_sample_types_refused(tmp_path):
    path = write_tiff(tmp_path / "c.tif", np.ones((4, 4), np.complex64))
    _raises_naming(path, read_image, match="unsupported sample type")
    nan = np.ones((4, 4), np.float32)
    nan[0, 0] = np.nan
    _raises_naming(write_tiff(tmp_path / "n.tif", nan), read_image, match="NaN")
    _raises_naming(tmp_path / "n.tif", read_mask, match="NaN")


def test_only_raster_formats_are_decoded(tmp_path):
    # An EPS file named .png would make Pillow run Ghostscript; it must be refused as unreadable.
    eps = tmp_path / "trap.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _raises_naming(eps, read_image, match="not a readable image")


def test_dicom_with_corrupt_element_names_the_slice(tmp_path):
    # pydicom parses elements lazily: a broken value representation must still surface as this file's error.
    folder, _ = _ct_series(tmp_path)
    victim = min(folder.iterdir())
    data = victim.read_bytes()
    tag = b"\x20\x00\x0e\x00UI"  # SeriesInstanceUID, explicit VR little endian
    assert tag in data
    victim.write_bytes(data.replace(tag, b"\x20\x00\x0e\x00\x55\x8f"))
    for reader in (read_volume, read_label_volume, count_slices):
        args = (2,) if reader is count_slices else ()
        with pytest.raises(AhmError) as info:
            reader(folder, *args)
        assert str(info.value).startswith(str(victim)), info.value
