"""`ahm evaluate` and `ahm predict` on a run fine-tuned on volumes (data.spatial_dims 3): whole volumes on the
preprocessed grid scored in 3D with HD95 in mm; masks written back on each input's own grid.

Sliding-window prediction equal to the whole-volume pass is checked on the inference function itself
(tests/eval/test_inference.py, with a pointwise model and a batch-norm 3D UNet): the segmenters a run holds use
instance norm, whose statistics differ per window by design, so through `predict` we check the geometry only.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from eval_helpers import make_run, make_run_3d
from PIL import Image
from typer.testing import CliRunner

from ahm.errors import AhmError
from ahm.eval.evaluate import evaluate, load_run
from ahm.eval.predict import predict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_volume_fixture  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_msd_volume_fixture(tmp_path_factory.mktemp("vol"), cases=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def run3d(task: Path, tmp_path_factory) -> Path:
    return make_run_3d(tmp_path_factory.mktemp("run") / "vol3d", task)


def _cli(*args: str):
    from ahm.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_load_run_builds_the_3d_segmenter_on_the_crop(run3d: Path) -> None:
    run = load_run(run3d)
    assert run.spatial_dims == 3 and run.roi_size == (16, 16, 16)
    convs = [m for m in run.model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and not any(isinstance(m, torch.nn.Conv2d) for m in run.model.modules())


def test_evaluate_scores_whole_volumes_with_hd95_in_mm(run3d: Path, task: Path) -> None:
    metrics = evaluate(run3d, task, split="all")
    assert metrics["spatial_dims"] == 3 and metrics["level"] == "volume"
    assert metrics["hd95_unit"] == "mm" and metrics["volume_level"]["hd95_unit"] == "mm"
    assert metrics["n_volumes"] == 4 and "preprocessed grid" in metrics["grid"]
    assert metrics["sliding_window"] == {"roi_size": [16, 16, 16], "overlap": 0.5, "mode": "gaussian"}
    per_volume = metrics["volume_level"]["per_volume"]
    assert [row["volume"] for row in per_volume] == ["ball_001", "ball_002", "ball_003", "ball_004"]
    for row in per_volume:
        assert row["spacing_mm"] == pytest.approx([1.5, 1.5, 1.5])
        assert 0.0 <= row["dice"] <= 1.0  # every ball is in its ground truth, so Dice is defined
        assert row["hd95"] is not None and row["hd95"] > 0
        # larger than the crop along some axis after resampling: the sliding-window path was taken
        assert max(row["shape"]) > 16 and min(row["shape"]) >= 16
    saved = json.loads((run3d / "eval" / "all" / "metrics.json").read_text())
    assert saved["hd95_unit"] == "mm" and saved["dice"] == metrics["dice"]
    with open(run3d / "eval" / "all" / "per_volume.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == [row["volume"] for row in per_volume]
    assert {"shape", "spacing_mm", "dice_ball", "hd95_ball", "dice_mean"} <= set(rows[0])
    assert np.isclose(np.mean([float(r["dice_ball"]) for r in rows]), metrics["per_class"]["ball"]["dice"])
    with np.load(run3d / "eval" / "all" / "cases.npz") as cases:
        assert cases["images"].ndim == 4 and cases["labels"].shape == cases["preds"].shape
    report = (run3d / "report.html").read_text()
    assert "HD95 in mm" in report and "per_volume.csv" in report and "preprocessed grid" in report


def test_unetr_run_on_volumes_evaluates_and_predicts(task: Path, tmp_path: Path) -> None:
    run = make_run_3d(tmp_path / "run", task, segmenter="unetr")
    loaded = load_run(run)
    assert loaded.model.spatial_dims == 3 and loaded.roi_size == (16, 16, 16)
    metrics = evaluate(run, task, split="all", report=False)
    assert metrics["hd95_unit"] == "mm" and len(metrics["volume_level"]["per_volume"]) == 4
    source = task / "imagesTr" / "ball_002.nii.gz"
    predict(run, [source], tmp_path / "out")
    ref, mask = nib.load(str(source)), nib.load(str(tmp_path / "out" / "ball_002_mask.nii.gz"))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-6)


def test_a_bad_label_volume_is_one_error_naming_it(task: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "task"
    shutil.copytree(task, data)
    broken = data / "labelsTr" / "ball_002.nii.gz"
    labels = nib.load(str(broken))
    nib.save(nib.Nifti1Image(np.full(labels.shape, 7, np.uint8), labels.affine), str(broken))  # not a declared label
    run = make_run_3d(tmp_path / "run", data)
    with pytest.raises(AhmError, match=r"ball_002\.nii\.gz: label values 7"):
        evaluate(run, data, split="all", report=False)


def test_a_label_set_larger_than_the_model_is_refused(task: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "task"
    shutil.copytree(task, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"]["2"] = "second"
    (data / "dataset.json").write_text(json.dumps(meta))
    path = data / "labelsTr" / "ball_001.nii.gz"
    lab = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj) * 2, lab.affine), str(path))
    run = make_run_3d(tmp_path / "run", data)
    with pytest.raises(AhmError, match=r"ball_001\.nii\.gz: ground-truth labels go up to 2 .* 2 classes"):
        evaluate(run, data, split="all", report=False)


def test_overlap_is_used_and_refused_out_of_range(run3d: Path, task: Path) -> None:
    metrics = evaluate(run3d, task, split="all", overlap=0.25, report=False)
    assert metrics["sliding_window"]["overlap"] == 0.25
    with pytest.raises(AhmError, match="--overlap 1.0"):
        evaluate(run3d, task, split="all", overlap=1.0, report=False)
    with pytest.raises(AhmError, match="--overlap -0.1"):
        predict(run3d, [task / "imagesTr" / "ball_001.nii.gz"], task.parent / "never", overlap=-0.1)
    assert not (task.parent / "never").exists()


def test_cli_evaluate_states_mm_and_the_grid(run3d: Path, task: Path) -> None:
    res = _cli("evaluate", str(run3d), "--data", str(task), "--split", "all", "--overlap", "0.5")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps to the terminal's width
    assert "(mm)" in text and "HD95 in mm" in text and "scored on the preprocessed grid" in text
    assert "per_volume.csv" in text
    res = _cli("evaluate", str(run3d), "--split", "all", "--spatial-dims", "2")
    assert res.exit_code != 0 and "fine-tuned on volumes" in res.output


def test_predict_nifti_mask_has_the_input_shape_and_affine(run3d: Path, task: Path, tmp_path: Path) -> None:
    sources = [task / "imagesTr" / "ball_001.nii.gz", task / "imagesTr" / "ball_002.nii.gz"]
    result = predict(run3d, sources, tmp_path / "out", overlay=True)
    assert result["n_ok"] == 2 and result["volumes"] == 2 and result["spatial_dims"] == 3
    for source in sources:
        ref = nib.load(str(source))
        mask = nib.load(str(tmp_path / "out" / source.name.replace(".nii.gz", "_mask.nii.gz")))
        assert mask.shape == ref.shape
        np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-6)
        values = np.asarray(mask.dataobj)
        assert values.dtype == np.uint8 and set(np.unique(values).tolist()) <= {0, 1}
        stem = source.name.replace(".nii.gz", "")
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").mode == "RGB"


def test_predict_keeping_each_volumes_spacing(task: Path, tmp_path: Path) -> None:
    """data.spacing null: preprocessing only reorients and pads; the mask still lands on the input's grid."""
    import yaml

    run = make_run_3d(tmp_path / "run", task)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["spacing"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    source = task / "imagesTr" / "ball_003.nii.gz"
    result = predict(run, [source], tmp_path / "out")
    ref, mask = nib.load(str(source)), nib.load(str(tmp_path / "out" / "ball_003_mask.nii.gz"))
    assert result["n_ok"] == 1 and mask.shape == ref.shape
    np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-6)


