"""`ahm bench baseline`: the intensity lookup fits what intensity explains and nothing more; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_blob_folder  # noqa: E402

from ahm.bench.baseline import apply_intensity_lookup, fit_intensity_lookup, run_baseline  # noqa: E402
from ahm.errors import AhmError  # noqa: E402


def test_lookup_takes_the_majority_class_per_bin_and_fills_unseen_bins_from_the_nearest() -> None:
    images = np.array([0.05, 0.05, 0.05, 0.55, 0.95, 0.95], dtype=np.float32).reshape(1, 1, 2, 3)
    labels = np.array([0, 0, 1, 2, 1, 1]).reshape(1, 2, 3)
    table = fit_intensity_lookup(images, labels, num_classes=3, bins=10)
    # bin 0: two of class 0, one of class 1; bin 5: class 2; bin 9: class 1; the rest from the nearest seen bin
    assert table.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 1, 1]
    test = np.array([0.0, 0.31, 0.72, 0.99], dtype=np.float32).reshape(1, 1, 2, 2)
    assert apply_intensity_lookup(table, test, bins=10).tolist() == [[[0, 2], [2, 1]]]
    two = np.stack([images[:, 0], 1 - images[:, 0]], axis=1)
    table2 = fit_intensity_lookup(two, labels, num_classes=3, bins=4)
    assert table2.shape == (16,) and apply_intensity_lookup(table2, two, bins=4).tolist() == [[[0, 0, 0], [2, 1, 1]]]
    with pytest.raises(AhmError, match="--bins"):
        fit_intensity_lookup(images, labels, 3, bins=1)


def test_intensity_explains_bright_discs_but_not_a_position_label(tmp_path: Path) -> None:
    discs = make_blob_folder(tmp_path / "discs", n=16)
    doc = run_baseline(discs, labels_fraction=0.5, seeds=2, image_size=32)
    assert [r["seed"] for r in doc["rows"]] == [0, 1] and doc["summary"]["dice"]["mean"] > 0.95
    # Same images, but the label is the left half of each image: intensity says nothing about it.
    half = tmp_path / "half"
    (half / "masks").mkdir(parents=True)
    (half / "images").symlink_to(discs / "images")
    for png in sorted((discs / "images").glob("*.png")):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, :16] = 1
        Image.fromarray(mask).save(half / "masks" / png.name)
    doc = run_baseline(half, labels_fraction=0.5, seeds=1, image_size=32)
    assert doc["summary"]["dice"]["mean"] < 0.7


def test_predict_nothing_floor_under_both_conventions(tmp_path: Path) -> None:
    """Blobs in a quarter of the images: predicting nothing scores 0 now, and 0.75 under the old convention."""
    discs = make_blob_folder(tmp_path / "discs", n=16)
    sparse = tmp_path / "sparse"
    (sparse / "masks").mkdir(parents=True)
    (sparse / "images").symlink_to(discs / "images")
    for k, png in enumerate(sorted((discs / "masks").glob("*.png"))):
        mask = np.asarray(Image.open(png))
        Image.fromarray(mask if k % 4 == 0 else np.zeros_like(mask)).save(sparse / "masks" / png.name)
    doc = run_baseline(sparse, labels_fraction=1.0, seeds=1, image_size=32)
    nothing = doc["empty_prediction"]
    assert nothing["dice"] == 0.0 and nothing["dataset_dice"] == 0.0 and nothing["val_dice"] == 0.0
    old = run_baseline(sparse, labels_fraction=1.0, seeds=1, image_size=32, empty="one")
    from ahm.config import DataConfig
    from ahm.data import load_arrays, make_splits, open_dataset

    cfg = DataConfig(path=str(sparse), image_size=32)
    index = open_dataset(sparse, cfg)
    test = load_arrays(index, list(make_splits(index, cfg)["test"]), cfg, labels=True)
    share_empty = float((test.labels.reshape(len(test.labels), -1).max(1) == 0).mean())
    assert 0 < share_empty < 1
    assert old["empty_prediction"]["dice"] == pytest.approx(share_empty)
    assert old["empty_prediction"]["dataset_dice"] == 0.0  # pooled Dice cannot be won either way
    from ahm.bench.baseline import format_baseline

    assert "predict nothing" in format_baseline(doc) and "OLD CONVENTION" in format_baseline(old)


def test_colour_images_get_a_joint_table_of_32_bins_per_channel(tmp_path: Path) -> None:
    grey = make_blob_folder(tmp_path / "grey", n=16)
    colour = tmp_path / "colour"
    (colour / "images").mkdir(parents=True)
    (colour / "masks").symlink_to(grey / "masks")
    for png in sorted((grey / "images").glob("*.png")):
        Image.open(png).convert("RGB").save(colour / "images" / png.name)
    doc = run_baseline(colour, labels_fraction=0.5, seeds=1, image_size=32)
    assert doc["bins"] == 32 and doc["summary"]["dice"]["mean"] > 0.95
    with pytest.raises(AhmError, match="--bins 256 with 3 channels"):
        run_baseline(colour, labels_fraction=0.5, seeds=1, image_size=32, bins=256)


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    unlabelled = make_blob_folder(tmp_path / "unlabelled", n=8, labels=False)
    with pytest.raises(AhmError, match="no masks found"):
        run_baseline(unlabelled, 0.5, 1, image_size=32)
    _register()
    res = CliRunner().invoke(app, ["bench", "baseline", str(unlabelled), "--image-size", "32"])
    assert res.exit_code == 2 and "no masks found" in res.output and "Traceback" not in res.output
    labelled = make_blob_folder(tmp_path / "labelled", n=16)
    res = CliRunner().invoke(app, ["bench", "baseline", str(labelled), "--labels-fraction", "0.01",
                                   "--image-size", "32"])
    assert res.exit_code == 2 and "--labels-fraction 0.01" in res.output
    res = CliRunner().invoke(app, ["bench", "baseline", str(labelled), "--seeds", "1", "--image-size", "32",
                                   "--labels-fraction", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["rows"][0]["labelled_images"] > 0


def test_labelled_subjects_count_draws_finetunes_subjects(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app
    from ahm.config import DataConfig
    from ahm.data import label_subset, make_splits, open_dataset

    data = make_blob_folder(tmp_path / "data", n=20)  # 10 subjects of 2 images: 6 train
    doc = run_baseline(data, labels_fraction=0.5, seeds=2, image_size=32, labels_subjects=1)
    assert doc["labels_subjects"] == 1 and [r["labelled_images"] for r in doc["rows"]] == [2, 2]
    cfg = DataConfig(path=str(data), image_size=32)
    index = open_dataset(data, cfg)
    subject_of = {item.id: item.subject for item in index.items}
    # the lookup of seed S was fitted on the subject `ahm finetune --labels-subjects 1 --seed S` labels
    for row in doc["rows"]:
        drawn = label_subset(index, make_splits(index, cfg)["train"], 0.5, row["seed"], subjects_count=1)
        assert row["labelled_subjects"] == sorted({subject_of[i] for i in drawn})
    assert doc["rows"][0]["labelled_subjects"] != doc["rows"][1]["labelled_subjects"]
    _register()
    res = CliRunner().invoke(app, ["bench", "baseline", str(data), "--labels-subjects", "1", "--seeds", "1",
                                   "--image-size", "32"])
    assert res.exit_code == 0, res.output
    assert "(1 labelled subject(s), 1 seed(s))" in res.output
    res = CliRunner().invoke(app, ["bench", "baseline", str(data), "--labels-subjects", "7", "--image-size", "32"])
    assert res.exit_code == 2 and "--labels-subjects 7: the training split has 6 subjects" in res.output


def _nifti_volumes(data: Path) -> Path:
    import nibabel as nib

    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for s in range(8):
        img = rng.normal(50, 5, size=(24, 24, 4)).astype(np.float32)
        lab = np.zeros((24, 24, 4), np.uint8)
        lab[6:16, 8:18, :2] = 1
        img[lab == 1] += 100
        nib.save(nib.Nifti1Image(img, np.eye(4)), data / "images" / f"v{s}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), data / "masks" / f"v{s}.nii.gz")
    return data


def test_floors_are_scored_per_volume_when_the_images_are_slices_of_volumes(tmp_path: Path) -> None:
    data = _nifti_volumes(tmp_path / "vols")
    doc = run_baseline(data, labels_fraction=1.0, seeds=1, image_size=32)
    assert doc["level"] == "volume" and doc["rows"][0]["level"] == "volume"
    assert doc["empty_prediction"]["dice"] == 0.0


def test_spatial_dims_3_scores_whole_volumes_from_the_command_line(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    data = _nifti_volumes(tmp_path / "vols")
    _register()
    res = CliRunner().invoke(app, ["bench", "baseline", str(data), "--spatial-dims", "3", "--labels-fraction", "1",
                                   "--seeds", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["spatial_dims"] == 3 and doc["level"] == "volume" and doc["hd95_unit"] == "mm"
    assert doc["summary"]["dice"]["mean"] > 0.5  # the bright box is what intensity explains
    res = CliRunner().invoke(app, ["bench", "baseline", str(data), "--spatial-dims", "4"])
    assert res.exit_code == 2 and "--spatial-dims" in res.output and "Traceback" not in res.output
