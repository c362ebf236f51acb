"""`ahm bench compare --spatial-dims 3`: a grid on a Decathlon task of volumes, cells and floors scored per volume
with HD95 in mm."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_volume_fixture  # noqa: E402

from ahm.errors import AhmError  # noqa: E402

# spatial_dims is left out on purpose: --spatial-dims 3 must reach both sections
DATA = {"spacing": [1.5, 1.5, 1.5], "crop_size": [16, 16, 16], "val_fraction": 0.2, "test_fraction": 0.2}
MODEL = {"backbone": "unet", "patch_size": 8, "unet_channels": [8, 16], "unet_strides": [2], "unet_num_res_units": 1}
TRAIN = {"batch_size": 2, "warmup_steps": 1, "log_every": 1, "workers": 0, "accelerator": "cpu"}


def test_compare_grid_on_volumes_scores_per_volume_in_mm(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    task = make_msd_volume_fixture(tmp_path / "data", cases=tuple(range(1, 9)))
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "pretrain": {"data": DATA, "model": MODEL, "train": TRAIN},
        "finetune": {"data": DATA, "model": MODEL, "val_every": 2, "train": TRAIN}}))
    out = tmp_path / "grid"
    res = CliRunner().invoke(app, [
        "bench", "compare", str(task), "--out", str(out), "--policies", "scratch,random", "--backbones", "unet",
        "--seeds", "1", "--labels-fraction", "0.5", "--pretrain-steps", "2", "--finetune-steps", "3",
        "--config", str(config), "--spatial-dims", "3"])
    assert res.exit_code == 0, res.output
    # both cells ran in 3D: the pretraining and the fine-tuning configs, and the checkpoint the cell was scored with
    pre_cfg = yaml.safe_load((out / "pretrain" / "unet-random-seed0" / "config.yaml").read_text())
    assert pre_cfg["data"]["spatial_dims"] == 3
    for policy in ("scratch", "random"):
        cell = out / "cells" / f"unet-{policy}-seed0-labels0.5"
        assert yaml.safe_load((cell / "finetune" / "config.yaml").read_text())["data"]["spatial_dims"] == 3
        metrics = json.loads((cell / "finetune" / "eval" / "test" / "metrics.json").read_text())
        assert metrics["spatial_dims"] == 3 and metrics["level"] == "volume" and metrics["hd95_unit"] == "mm"
        row = json.loads((cell / "cell.json").read_text())
        assert row["level"] == "volume" and row["hd95_unit"] == "mm" and row["dice"] == metrics["dice"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["policy"] for r in rows} == {"scratch", "random"}
    assert all(r["hd95_unit"] == "mm" and 0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    md = (out / "results.md").read_text()
    assert "HD95 in mm." in md and "HD95 (test, mm)" in md and "| unet | random | 1 |" in md
    # the floors on the same volumes: predicting nothing scores 0 (every test volume holds a ball)
    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["spatial_dims"] == 3 and baseline["level"] == "volume" and baseline["hd95_unit"] == "mm"
    assert baseline["empty_prediction"]["dice"] == 0.0 and baseline["empty_prediction"]["dataset_dice"] == 0.0
    assert "Predict nothing (all background): Dice (test) 0.0000" in md
    # the ball is 200 brighter than the body: the per-voxel lookup finds most of it, on the volumes' own grid
    assert baseline["summary"]["dice"]["mean"] > 0.5
    assert f"{baseline['summary']['dice']['mean']:.4f}" in md


def test_volume_floor_matches_a_hand_fitted_lookup(tmp_path: Path) -> None:
    """The lookup per voxel of the preprocessed grid, fitted on the seed's labelled volumes, scored per volume."""
    from ahm.bench.baseline import apply_intensity_lookup, fit_intensity_lookup, run_baseline
    from ahm.config import DataConfig
    from ahm.data import label_subset, make_splits, open_dataset
    from ahm.data.volumes import preprocessed_spacing, volume_dataset
    from ahm.eval.metrics import volume_scores

    task = make_msd_volume_fixture(tmp_path / "data", cases=tuple(range(1, 9)))
    cfg = DataConfig(path=str(task), spatial_dims=3, **DATA)
    doc = run_baseline(task, 0.5, 1, data_cfg=cfg, bins=16)
    index = open_dataset(task, cfg)
    splits = make_splits(index, cfg)

    def load(ids):
        ds = volume_dataset(index, list(ids), cfg, labels=True, train=False)
        samples = [ds[i] for i in range(len(ds))]
        return ([s["image"].numpy()[0] for s in samples], [np.rint(s["label"].numpy()[0]).astype(int) for s in samples],
                [preprocessed_spacing(s) for s in samples])

    images, labels, _ = load(label_subset(index, list(splits["train"]), 0.5, 0))
    lo, hi = min(im.min() for im in images), max(im.max() for im in images)
    table = fit_intensity_lookup(np.concatenate([((im - lo) / (hi - lo)).reshape(1, 1, -1) for im in images], 2),
                                 np.concatenate([lab.reshape(1, -1) for lab in labels], 1), 2, bins=16)
    test_images, test_labels, spacings = load(splits["test"])
    preds = [apply_intensity_lookup(table, ((im - lo) / (hi - lo))[None, None], 16)[0] for im in test_images]
    expected, _ = volume_scores(preds, test_labels, 2, spacings)
    assert doc["rows"][0]["labelled_images"] == len(images)
    assert doc["rows"][0]["dice"] == pytest.approx(expected["dice"])
    assert doc["rows"][0]["hd95"] == pytest.approx(expected["hd95"])
    assert doc["hd95_unit"] == expected["hd95_unit"] == "mm"


def test_spatial_dims_reaches_both_sections_and_disagreement_is_refused() -> None:
    from ahm.bench.compare import check_same_dims, with_spatial_dims

    merged = with_spatial_dims({"pretrain": {"data": {"crop_size": [16, 16, 16]}}}, 3)
    assert merged["pretrain"]["data"] == {"crop_size": [16, 16, 16], "spatial_dims": 3}
    assert merged["finetune"]["data"] == {"spatial_dims": 3}
    with pytest.raises(AhmError, match="--spatial-dims 4"):
        with_spatial_dims({}, 4)
    with pytest.raises(AhmError, match="pretrain: data.spatial_dims is 3 but finetune"):
        check_same_dims({"pretrain": {"data": {"spatial_dims": 3}}, "finetune": {}})


def test_curve_on_volumes_states_hd95_in_mm(tmp_path: Path) -> None:
    from ahm.bench.curve import run_curve

    task = make_msd_volume_fixture(tmp_path / "data", cases=tuple(range(1, 9)))
    overrides = {"pretrain": {"data": DATA, "model": MODEL, "train": TRAIN},
                 "finetune": {"data": DATA, "model": MODEL, "val_every": 2, "train": TRAIN}}
    result = run_curve(task, tmp_path / "curve", ["scratch"], ["unet"], [1, "all"], seeds=1, pretrain_steps=2,
                       finetune_steps=2, overrides=overrides, spatial_dims=3)
    assert [r["labelled_subjects"] for r in result["rows"]] == [1, result["train_subjects"]]
    assert all(r["level"] == "volume" and r["hd95_unit"] == "mm" for r in result["rows"])
    md = (tmp_path / "curve" / "results.md").read_text()
    assert "HD95 in mm." in md and "HD95 (test, mm)" in md
