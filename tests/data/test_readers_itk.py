"""NRRD and MetaImage (.nrrd, .nhdr, .mha, .mhd): volumes, label volumes, 2D images, detached headers, and
the bad files (truncated, junk, huge, pointing outside), on files written here by SimpleITK."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ahm.config import DataConfig
from ahm.data.dataset import load_arrays
from ahm.data.formats import (
    count_slices,
    is_volume_file,
    read_image,
    read_image_info,
    read_label_volume,
    read_mask,
    read_volume,
)
from ahm.data.layouts import open_dataset
from ahm.errors import AhmError

sitk = pytest.importorskip("SimpleITK")

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _zyx(shape=(4, 5, 6), dtype=np.int16) -> np.ndarray:
    """Distinct values in SimpleITK's [z, y, x] order."""
    return np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)


def _write(path: Path, arr: np.ndarray, spacing=None, origin=None, vector=False, compress=False) -> Path:
    image = sitk.GetImageFromArray(arr, isVector=vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _one_line(path: Path, fn, *args, match: str = ""):
    with pytest.raises(AhmError) as info:
        fn(path, *args)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    assert match in message, message
    return message


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_volume_keeps_values_axes_and_geometry(tmp_path, suffix):
    arr = _zyx()
    path = _write(tmp_path / f"v{suffix}", arr, spacing=(1.5, 2.0, 2.5), origin=(1.0, 2.0, 3.0))
    vol = read_volume(path)
    assert vol.data.shape == (6, 5, 4)  # [x, y, z]
    assert vol.data.dtype == np.float32
    assert vol.data[1, 2, 3] == arr[3, 2, 1]
    # ITK geometry is LPS+: RAS flips x and y of both the spacing axes and the origin.
    np.testing.assert_allclose(vol.affine @ [1, 1, 1, 1], [-(1 + 1.5), -(2 + 2.0), 3 + 2.5, 1])
    assert is_volume_file(path)
    assert [count_slices(path, a) for a in (0, 1, 2)] == [6, 5, 4]
    if suffix in (".nhdr", ".mhd"):
        assert any(p.suffix in (".raw", ".gz", ".zraw") for p in tmp_path.iterdir())  # detached data


def test_label_volume_integer_and_refusals(tmp_path):
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 2:4] = 2
    vol = read_label_volume(_write(tmp_path / "seg.nrrd", labels, compress=True))
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, np.transpose(labels, (2, 1, 0)))
    frac = _write(tmp_path / "prob.mha", labels.astype(np.float32) * 0.3)
    _one_line(frac, read_label_volume, match="non-integral")
    rgb = _write(tmp_path / "rgb.mha", np.zeros((3, 4, 5, 3), np.uint8), vector=True)
    _one_line(rgb, read_label_volume, match="channels")
    assert read_volume(rgb).data.shape == (5, 4, 3, 3)  # vector pixels are channels


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_2d_file_is_an_image_and_a_mask(tmp_path, suffix):
    arr = _zyx((3, 4), np.uint8)  # [y, x]
    path = _write(tmp_path / f"i{suffix}", arr)
    assert not is_volume_file(path)
    img = read_image(path)
    np.testing.assert_array_equal(img[0], arr)  # H along y, W along x, as viewers show it
    info = read_image_info(path)
    assert (info.height, info.width, info.channels, info.dtype) == (3, 4, 1, "uint8")
    np.testing.assert_array_equal(read_mask(path), arr)
    assert read_volume(path).data.shape == (4, 3, 1)  # a 2D file is a volume of one slice too
    rgb = _write(tmp_path / f"c{suffix}", np.zeros((3, 4, 3), np.uint8), vector=True)
    assert read_image(rgb).shape == (3, 3, 4)


def test_3d_file_is_not_a_2d_image(tmp_path):
    path = _write(tmp_path / "v.mha", _zyx())
    _one_line(path, read_image, match="is a volume, not a 2D image")


