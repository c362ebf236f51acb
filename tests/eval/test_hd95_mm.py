"""HD95 in millimetres for 2D sets whose files record a pixel size: the size per image (real files written
here), the model-grid pixel it gives, and the unit and figures of the scores built on it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_fixture  # noqa: E402
from reader_samples import write_dicom_frames, write_nifti, write_png  # noqa: E402

from ahm.config import DataConfig  # noqa: E402
from ahm.data import load_arrays, open_dataset  # noqa: E402
from ahm.data.dataset import VolumeCache, grid_spacing  # noqa: E402
from ahm.data.formats import image_pixel_size, read_volume  # noqa: E402
from ahm.data.layouts import Item  # noqa: E402
from ahm.data.preprocess import slice_pixel_size, volume_slice  # noqa: E402
from ahm.eval.evaluate import leveled_scores  # noqa: E402
from ahm.eval.metrics import case_metrics  # noqa: E402


def _anisotropic(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).random((6, 8, 10)).astype(np.float32)
    return write_nifti(tmp_path / "vol.nii.gz", data, np.diag([1.5, 2.0, 2.5, 1.0]))


@pytest.mark.parametrize("axis, expected", [(0, (2.0, 2.5)), (1, (1.5, 2.5)), (2, (1.5, 2.0))])
def test_nifti_slice_pixel_size_follows_the_slice_rows_and_columns(tmp_path, axis, expected):
    path = _anisotropic(tmp_path)
    volume = read_volume(path)
    assert volume.voxel_mm == pytest.approx((1.5, 2.0, 2.5))
    plane = volume_slice(volume.data, axis, 1)
    # rows and columns of the slice are the remaining axes in stored order: sizes follow them
    assert plane.shape[1:] == tuple(n for a, n in enumerate((6, 8, 10)) if a != axis)
    assert slice_pixel_size(volume.voxel_mm, axis) == pytest.approx(expected)
    item = Item(id="v", subject="v", image=path, mask=None, axis=axis, slice=1, volume="v")
    h, w = plane.shape[1:]
    spacing, through = grid_spacing(item, (h, w), 20, VolumeCache())
    # the longest side goes to 20 pixels, the other keeps the aspect ratio
    scale = max(h, w) / 20
    assert spacing == pytest.approx((expected[0] * h / round(h / scale), expected[1] * w / round(w / scale)))
    assert through == pytest.approx((1.5, 2.0, 2.5)[axis])


def test_oblique_nifti_voxel_sizes_are_the_affine_column_lengths(tmp_path):
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 1.1, 3.0])
    path = write_nifti(tmp_path / "obl.nii.gz", np.zeros((4, 5, 6), np.float32), affine)
    assert read_volume(path).voxel_mm == pytest.approx((0.7, 1.1, 3.0))


def test_dicom_without_pixel_spacing_records_no_in_plane_size(tmp_path):
    stored = np.arange(3 * 6 * 8, dtype=np.int16).reshape(3, 6, 8)
    path = write_dicom_frames(tmp_path / "frames.dcm", stored, SpacingBetweenSlices=2.0)
    volume = read_volume(path)
    assert volume.voxel_mm[:2] == (None, None) and volume.voxel_mm[2] == pytest.approx(2.0)
    assert slice_pixel_size(volume.voxel_mm, 2) is None  # never the invented 1 mm of the affine
    with_spacing = write_dicom_frames(tmp_path / "sp.dcm", stored, PixelSpacing=[0.5, 0.8])
    known = read_volume(with_spacing).voxel_mm
    # X runs along columns (0.8 mm apart), Y along rows (0.5 mm apart); no slice step recorded
    assert known[:2] == pytest.approx((0.8, 0.5)) and known[2] is None
    assert slice_pixel_size(known, 2) == pytest.approx((0.8, 0.5))
    assert slice_pixel_size(known, 0) is None


def test_2d_files_dicom_with_and_without_pixel_spacing_and_png(tmp_path):
    stored = np.zeros((1, 30, 40), np.int16)
    assert image_pixel_size(write_dicom_frames(tmp_path / "a.dcm", stored, PixelSpacing=[0.5, 0.8])) == (0.5, 0.8)
    assert image_pixel_size(write_dicom_frames(tmp_path / "b.dcm", stored)) is None
    assert image_pixel_size(write_png(tmp_path / "c.png", np.zeros((30, 40), np.uint8))) is None


def _squares(n: int = 1, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((n, size, size), np.int64)
    truth = np.zeros((n, size, size), np.int64)
    pred[:, 4:8, 2:6] = 1
    truth[:, 4:8, 8:12] = 1  # 6 model-grid pixels to the right
    return pred, truth


def test_known_geometry_on_a_2x_downscaled_grid_gives_hd95_in_mm(tmp_path):
    path = write_dicom_frames(tmp_path / "a.dcm", np.zeros((1, 40, 40), np.int16), PixelSpacing=[1.0, 1.0])
    item = Item(id="a", subject="a", image=path, mask=None)
    spacing, through = grid_spacing(item, (40, 40), 20)
    assert spacing == pytest.approx((2.0, 2.0)) and through is None
    pred, truth = _squares()
    scores, slice_level, volume_level = leveled_scores(pred, truth, [item], 2, spacing=[spacing])
    assert slice_level["hd95_unit"] == "mm" and volume_level is None
    assert scores["hd95"] == pytest.approx(12.0)  # 6 pixels of 2 mm
    in_pixels = leveled_scores(pred, truth, [item], 2)[1]
    assert in_pixels["hd95_unit"] == "pixels of the model grid" and in_pixels["hd95"] == pytest.approx(6.0)


def test_per_case_spacing_and_the_missed_structure_penalty_in_mm():
    pred, truth = _squares(2)
    truth[1] = 0  # a hallucinated structure: the grid diagonal of that case, in its own mm
    hd = case_metrics(pred, truth, 2, spacing=[(2.0, 2.0), (1.0, 3.0)])["hd95"][:, 0]
    assert hd[0] == pytest.approx(12.0)
    assert hd[1] == pytest.approx(np.hypot(19 * 1.0, 19 * 3.0))


def test_a_set_with_one_image_without_pixel_size_stays_in_pixels():
    pred, truth = _squares(2)
    items = [Item(id=f"i{k}", subject=f"i{k}", image=Path(f"i{k}.png"), mask=None) for k in range(2)]
    mixed = leveled_scores(pred, truth, items, 2, spacing=[(2.0, 2.0), None])[1]
    plain = leveled_scores(pred, truth, items, 2)[1]
    assert mixed["hd95_unit"] == "pixels of the model grid" and mixed["hd95"] == plain["hd95"] == pytest.approx(6.0)


def _slices(indices: list[int], spacing=(1.0, 1.0)) -> tuple[list[Item], list, list]:
    items = [Item(id=f"v_{k}", subject="v", image=Path("v.nii.gz"), mask=None, axis=2, slice=k, volume="v")
             for k in indices]
    return items, [spacing] * len(items), [2.5] * len(items)


def test_restacked_volume_in_mm_when_evenly_spaced():
    pred = np.zeros((3, 16, 16), np.int64)
    truth = np.zeros((3, 16, 16), np.int64)
    pred[:, 4:8, 4:8] = 1
    truth[:, 4:8, 4:8] = 1
    truth[2] = 0  # the last stacked slice: prediction one slice beyond the truth
    items, spacing, through = _slices([0, 2, 4])
    scores, slice_level, volume_level = leveled_scores(pred, truth, items, 2, spacing=spacing, slice_mm=through)
    assert scores["level"] == "volume" and volume_level["hd95_unit"] == "mm" and slice_level["hd95_unit"] == "mm"
    assert volume_level["per_volume"][0]["spacing_mm"] == pytest.approx([5.0, 1.0, 1.0])  # 2.5 mm x step 2
    # the farthest predicted voxel lies one stacked slice (5 mm) from the truth
    assert volume_level["hd95"] == pytest.approx(5.0, abs=0.01)
    uneven_items, spacing, through = _slices([0, 1, 3])
    uneven = leveled_scores(pred, truth, uneven_items, 2, spacing=spacing, slice_mm=through)[2]
    assert uneven["hd95_unit"] == "voxels of the re-stacked model grid"
    assert "spacing_mm" not in uneven["per_volume"][0]


def test_load_arrays_of_nifti_volumes_carries_the_model_grid_spacing(tmp_path):
    root = make_msd_fixture(tmp_path, cases=(3,), shape=(32, 20, 5))  # voxels 1.25 x 1.25 x 2.5 mm
    cfg = DataConfig(image_size=16)
    index = open_dataset(root, cfg)
    ids = [item.id for item in index.items]
    arrays = load_arrays(index, ids, cfg, labels=True)
    # axial slices 32x20 -> 16x10 on the model grid: 2.5 mm pixels; slices 2.5 mm apart
    assert all(s == pytest.approx((2.5, 2.5)) for s in arrays.spacing)
    assert all(t == pytest.approx(2.5) for t in arrays.slice_mm)
    metrics, slice_level, volume_level = leveled_scores(arrays.labels, arrays.labels, arrays.items, 2,
                                                        spacing=arrays.spacing, slice_mm=arrays.slice_mm)
    assert slice_level["hd95_unit"] == "mm" and volume_level["hd95_unit"] == "mm"


def test_per_case_spacing_applies_to_the_right_axis():
    """Squares 6 columns apart: the column size sets the distance, the row size does not."""
    pred, truth = _squares(2)
    hd = case_metrics(pred, truth, 2, spacing=[(1.0, 3.0), (3.0, 1.0)])["hd95"][:, 0]
    assert hd == pytest.approx([18.0, 6.0])


def test_anisotropic_dicom_on_a_non_square_image_gives_rows_and_columns_their_own_size(tmp_path):
    # 40 rows 0.5 mm apart, 80 columns 0.8 mm apart; the longest side (80) goes to 20: 4 source pixels per grid pixel
    path = write_dicom_frames(tmp_path / "a.dcm", np.zeros((1, 40, 80), np.int16), PixelSpacing=[0.5, 0.8])
    assert image_pixel_size(path) == pytest.approx((0.5, 0.8))
    item = Item(id="a", subject="a", image=path, mask=None)
    spacing, _ = grid_spacing(item, (40, 80), 20)
    assert spacing == pytest.approx((2.0, 3.2))


def test_nifti_voxel_size_in_microns_is_converted_to_mm(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([500.0, 250.0, 1000.0, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "um.nii.gz")
    assert read_volume(tmp_path / "um.nii.gz").voxel_mm == pytest.approx((0.5, 0.25, 1.0))
