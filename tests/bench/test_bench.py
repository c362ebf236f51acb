"""`ahm bench compare` grid, tables and resumability on a tiny set."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ahm.errors import AhmError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_blob_folder, tiny_pretrain_overrides  # noqa: E402


def _grid_overrides(tmp: Path) -> dict:
    pre = tiny_pretrain_overrides(tmp, backbone="unet", steps=2)
    pre["data"].pop("path")
    ft = {
        "data": dict(pre["data"]),
        "model": dict(pre["model"]),
        "train": {"epochs": None, "steps": 2, "batch_size": 2, "warmup_steps": 1, "accelerator": "cpu"},
    }
    return {"pretrain": pre, "finetune": ft}


def test_compare_grid_tables_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ahm.bench import compare

    data = make_blob_folder(tmp_path / "data", n=16)
    out = tmp_path / "grid"
    # The grid split over two calls with disjoint seed ranges (as two processes would run it), then gathered.
    first = compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=1, labels_fraction=0.5,
                                pretrain_steps=2, finetune_epochs=1, overrides=_grid_overrides(tmp_path))
    second = compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=1, labels_fraction=0.5,
                                 pretrain_steps=2, finetune_epochs=1, overrides=_grid_overrides(tmp_path),
                                 first_seed=1)
    assert {r["seed"] for r in first["rows"]} == {0} and {r["seed"] for r in second["rows"]} == {1}
    result = compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=2, labels_fraction=0.5,
                                 pretrain_steps=2, finetune_epochs=1, overrides=_grid_overrides(tmp_path))
    assert sorted(r["dice"] for r in result["rows"]) == sorted(r["dice"] for r in first["rows"] + second["rows"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["policy"] for r in rows} == {"scratch", "random"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    table = {(e["backbone"], e["policy"]): e for e in result["table"]}
    assert table[("unet", "random")]["n"] == 2
    md = (out / "results.md").read_text()
    assert "| unet | scratch | 2 |" in md and "+-" in md
    # the intensity floor, fitted on the labelled subsets of the same two seeds and the grid's own splits
    from ahm.bench.baseline import run_baseline

    assert [r["seed"] for r in result["baseline"]["rows"]] == [0, 1]
    assert "Floors (same labelled subsets" in md and f"{result['baseline']['summary']['dice']['mean']:.4f}" in md
    # the second floor: predicting nothing scores 0 under the default metrics (every test image has a blob)
    assert result["baseline"]["empty_prediction"]["dice"] == 0.0
    assert result["baseline"]["empty_prediction"]["dataset_dice"] == 0.0
    assert "Predict nothing (all background): Dice (test) 0.0000, dataset Dice 0.0000" in md
    for e in result["table"]:  # every row says whether it clears both floors
        flag = "above both" if not compare.below_floors(e, compare.floors(result["baseline"])) else "**not clearly above"
        assert flag in next(line for line in md.splitlines() if line.startswith(f"| unet | {e['policy']} |"))
    assert all(r["empty_cases"] == "exclude" and r["dataset_dice"] is not None for r in result["rows"])
    own = run_baseline(data, 0.5, 2, data_cfg=compare.build_config(
        compare.FinetuneConfig, overrides=_grid_overrides(tmp_path)["finetune"]).data)
    assert own["rows"] == result["baseline"]["rows"]
    assert json.loads((out / "baseline.json").read_text())["rows"] == own["rows"]
    assert (out / "results.png").stat().st_size > 1000
    # random - scratch, paired by seed
    (pair,) = result["paired"]
    by = {(r["policy"], r["seed"]): r["dice"] for r in result["rows"]}
    diffs = [by[("random", s)] - by[("scratch", s)] for s in (0, 1)]
    assert (pair["policy"], pair["reference"], pair["n"]) == ("random", "scratch", 2)
    assert pair["dice"] == pytest.approx(sum(diffs) / 2)
    assert "| unet | random - scratch | 2 |" in md

    # A second run reuses every finished cell: nothing is trained again.
    def boom(*a, **k):
        raise AssertionError("a finished cell was rerun")

    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    again = compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=2, labels_fraction=0.5,
                                pretrain_steps=2, finetune_epochs=1, overrides=_grid_overrides(tmp_path))
    assert [r["dice"] for r in again["rows"]] == [r["dice"] for r in result["rows"]]
    cell = json.loads(next((out / "cells").glob("unet-random-seed0*/cell.json")).read_text())
    assert cell["pretrain_final_loss"] is not None
    # grid.json records the budget, split and config: a rerun with others would mix two grids in one table, so it
    # is refused in one line, before any work (a training here would raise the AssertionError above)
    assert json.loads((out / "grid.json").read_text())["pretrain_steps"] == 2
    with pytest.raises(AhmError, match=r"--out .*another --pretrain-steps 2, not 5 "):
        compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=2, labels_fraction=0.5,
                            pretrain_steps=5, finetune_epochs=1, overrides=_grid_overrides(tmp_path))
    other = _grid_overrides(tmp_path)
    other["pretrain"]["masking"] = {"mask_ratio": 0.25}
    with pytest.raises(AhmError, match=r"another --config \(its contents\)"):
        compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=2, labels_fraction=0.5,
                            pretrain_steps=2, finetune_epochs=1, overrides=other)

    # A cell from before dataset-level Dice, and a gather under the old convention: re-scored, never retrained.
    path = next((out / "cells").glob("unet-scratch-seed1*/cell.json"))
    before = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in before.items() if k not in ("dataset_dice", "empty_cases")}))
    rescored = compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=2, labels_fraction=0.5,
                                   pretrain_steps=2, finetune_epochs=1, overrides=_grid_overrides(tmp_path))
    assert json.loads(path.read_text())["dataset_dice"] == pytest.approx(before["dataset_dice"])
    assert [r["dice"] for r in rescored["rows"]] == [r["dice"] for r in result["rows"]]
    old = compare.run_compare(data, out, ["scratch", "random"], ["unet"], seeds=2, labels_fraction=0.5,
                              pretrain_steps=2, finetune_epochs=1, overrides=_grid_overrides(tmp_path), empty="one")
    assert all(r["empty_cases"] == "one" for r in old["rows"]) and old["baseline"]["empty_cases"] == "one"
    assert "OLD CONVENTION" in (out / "results.md").read_text()


def test_paired_differences_by_seed_with_exact_sign_flip_p() -> None:
    from ahm.bench.compare import paired_differences, sign_flip_p

    # all 3 differences positive: only "all +" and "all -" of the 8 sign patterns reach |mean| -> p = 2/8
    assert sign_flip_p([0.01, 0.02, 0.03]) == pytest.approx(0.25)
    # +3, -1, +1: patterns with |sum| >= 3 are (+3,+-1,+-1) with sum 3 or 5 and mirrored: 6 of 8
    assert sign_flip_p([3.0, -1.0, 1.0]) == pytest.approx(6 / 8)
    assert sign_flip_p([0.5] * 8) == pytest.approx(2 / 256)
    assert sign_flip_p([0.0, 0.0]) == 1.0 and sign_flip_p([0.2, -0.2]) == 1.0
    # the counting by halves against plain enumeration of every pattern, with ties (integers) and without
    rng = np.random.default_rng(0)
    for values in [rng.integers(-3, 4, 9).astype(float), rng.normal(0.004, 0.012, 11), rng.normal(0, 1, 1)]:
        signs = np.array([[-1.0 if k >> i & 1 else 1.0 for i in range(len(values))] for k in range(2 ** len(values))])
        brute = float(np.mean(np.abs(signs @ values) >= abs(values.sum()) - 1e-12))
        assert sign_flip_p(list(values)) == pytest.approx(brute, abs=1e-12)
    assert sign_flip_p([0.01] * 30) == pytest.approx(2 / 2 ** 30)  # beyond plain enumeration
    with pytest.raises(AhmError, match="sign-flip"):
        sign_flip_p([0.01] * 41)
    rows = []
    for seed, (scratch, random, ahm) in enumerate([(0.80, 0.79, 0.83), (0.82, 0.83, 0.84), (0.81, 0.80, 0.80)]):
        for policy, dice in (("scratch", scratch), ("random", random), ("ahm", ahm)):
            rows.append({"backbone": "unet", "policy": policy, "seed": seed, "dice": dice, "val_dice": dice - 0.1})
    rows.append({"backbone": "unet", "policy": "ahm", "seed": 7, "dice": 0.9, "val_dice": 0.9})  # unpaired: left out
    got = {(e["policy"], e["reference"]): e for e in paired_differences(rows)}
    assert set(got) == {("random", "scratch"), ("ahm", "scratch"), ("ahm", "random")}
    e = got[("ahm", "scratch")]
    assert e["n"] == 3 and e["dice"] == pytest.approx((0.03 + 0.02 - 0.01) / 3)
    assert e["dice_std"] == pytest.approx(0.02081666, abs=1e-6) and e["dice_ahead"] == 2
    assert e["dice_p"] == pytest.approx(sign_flip_p([0.03, 0.02, -0.01]))
    assert got[("ahm", "random")]["dice_ahead"] == 2 and got[("ahm", "random")]["val_dice"] == pytest.approx(
        (0.04 + 0.01 + 0.0) / 3
    )


def test_compare_rejects_unknown_names(tmp_path: Path) -> None:
    from ahm.bench.compare import run_compare

    with pytest.raises(AhmError, match="--policies"):
        run_compare(tmp_path, tmp_path / "o", ["magic"], ["unet"], 1, 0.1, 1, 1)
    with pytest.raises(AhmError, match="--first-seed"):
        run_compare(tmp_path, tmp_path / "o", ["scratch"], ["unet"], 1, 0.1, 1, 1, first_seed=-1)
    with pytest.raises(AhmError, match="--backbones"):
        run_compare(tmp_path, tmp_path / "o", ["random"], ["resnet"], 1, 0.1, 1, 1)


def test_a_policy_is_above_a_floor_only_clearly() -> None:
    from ahm.bench.compare import below_floors

    floor = {"predict nothing": {"dice": 0.0, "dataset_dice": 0.0}}
    assert below_floors({"n": 3, "dice": 0.0011, "dice_std": 0.0009, "dataset_dice": 0.0012}, floor) == [
        "predict nothing"]  # 0.001 Dice is not learning
    assert below_floors({"n": 3, "dice": 0.30, "dice_std": 0.02, "dataset_dice": 0.35}, floor) == []
    # a spread over seeds as large as the lead: not clearly above
    assert below_floors({"n": 3, "dice": 0.30, "dice_std": 0.40, "dataset_dice": 0.35,
                         "dataset_dice_std": 0.0}, floor) == ["predict nothing"]
