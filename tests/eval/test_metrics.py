"""Metrics against values computed by hand on tiny masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ahm.errors import AhmError
from ahm.eval.metrics import case_means, case_metrics, mean_foreground_dice, summarize


def _mask(shape, *boxes):
    m = np.zeros(shape, dtype=np.int64)
    for value, sl in boxes:
        m[sl] = value
    return m


def test_overlap_dice_iou_hd95_binary():
    gt = _mask((4, 4), (1, np.s_[1:3, 1:3]))  # 4 pixels
    pred = _mask((4, 4), (1, np.s_[1:3, 1:4]))  # 6 pixels, 4 shared
    m = case_metrics(pred[None], gt[None], num_classes=2)
    assert m["dice"].shape == (1, 1)
    assert m["dice"][0, 0] == pytest.approx(2 * 4 / (4 + 6))
    assert m["iou"][0, 0] == pytest.approx(4 / 6)
    # Every pixel is on a surface here; pred->gt distances are {0,0,0,0,1,1}: the 95th percentile is 1.
    assert m["hd95"][0, 0] == pytest.approx(1.0)


def test_disjoint_points_distance():
    gt = _mask((4, 4), (1, np.s_[0, 0]))
    pred = _mask((4, 4), (1, np.s_[3, 3]))
    m = case_metrics(pred[None], gt[None], num_classes=2)
    assert m["dice"][0, 0] == 0.0
    assert m["iou"][0, 0] == 0.0
    assert m["hd95"][0, 0] == pytest.approx(3 * math.sqrt(2))


def test_multiclass_per_class_values():
    gt = _mask((4, 4), (1, np.s_[0:2, :]), (2, np.s_[2:4, 0:2]))
    pred = _mask((4, 4), (1, np.s_[0:2, 0:2]), (2, np.s_[2:4, 0:2]))
    m = case_metrics(pred[None], gt[None], num_classes=3)
    # class 1: gt 8 px, pred 4 px, overlap 4; class 2 identical.
    assert m["dice"][0].tolist() == pytest.approx([8 / 12, 1.0])
    assert m["iou"][0].tolist() == pytest.approx([4 / 8, 1.0])
    assert m["hd95"][0, 1] == pytest.approx(0.0)
    # class 1: gt cols 2..3 of rows 0..1 lie 1 and 2 px from the prediction; 95th pct of
    # sorted gt->pred distances [0,0,0,0,1,1,2,2] is 2.
    assert m["hd95"][0, 0] == pytest.approx(2.0)


def test_empty_conventions():
    empty = np.zeros((4, 4), dtype=np.int64)
    full = _mask((4, 4), (1, np.s_[1:3, 1:3]))
    pred = np.stack([empty, empty, full])
    gt = np.stack([empty, full, empty])
    m = case_metrics(pred, gt, num_classes=2)
    assert m["dice"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert m["iou"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert math.isnan(m["hd95"][0, 0])  # both empty: excluded
    assert m["hd95"][1, 0] == pytest.approx(3 * math.sqrt(2))  # the grid diagonal
    assert m["hd95"][2, 0] == pytest.approx(3 * math.sqrt(2))


def test_summary_excludes_nan_and_averages_classes():
    empty = np.zeros((4, 4), dtype=np.int64)
    gt_a = _mask((4, 4), (1, np.s_[1:3, 1:3]))
    pred_a = _mask((4, 4), (1, np.s_[1:3, 1:4]))
    m = case_metrics(np.stack([pred_a, empty]), np.stack([gt_a, empty]), num_classes=2)
    s = summarize(m, class_names=["tumour"])
    assert s["per_class"]["tumour"]["dice"] == pytest.approx((0.8 + 1.0) / 2)
    assert s["hd95"] == pytest.approx(1.0)  # the NaN of the empty case is not averaged in
    assert s["dice"] == pytest.approx(0.9)
    means = case_means(m)
    assert means["dice"].tolist() == pytest.approx([0.8, 1.0])


def test_3d_with_spacing():
    gt = np.zeros((1, 4, 4, 4), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[0, 0, 0, 0] = 1
    pred[0, 0, 0, 2] = 1
    m = case_metrics(pred, gt, num_classes=2, spacing=(1.0, 1.0, 2.5))
    assert m["hd95"][0, 0] == pytest.approx(5.0)


def test_mean_foreground_dice_matches_case_metrics():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(5, 8, 8))
    gt = rng.integers(0, 3, size=(5, 8, 8))
    full = case_metrics(pred, gt, num_classes=3)
    assert mean_foreground_dice(pred, gt, 3) == pytest.approx(float(full["dice"].mean(0).mean()))


def test_refuses_bad_inputs():
    with pytest.raises(AhmError, match="shape"):
        case_metrics(np.zeros((1, 4, 4), int), np.zeros((1, 4, 5), int), 2)
    with pytest.raises(AhmError, match="label values"):
        case_metrics(np.full((1, 4, 4), 3), np.zeros((1, 4, 4), int), 2)
    with pytest.raises(AhmError, match="integer"):
        case_metrics(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), int), 2)