def test_predict_nrrd_volume_gets_its_affine_and_a_bad_input_is_listed(run3d: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from ahm.data.formats import read_volume

    img = sitk.GetImageFromArray(np.random.default_rng(1).random((9, 24, 20)).astype(np.float32))
    img.SetSpacing((1.1, 0.9, 2.5))
    img.SetOrigin((-10.0, 4.0, 7.5))
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    missing = tmp_path / "missing.nii.gz"
    result = predict(run3d, [missing, tmp_path / "v.nrrd"], tmp_path / "out")
    assert result["n_ok"] == 1 and result["failures"][0].startswith(str(missing))
    vol = read_volume(tmp_path / "v.nrrd")
    mask = nib.load(str(tmp_path / "out" / "v_mask.nii.gz"))
    assert mask.shape == vol.data.shape[:3] == (20, 24, 9)
    np.testing.assert_allclose(mask.affine, vol.affine, atol=1e-6)


def test_predict_refuses_a_png_for_a_3d_run_and_writes_nothing(run3d: Path, task: Path, tmp_path: Path) -> None:
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    out = tmp_path / "out"
    with pytest.raises(AhmError, match=r"slice\.png: a 2D image.*fine-tuned on volumes"):
        predict(run3d, [task / "imagesTr" / "ball_001.nii.gz", png], out)
    assert not out.exists()
    res = _cli("predict", str(run3d), str(png), "--out", str(out))
    assert res.exit_code != 0 and "slice.png" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_predict_on_a_volume(run3d: Path, task: Path, tmp_path: Path) -> None:
    source = task / "imagesTr" / "ball_004.nii.gz"
    res = _cli("predict", str(run3d), str(source), "--out", str(tmp_path / "out"), "--overlap", "0.25",
               "--spatial-dims", "3")
    assert res.exit_code == 0, res.output
    assert "1 of 1 inputs segmented" in res.output and "volume" in res.output
    assert nib.load(str(tmp_path / "out" / "ball_004_mask.nii.gz")).shape == nib.load(str(source)).shape


def test_a_3d_checkpoint_without_its_window_is_refused(task: Path, tmp_path: Path) -> None:
    run = make_run_3d(tmp_path / "run", task)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    del ckpt["meta"]["roi_size"]
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    with pytest.raises(AhmError, match="roi_size"):
        load_run(run)


def test_2d_run_is_unchanged_and_refuses_spatial_dims_3(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))
    assert run.spatial_dims == 2 and run.roi_size is None
    with pytest.raises(AhmError, match="--spatial-dims 3: the run .* 2D images"):
        predict(tmp_path / "run", [tmp_path / "x.png"], tmp_path / "out", spatial_dims=3)


def test_bf16_mixed_sliding_windows_score_and_predict_as_float32_does(run3d: Path, task: Path,
                                                                      tmp_path: Path) -> None:
    full = evaluate(run3d, task, split="all", report=False)
    mixed = evaluate(run3d, task, split="all", report=False, precision="bf16-mixed")
    assert mixed["inference"] == {"device": "cpu", "precision": "bf16-mixed"}
    # bfloat16 flips only voxels whose two classes were within a few 1e-3 of each other; 0.01 of Dice per volume
    # leaves room for far more than that
    for a, b in zip(mixed["volume_level"]["per_volume"], full["volume_level"]["per_volume"]):
        assert a["volume"] == b["volume"] and a["dice"] == pytest.approx(b["dice"], abs=0.01)
    source = task / "imagesTr" / "ball_003.nii.gz"
    predict(run3d, [source], tmp_path / "fp32")
    assert predict(run3d, [source], tmp_path / "bf16", precision="bf16-mixed")["precision"] == "bf16-mixed"
    a, b = (np.asarray(nib.load(str(tmp_path / d / "ball_003_mask.nii.gz")).dataobj) for d in ("fp32", "bf16"))
    assert a.shape == b.shape and (a == b).mean() >= 0.99
