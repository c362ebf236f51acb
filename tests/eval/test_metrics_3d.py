"""3D metrics with voxel spacing, against values computed by hand (HD95 in millimetres on anisotropic grids)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ahm.errors import AhmError
from ahm.eval.metrics import case_metrics, hd95_unit, volume_case_metrics, volume_scores


def _cube_pair(axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 3x3x3 cubes 4 voxels apart along `axis`, in a 4 x 4 x 8 grid rolled so that `axis` is the long one.

    Surface voxels (MONAI measures between them) are all but each cube's centre. From the moving cube's near face,
    middle layer and far face (9, 8 and 9 voxels) the nearest surface voxel of the other lies 2, 3 and 4 voxels
    away along `axis`; the 95th percentile of those 26 distances (index 23.75 of the sorted list) is 4 voxels,
    and the same from the other side, so HD95 = 4 x spacing[axis]."""
    shape = [4, 4, 4]
    shape[axis] = 8
    gt, pred = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    a, b = [slice(0, 3)] * 3, [slice(0, 3)] * 3
    b[axis] = slice(4, 7)
    gt[tuple(a)] = 1
    pred[tuple(b)] = 1
    return pred, gt


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 8.0), (1, 4.0), (2, 2.0)])
def test_hd95_of_cube_pair_in_millimetres_follows_the_spacing_of_each_axis(axis: int, expected_mm: float) -> None:
    pred, gt = _cube_pair(axis)
    spacing = (2.0, 1.0, 0.5)
    m = case_metrics(pred[None], gt[None], num_classes=2, spacing=spacing)
    assert m["hd95"][0, 0] == pytest.approx(expected_mm)
    assert case_metrics(pred[None], gt[None], num_classes=2)["hd95"][0, 0] == pytest.approx(4.0)  # voxels
    assert m["dice"][0, 0] == 0.0


def test_hd95_is_the_95th_percentile_not_the_maximum() -> None:
    # gt: a one-voxel plate at depth 0 (100 voxels); pred: the same plate at depth 2 plus one stray voxel at depth 7.
    # pred -> gt: 100 distances of 2 slices and one of 7 (the 95th percentile, index 95 of 101, is 2 slices);
    # gt -> pred: 100 distances of 2 slices. HD95 = 2 x 1.5 mm = 3 mm (the Hausdorff maximum would be 10.5 mm).
    gt, pred = np.zeros((8, 10, 10), np.int64), np.zeros((8, 10, 10), np.int64)
    gt[0] = 1
    pred[2] = 1
    pred[7, 0, 0] = 1
    m = case_metrics(pred[None], gt[None], num_classes=2, spacing=(1.5, 0.7, 0.7))
    assert m["hd95"][0, 0] == pytest.approx(3.0)


def test_dice_and_iou_of_overlapping_cubes() -> None:
    # Two 4x4x4 cubes (64 voxels each) sharing half their depth: 32 voxels. Dice 2*32/128, IoU 32/96.
    gt, pred = np.zeros((4, 4, 8), np.int64), np.zeros((4, 4, 8), np.int64)
    gt[:, :, 0:4] = 1
    pred[:, :, 2:6] = 1
    m = case_metrics(pred[None], gt[None], num_classes=2, spacing=(3.0, 1.0, 1.0))
    assert m["dice"][0, 0] == pytest.approx(0.5)
    assert m["iou"][0, 0] == pytest.approx(1 / 3)
    assert (m["tp"][0, 0], m["fp"][0, 0], m["fn"][0, 0]) == (32, 32, 32)
    # gt's 56 surface voxels to pred's surface: 24 at 0 (depths 2 and 3, shared rings), 16 at 1 mm (depth 1's ring,
    # depth 3's centre), 16 at 2 mm (depth 0): the 95th percentile (index 52.25) is 2 mm; pred -> gt mirrors it.
    assert m["hd95"][0, 0] == pytest.approx(2.0)


