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
    assert "volume_level" not in metrics and metrics["level"] == "slice"  # 2D files: nothing to re-stack
    assert metrics["empty_cases"] == "exclude" and metrics["class_names"] == ["1"]
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


def test_volume_level_restacks_slices_by_volume(tmp_path: Path) -> None:
    """Two volumes of two slices: per volume, the 3D Dice pools its slices (a slice-level mean would not)."""
    from ahm.data.layouts import Item

    labels = np.zeros((4, 4, 4), np.int64)
    preds = np.zeros_like(labels)
    labels[0, 0:2, 0:2] = 1  # volume a, slice 0: 4 px, found
    preds[0, 0:2, 0:2] = 1
    labels[1, 0, 0] = 1  # volume a, slice 1: 1 px, missed
    labels[2, 1:3, 1:3] = 1  # volume b, slice 0: 4 px, half found
    preds[2, 1, 1:3] = 1
    items = [Item(id=f"{v}{k}", subject=v, image=Path(f"{v}.nii.gz"), mask=None, axis=2, slice=k, volume=v)
             for v, k in (("a", 1), ("a", 0), ("b", 0), ("b", 1))]  # listed out of slice order on purpose
    # rows 0, 1 of volume a are slices 1, 0; rows 2, 3 of volume b are slices 0, 1 (slice 1 empty-empty)
    images = np.zeros((4, 1, 4, 4), np.float32)
    m = score_arrays(tmp_path, preds, labels, images, [i.id for i in items], items, 2, "test")
    assert m["level"] == "volume" and m["volume_level"]["n_volumes"] == 2
    per_volume = {v["volume"]: v["dice"] for v in m["volume_level"]["per_volume"]}
    assert per_volume["a"] == pytest.approx(2 * 4 / (5 + 4))  # TP 4, |gt| 5, |pred| 4
    assert per_volume["b"] == pytest.approx(2 * 2 / (4 + 2))
    assert m["dice"] == pytest.approx((8 / 9 + 4 / 6) / 2)
    # slice level: 1, 0, 2/3 and one empty-empty slice excluded
    assert m["slice_level"]["dice"] == pytest.approx((1 + 0 + 4 / 6) / 3)
    assert m["slice_level"]["excluded_empty"] == {"1": 1}
    # pooled over the split, both levels: TP 6, FP 0, FN 3
    assert m["dataset_dice"] == pytest.approx(12 / 15) == m["slice_level"]["dataset_dice"]


def test_class_names_and_the_old_convention_reach_the_outputs(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data")
    (data / "labels.json").write_text(json.dumps({"0": "background", "1": "left atrium"}))
    metrics = evaluate(run, data, split="all", empty="one")
    assert list(metrics["per_class"]) == ["left atrium"] and metrics["class_names"] == ["left atrium"]
    assert metrics["empty_cases"] == "one" and "OLD CONVENTION" in metrics["empty_masks"]
    header = (run / "eval" / "all" / "per_image.csv").read_text().splitlines()[0]
    assert "dice_left_atrium" in header
    assert "left atrium" in (run / "report.html").read_text()


def test_refuses_bad_labels_json(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data")
    (data / "labels.json").write_text(json.dumps(["background", "tumour"]))
    with pytest.raises(AhmError, match="labels.json"):
        evaluate(run, data, split="all")


def test_cli_prints_both_levels_names_the_convention_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ahm.cli.app import _register, app

    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data")
    _register()
    res = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), "--split", "all"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "dataset Dice" in res.output and "excluded" in res.output and "absent from prediction" in res.output
    old = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), "--split", "all", "--empty-cases", "one"])
    assert old.exit_code == 0 and "OLD CONVENTION" in old.output
    bad = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), "--empty-cases", "zero"])
    assert bad.exit_code != 0 and "--empty-cases" in bad.output and "Traceback" not in bad.output


def _set_precision(run: Path, precision: str) -> None:
    from ahm.config import FinetuneConfig, load_config, save_config

    cfg = load_config(FinetuneConfig, run / "config.yaml")
    cfg.train.precision = precision
    save_config(cfg, run / "config.yaml")


def test_bf16_mixed_evaluates_as_float32_does(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ahm.cli.app import _register, app

    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data")
    full = evaluate(run, data, split="all", report=False)
    with open(run / "eval" / "all" / "per_image.csv") as fh:
        full_rows = list(csv.DictReader(fh))
    _register()
    res = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), "--split", "all",
                                   "--precision", "bf16-mixed", "--accelerator", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    mixed = json.loads(res.output)
    assert full["inference"] == {"device": "cpu", "precision": "32-true"}  # the library's default
    assert mixed["inference"] == {"device": "cpu", "precision": "bf16-mixed"}
    # bfloat16 moves a logit by a few 1e-3 and flips only pixels whose two classes were that close (about 0.05% of
    # this run's): a Dice within 0.01 of float32's, per image and overall, leaves room for twenty times that
    with open(run / "eval" / "all" / "per_image.csv") as fh:
        mixed_rows = list(csv.DictReader(fh))
    assert [r["id"] for r in mixed_rows] == [r["id"] for r in full_rows]
    for a, b in zip(mixed_rows, full_rows):
        assert float(a["dice_1"]) == pytest.approx(float(b["dice_1"]), abs=0.01)
    assert mixed["dice"] == pytest.approx(full["dice"], abs=0.01)


def test_precision_defaults_to_the_runs_own_on_a_gpu(tmp_path: Path) -> None:
    import torch

    from ahm.config import FinetuneConfig, load_config
    from ahm.eval.evaluate import inference_precision, load_run

    cuda = torch.device("cuda")  # only named: nothing is made on it

    run = make_run(tmp_path / "run")
    _set_precision(run, "bf16-mixed")
    assert load_run(run).precision == "32-true"  # the library keeps float32 unless asked
    assert inference_precision(load_config(FinetuneConfig, run / "config.yaml"), cuda, None) == "bf16-mixed"
    # on the CPU, 32-true whatever the run trained in (see inference_precision)
    assert load_run(run, precision=None).precision == "32-true"
    for own, on_gpu in (("16-mixed", "16-mixed"), ("bf16-true", "bf16-mixed"), ("32", "32-true")):
        _set_precision(run, own)
        assert inference_precision(load_config(FinetuneConfig, run / "config.yaml"), cuda, None) == on_gpu
        assert load_run(run, precision=None).precision == "32-true"
    with pytest.raises(AhmError, match="^--accelerator tpu: choose auto, cpu or cuda$"):
        load_run(run, accelerator="tpu")


def test_cli_refuses_16_mixed_on_the_cpu_and_writes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ahm.cli.app import _register, app

    run = make_run(tmp_path / "run")
    data = _folder(tmp_path / "data")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    _register()
    res = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), "--split", "all",
                                   "--precision", "16-mixed", "--accelerator", "cpu"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == ["error: --precision 16-mixed needs a GPU; on the CPU use bf16-mixed "
                                               "or 32-true"]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
