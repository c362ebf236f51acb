"""Metrics against values computed by hand on tiny masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ahm.errors import AhmError
from ahm.eval.metrics import case_means, case_metrics, overlap_metrics, selection_score, summarize


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
    # absent from both: undefined by default (excluded); absent from exactly one: 0
    assert math.isnan(m["dice"][0, 0]) and math.isnan(m["iou"][0, 0])
    assert m["dice"][1:, 0].tolist() == [0.0, 0.0]
    assert m["iou"][1:, 0].tolist() == [0.0, 0.0]
    assert math.isnan(m["hd95"][0, 0])  # both empty: excluded
    assert m["hd95"][1, 0] == pytest.approx(3 * math.sqrt(2))  # the grid diagonal
    assert m["hd95"][2, 0] == pytest.approx(3 * math.sqrt(2))
    old = case_metrics(pred, gt, num_classes=2, empty="one")
    assert old["dice"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert old["iou"][:, 0].tolist() == [1.0, 0.0, 0.0]


def test_summary_excludes_empty_empty_and_counts_them():
    empty = np.zeros((4, 4), dtype=np.int64)
    gt_a = _mask((4, 4), (1, np.s_[1:3, 1:3]))
    pred_a = _mask((4, 4), (1, np.s_[1:3, 1:4]))
    pred, gt = np.stack([pred_a, empty]), np.stack([gt_a, empty])
    s = summarize(case_metrics(pred, gt, num_classes=2), class_names=["tumour"])
    assert s["per_class"]["tumour"]["dice"] == pytest.approx(0.8)  # the empty-empty case is not averaged in
    assert s["excluded_empty"] == {"tumour": 1}
    assert s["hd95"] == pytest.approx(1.0)
    assert s["dice"] == pytest.approx(0.8)
    old = summarize(case_metrics(pred, gt, num_classes=2, empty="one"), ["tumour"], empty="one")
    assert old["dice"] == pytest.approx((0.8 + 1.0) / 2)
    assert old["excluded_empty"] == {"tumour": 0} and old["empty_cases"] == "one"
    means = case_means(case_metrics(pred, gt, num_classes=2))
    assert means["dice"][0] == pytest.approx(0.8) and math.isnan(means["dice"][1])


def test_dataset_level_dice_pools_counts():
    # case 0: gt 4 px, pred 6 px, overlap 4 (TP 4, FP 2, FN 0); case 1: gt 2 px, pred nothing (FN 2);
    # case 2: gt empty, pred 1 px (FP 1). Pooled: TP 4, FP 3, FN 2 -> Dice 8 / 13, IoU 4 / 9.
    gt = np.stack([_mask((4, 4), (1, np.s_[1:3, 1:3])), _mask((4, 4), (1, np.s_[0, 0:2])), np.zeros((4, 4), int)])
    pred = np.stack([_mask((4, 4), (1, np.s_[1:3, 1:4])), np.zeros((4, 4), int), _mask((4, 4), (1, np.s_[3, 3]))])
    m = case_metrics(pred, gt, num_classes=2)
    assert m["tp"][:, 0].tolist() == [4, 0, 0]
    assert m["fp"][:, 0].tolist() == [2, 0, 1]
    assert m["fn"][:, 0].tolist() == [0, 2, 0]
    s = summarize(m, ["lesion"])
    assert s["dataset_dice"] == pytest.approx(8 / 13)
    assert s["dataset_iou"] == pytest.approx(4 / 9)
    assert s["per_class"]["lesion"]["dataset_dice"] == pytest.approx(8 / 13)
    assert s["dice"] == pytest.approx(0.8 / 3)  # per-case mean over the three defined cases: (0.8 + 0 + 0) / 3


def test_detection_counts_and_rates():
    empty = np.zeros((4, 4), dtype=np.int64)
    blob = _mask((4, 4), (1, np.s_[1:3, 1:3]))
    other = _mask((4, 4), (2, np.s_[0, 0]))
    # gt:   blob, blob, empty, empty, other
    # pred: blob, empty, blob, empty, empty
    gt = np.stack([blob, blob, empty, empty, other])
    pred = np.stack([blob, empty, blob, empty, empty])
    s = summarize(case_metrics(pred, gt, num_classes=3), ["a", "b"])
    a, b = s["detection"]["a"], s["detection"]["b"]
    assert (a["present"], a["missed"], a["absent"], a["false_detections"]) == (2, 1, 3, 1)
    assert a["missed_rate"] == pytest.approx(0.5) and a["false_detection_rate"] == pytest.approx(1 / 3)
    assert (b["present"], b["missed"], b["absent"], b["false_detections"]) == (1, 1, 4, 0)
    assert b["missed_rate"] == 1.0 and b["false_detection_rate"] == 0.0
    assert s["excluded_empty"] == {"a": 2, "b": 4}
    assert s["per_class"]["a"]["missed"] == 1


def test_empty_prediction_scores_zero_and_loses_the_selection():
    """A small structure in a third of the slices: predicting nothing won under the old per-case convention."""
    rng = np.random.default_rng(0)
    gt = np.zeros((9, 8, 8), dtype=np.int64)
    for k in range(0, 9, 3):
        gt[k, 2:4, 2:4] = 1
    nothing = np.zeros_like(gt)
    finder = gt.copy()
    finder[0, 2, 2] = 0  # finds each structure, not perfectly ...
    finder[1:, :, :] |= (rng.random((8, 8, 8)) < 0.01).astype(np.int64) * (gt[1:] == 0)  # ... with a few false pixels
    old_nothing = summarize(case_metrics(nothing, gt, 2, empty="one"), empty="one")["dice"]
    old_finder = summarize(case_metrics(finder, gt, 2, empty="one"), empty="one")["dice"]
    assert old_nothing > old_finder  # the defect this convention had
    new = summarize(case_metrics(nothing, gt, 2))
    assert new["dataset_dice"] == 0.0 and new["dice"] == 0.0
    assert new["detection"]["1"]["missed"] == 3
    for metric in ("dataset_dice", "case_dice"):
        assert selection_score(nothing, gt, 2, metric) == 0.0
        assert selection_score(finder, gt, 2, metric) > 0.3


def test_overlap_metrics_match_case_metrics():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=(5, 8, 8))
    gt = rng.integers(0, 3, size=(5, 8, 8))
    gt[0] = 0
    pred[0] = 0
    full, cheap = case_metrics(pred, gt, 3), overlap_metrics(pred, gt, 3)
    for key in ("dice", "iou", "tp", "fp", "fn"):
        np.testing.assert_array_equal(full[key], cheap[key])
    assert selection_score(pred, gt, 3, "case_dice") == pytest.approx(float(np.nanmean(full["dice"], 0).mean()))


def test_selection_refuses_unknown_figure():
    with pytest.raises(AhmError, match="select_by"):
        selection_score(np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int), 2, "accuracy")
    with pytest.raises(AhmError, match="empty-cases"):
        case_metrics(np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int), 2, empty="zero")


def test_3d_with_spacing():
    gt = np.zeros((1, 4, 4, 4), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[0, 0, 0, 0] = 1
    pred[0, 0, 0, 2] = 1
    m = case_metrics(pred, gt, num_classes=2, spacing=(1.0, 1.0, 2.5))
    assert m["hd95"][0, 0] == pytest.approx(5.0)


def test_refuses_bad_inputs():
    with pytest.raises(AhmError, match="shape"):
        case_metrics(np.zeros((1, 4, 4), int), np.zeros((1, 4, 5), int), 2)
    with pytest.raises(AhmError, match="label values"):
        case_metrics(np.full((1, 4, 4), 3), np.zeros((1, 4, 4), int), 2)
    with pytest.raises(AhmError, match="integer"):
        case_metrics(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), int), 2)
