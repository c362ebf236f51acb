"""`evaluate`: outputs on disk, the split it scores, and refusals (no masks, another label set)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import make_run
from PIL import Image

from ahm.errors import AhmError
from ahm.eval.evaluate import evaluate, score_arrays


def _folder(root: Path, n_subjects: int = 6, masks: bool = True, max_label: int = 1) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    for s in range(n_subjects):
        for j in range(2):
            img = rng.integers(0, 80, (20, 28)).astype(np.uint8)
            mask = np.zeros((20, 28), np.uint8)
            mask[4:12, 6:16] = 1 + (s % max_label)
            img[mask > 0] += 120
            Image.fromarray(img).save(root / "images" / f"p{s}__{j}.png")
            if masks:
                Image.fromarray(mask).save(root / "masks" / f"p{s}__{j}.png")
    return root


def test_evaluate_writes_metrics_csv_and_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data")
    metrics = evaluate(run, data, split="all")
    assert metrics["n_images"] == 12 and metrics["split"] == "all"
    for key in ("dice", "iou", "hd95", "per_class"):
        assert key in metrics
    assert "volume_3d" not in metrics  # 2D files: nothing to re-stack
    saved = json.loads((run / "eval" / "all" / "metrics.json").read_text())
    assert saved["dice"] == metrics["dice"]
    with open(run / "eval" / "all" / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {"id", "subject", "dice_1", "iou_1", "hd95_1", "dice_mean"} <= set(rows[0])
    assert rows[0]["subject"] == "p0"
    assert np.isclose(np.mean([float(r["dice_1"]) for r in rows]), metrics["per_class"]["1"]["dice"])
    assert "Metrics: all split" in (run / "report.html").read_text()


def test_test_split_is_a_subject_split_of_another_dataset(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data", n_subjects=8)
    metrics = evaluate(run, data, split="test")
    with open(run / "eval" / "test" / "per_image.csv") as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    assert 0 < metrics["n_images"] < 16
    subjects = {i.split("__")[0] for i in ids}
    assert all(f"{s}__0" in ids and f"{s}__1" in ids for s in subjects)  # whole subjects only


def test_refuses_dataset_without_masks(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data", masks=False)
    with pytest.raises(AhmError, match="no masks"):
        evaluate(run, data, split="all")


def test_refuses_labels_the_model_cannot_predict(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", num_classes=2)
    data = _folder(tmp_path / "data", max_label=2)
    with pytest.raises(AhmError, match="labels go up to 2 but the model predicts 2 classes"):
        evaluate(run, data, split="all")


def test_score_arrays_picks_best_and_worst_cases(tmp_path: Path) -> None:
    labels = np.zeros((6, 8, 8), np.int64)
    labels[:, 1:7, 2:6] = 1
    preds = labels.copy()
    for k in range(6):
        preds[k, 1:1 + k, 2:6] = 0  # case k loses k of 6 rows: Dice falls with k
    images = np.zeros((6, 1, 8, 8), np.float32)
    score_arrays(tmp_path, preds, labels, images, [f"c{k}" for k in range(6)], None, 2, "val")
    with np.load(tmp_path / "cases.npz", allow_pickle=False) as npz:
        kinds, ids = list(npz["kind"]), list(npz["ids"])
    assert ids[:3] == ["c0", "c1", "c2"] and kinds[:3] == ["best"] * 3
    assert ids[3:] == ["c5", "c4", "c3"] and kinds[3:] == ["worst"] * 3