def test_missed_structure_scores_the_grid_diagonal_in_millimetres() -> None:
    gt = np.zeros((4, 4, 8), np.int64)
    gt[1:3, 1:3, 1:3] = 1
    m = case_metrics(np.zeros_like(gt)[None], gt[None], num_classes=2, spacing=(2.0, 1.0, 0.5))
    assert m["hd95"][0, 0] == pytest.approx(math.sqrt((3 * 2.0) ** 2 + 3.0 ** 2 + (7 * 0.5) ** 2))
    assert m["dice"][0, 0] == 0.0


def test_volume_scores_take_each_volume_with_its_own_shape_and_spacing() -> None:
    cube_pred, cube_gt = _cube_pair(0)  # HD95 4 voxels, 8 mm at (2, 1, 0.5)
    plate_gt, plate_pred = np.zeros((8, 10, 10), np.int64), np.zeros((8, 10, 10), np.int64)
    plate_gt[0] = 1
    plate_pred[2] = 1  # HD95 3 mm at (1.5, 0.7, 0.7)
    preds = [cube_pred, plate_pred[None]]  # a channel-first [1, D, H, W] map is accepted too
    gts = [cube_gt, plate_gt]
    summary, per_case = volume_scores(preds, gts, 2, spacings=[(2.0, 1.0, 0.5), (1.5, 0.7, 0.7)],
                                      class_names=["tumour"], ids=["a", "b"])
    assert per_case["hd95"][:, 0].tolist() == pytest.approx([8.0, 3.0])
    assert summary["hd95"] == pytest.approx(5.5)
    assert summary["hd95_unit"] == "mm" and summary["case"] == "volume" and summary["n_cases"] == 2
    assert [v["volume"] for v in summary["per_volume"]] == ["a", "b"]
    assert summary["per_volume"][1]["hd95"] == pytest.approx(3.0)
    # no voxel shared in either volume: Dice 0 per case and pooled
    assert summary["dataset_dice"] == 0.0 and summary["dice"] == 0.0
    in_voxels, _ = volume_scores(preds, gts, 2)
    assert in_voxels["hd95_unit"] == "voxels"
    assert in_voxels["hd95"] == pytest.approx((4.0 + 2.0) / 2)
    shared = volume_case_metrics([cube_pred, cube_pred], [cube_gt, cube_gt], 2, spacings=(2.0, 1.0, 0.5))
    assert shared["hd95"][:, 0].tolist() == pytest.approx([8.0, 8.0])


def test_empty_in_both_stays_excluded_in_3d() -> None:
    empty = np.zeros((4, 4, 4), np.int64)
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = 1
    summary, per_case = volume_scores([empty, blob], [empty, blob], 2, spacings=(1.0, 1.0, 1.0))
    assert math.isnan(per_case["dice"][0, 0]) and math.isnan(per_case["hd95"][0, 0])
    assert summary["dice"] == 1.0 and summary["excluded_empty"] == {"1": 1}
    assert summary["per_volume"][0]["dice"] is None


def test_hd95_unit_and_bad_spacing() -> None:
    assert hd95_unit((1.0, 1.0, 2.0)) == "mm" and hd95_unit(None) == "voxels"
    vol = np.zeros((1, 4, 4, 4), np.int64)
    with pytest.raises(AhmError, match="spacing"):
        case_metrics(vol, vol, 2, spacing=(1.0, 1.0))
    with pytest.raises(AhmError, match="spacing"):
        case_metrics(vol, vol, 2, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(AhmError, match="2 voxel spacings for 1 volumes"):
        volume_case_metrics([vol[0]], [vol[0]], 2, spacings=[(1, 1, 1), (1, 1, 1)])
    with pytest.raises(AhmError, match=r"\[D, H, W\]"):
        volume_case_metrics([np.zeros((2, 4, 4, 4), int)], [np.zeros((2, 4, 4, 4), int)], 2)