def test_truncated_missing_data_and_junk_are_one_line(tmp_path):
    for suffix in (".nrrd", ".mha"):
        data = _write(tmp_path / f"v{suffix}", _zyx()).read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[:-50])
        _one_line(cut, read_volume, match="truncated")
    gz = _write(tmp_path / "z.nrrd", np.random.default_rng(0).random((4, 5, 6)), compress=True).read_bytes()
    (tmp_path / "cutz.nrrd").write_bytes(gz[: len(gz) - 40])
    _one_line(tmp_path / "cutz.nrrd", read_volume, match="truncated or unreadable NRRD data")
    # A detached header whose data file was cut, or is missing.
    (tmp_path / "d").mkdir()
    header = _write(tmp_path / "d" / "v.mhd", _zyx())
    raw = header.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    _one_line(header, read_volume, match="truncated MetaImage data (100 bytes in v.raw")
    raw.unlink()
    _one_line(header, read_volume, match="data file v.raw is missing")
    junk = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    for suffix in SUFFIXES:
        (tmp_path / f"junk{suffix}").write_bytes(junk)
        for reader in (read_volume, read_image, count_slices, is_volume_file):
            args = (2,) if reader is count_slices else ()
            _one_line(tmp_path / f"junk{suffix}", reader, *args)
    (tmp_path / "empty.nrrd").write_bytes(b"")
    _one_line(tmp_path / "empty.nrrd", read_volume, match="empty file")


def test_header_pointing_outside_its_folder_is_refused(tmp_path):
    header = _write(tmp_path / "v.mhd", _zyx())
    text = header.read_text()
    for target in ("../outside.raw", "/etc/hostname"):
        (tmp_path / "evil.mhd").write_text(text.replace("ElementDataFile = v.raw", f"ElementDataFile = {target}"))
        _one_line(tmp_path / "evil.mhd", read_volume, match="points outside its folder")
    nhdr = _write(tmp_path / "n.nhdr", _zyx())
    (tmp_path / "evil.nhdr").write_text(nhdr.read_text().replace("data file: n.raw", "data file: ../n.raw"))
    _one_line(tmp_path / "evil.nhdr", read_volume, match="points outside its folder")


def test_huge_declared_size_refused_before_decoding(tmp_path):
    header = _write(tmp_path / "v.mhd", _zyx())
    text = header.read_text().replace("DimSize = 6 5 4", "DimSize = 30000 30000 30000")
    (tmp_path / "huge.mhd").write_text(text)
    _one_line(tmp_path / "huge.mhd", read_volume, match="above the limit")
    _one_line(tmp_path / "huge.mhd", read_label_volume, match="refused before decoding")
    assert count_slices(tmp_path / "huge.mhd", 2) == 30000  # the header alone still counts slices
    flat = _write(tmp_path / "f.mhd", _zyx((3, 4), np.uint8))
    (tmp_path / "wide.mhd").write_text(flat.read_text().replace("DimSize = 4 3", "DimSize = 90000 90000"))
    _one_line(tmp_path / "wide.mhd", read_image, match="refused before decoding")


def test_folder_layout_takes_nrrd_and_metaimage_images_volumes_and_labels(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    vol = np.random.default_rng(0).integers(0, 1000, (4, 8, 8)).astype(np.int16)
    seg = (vol > 500).astype(np.uint8)
    _write(root / "images" / "a.nrrd", vol)
    _write(root / "masks" / "a.nrrd", seg)
    _write(root / "images" / "b.mhd", vol)  # detached: b.mhd + b.raw in images/, the same in masks/
    _write(root / "masks" / "b.mhd", seg)
    flat = vol[0].astype(np.uint16)
    _write(root / "images" / "c.mha", flat)  # a 2D image with a 2D mask
    _write(root / "masks" / "c.mha", seg[0])
    index = open_dataset(root, DataConfig(image_size=16))
    assert index.problems == []  # the .raw data files are not reported as unknown files
    ids = sorted(item.id for item in index.items)
    assert ids == [f"a__z{k:03d}" for k in range(4)] + [f"b__z{k:03d}" for k in range(4)] + ["c"]
    arrays = load_arrays(index, ids, DataConfig(image_size=16), labels=True)
    assert arrays.images.shape == (9, 1, 16, 16) and arrays.labels.shape == (9, 16, 16)
    assert set(np.unique(arrays.labels)) == {0, 1}
    # The same slice of a volume from NRRD and from MetaImage: identical pixels and labels.
    np.testing.assert_array_equal(arrays.images[0], arrays.images[4])
    np.testing.assert_array_equal(arrays.labels[0], arrays.labels[4])


def test_msd_layout_takes_nrrd_volumes(tmp_path):
    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    vol = np.random.default_rng(0).random((3, 6, 6)).astype(np.float32)
    _write(root / "imagesTr" / "s1.nrrd", vol)
    _write(root / "labelsTr" / "s1.nrrd", (vol > 0.5).astype(np.uint8))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "bg", "1": "fg"},
                "modality": {"0": "MRI"},
                "training": [{"image": "./imagesTr/s1.nrrd", "label": "./labelsTr/s1.nrrd"}],
            }
        )
    )
    index = open_dataset(root, DataConfig())
    assert len(index.items) == 3
    arrays = load_arrays(index, [i.id for i in index.items], DataConfig(image_size=16), labels=True)
    assert arrays.labels.shape == (3, 16, 16)


def test_folder_layout_takes_single_dicom_files_as_images_and_multiframe_as_volumes(tmp_path):
    from test_readers_dicom_file import _ramp
    from test_readers_dicom_file import _write as write_dicom

    root = tmp_path / "xr"
    (root / "images").mkdir(parents=True)
    write_dicom(root / "images" / "chest.dcm", _ramp(), PhotometricInterpretation="MONOCHROME1")
    write_dicom(root / "images" / "cine.dcm", np.stack([_ramp()] * 3), Modality="MR")
    (root / "images" / "broken.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(AhmError, match="broken.dcm"):
        open_dataset(root, DataConfig())
    index = open_dataset(root, DataConfig(skip_bad=True))
    assert sorted(i.id for i in index.items) == ["chest", "cine__z000", "cine__z001", "cine__z002"]
    assert len(index.problems) == 1 and "broken.dcm" in index.problems[0]
    arrays = load_arrays(index, [i.id for i in index.items], DataConfig(image_size=16), labels=False)
    assert arrays.images.shape == (4, 1, 16, 16)


def test_a_header_without_a_voxel_size_cannot_be_resampled_in_3d(tmp_path):
    from ahm.data.formats import volume_spacing_problem

    data = np.arange(4 * 5 * 6, dtype="<i2").tobytes()
    nrrd = "NRRD0004\ntype: short\ndimension: 3\nsizes: 6 5 4\nencoding: raw\nendian: little\n"
    mha = "ObjectType = Image\nNDims = 3\nDimSize = 6 5 4\nElementType = MET_SHORT\n"
    bare = {"bare.nrrd": nrrd + "\n", "bare.mha": mha + "ElementDataFile = LOCAL\n"}
    spaced = {"spaced.nrrd": nrrd + "spacings: 0.5 0.5 2\n\n",
              "directed.nrrd": nrrd + "space: left-posterior-superior\nspace directions: (0.5,0,0) (0,0.5,0) (0,0,2)\n\n",
              "spaced.mha": mha + "ElementSpacing = 0.5 0.5 2\nElementDataFile = LOCAL\n"}
    for name, header in {**bare, **spaced}.items():
        (tmp_path / name).write_bytes(header.encode() + data)
        assert read_volume(tmp_path / name).data.shape == (6, 5, 4)  # every one reads (2D slicing needs no size)
    assert "no 'space directions' or 'spacings'" in volume_spacing_problem(tmp_path / "bare.nrrd")
    assert "no ElementSpacing or ElementSize" in volume_spacing_problem(tmp_path / "bare.mha")
    for name in spaced:
        assert volume_spacing_problem(tmp_path / name) is None, name
    # in 3D the layout lists the file as a problem and keeps the others
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    for name in ("bare.nrrd", "spaced.mha"):
        (root / "images" / name).write_bytes((tmp_path / name).read_bytes())
    index = open_dataset(root, DataConfig(path=str(root), spatial_dims=3, skip_bad=True))
    assert [item.image.name for item in index.items] == ["spaced.mha"]
    assert any(p.startswith(str(root / "images" / "bare.nrrd")) and "voxel size" in p for p in index.problems)
