"""`ahm bench curve`: labelled subjects and pretraining corpus as grid axes; tables, plot, pairing, resume."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahm.errors import AhmError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_blob_folder, tiny_pretrain_overrides  # noqa: E402


def _overrides(tmp: Path) -> dict:
    pre = tiny_pretrain_overrides(tmp, backbone="unet", steps=2)
    pre["data"].pop("path")
    ft = {"data": dict(pre["data"]), "model": dict(pre["model"]),
          "train": {"batch_size": 2, "warmup_steps": 1, "accelerator": "cpu"}}
    return {"pretrain": pre, "finetune": ft}


@pytest.mark.slow
def test_curve_grid_axes_tables_plot_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ahm.bench.curve import parse_labels, run_curve

    data = make_blob_folder(tmp_path / "data", n=20)  # 10 subjects: 2 test, 2 val, 6 train
    small = make_blob_folder(tmp_path / "small", n=10, seed=1)  # 5 subjects: 3 train
    large = make_blob_folder(tmp_path / "large", n=30, seed=2)  # 15 subjects: 9 train
    out = tmp_path / "grid"
    kwargs = dict(policies=["scratch", "random"], backbones=["unet"], labels=parse_labels("1,all"),
                  pretrain_steps=2, finetune_steps=2, corpora=[small, large], overrides=_overrides(tmp_path))
    first = run_curve(data, out, seeds=1, **kwargs)
    second = run_curve(data, out, seeds=1, first_seed=1, **kwargs)
    result = run_curve(data, out, seeds=2, **kwargs)
    assert result["train_subjects"] == 6
    # scratch once per labels x seed (no corpus), random per corpus x labels x seed
    assert len(first["rows"]) == len(second["rows"]) == 2 + 4 and len(result["rows"]) == 12
    points = {(e["policy"], e["corpus"], e["labelled_subjects"]): e for e in result["table"]}
    assert set(points) == {("scratch", "-", 1), ("scratch", "-", 6), ("random", "small", 1), ("random", "small", 6),
                           ("random", "large", 1), ("random", "large", 6)}
    assert points[("random", "small", 1)]["corpus_subjects"] == 3
    assert points[("random", "large", 1)]["corpus_subjects"] == 9
    assert all(e["n"] == 2 for e in result["table"])
    # one labelled subject is one subject's slices; 'all' is every training subject's
    import json

    cell = next((out / "cells").glob("unet-scratch-corpus--labels1-seed0"))
    labelled = json.loads((cell / "finetune" / "labelled.json").read_text())
    assert len(labelled["subjects"]) == 1
    cell_all = next((out / "cells").glob("unet-scratch-corpus--labelsall-seed0"))
    assert len(json.loads((cell_all / "finetune" / "labelled.json").read_text())["subjects"]) == 6
    # the same seed labels the same subjects whatever the policy: pairs are pairs
    same = next((out / "cells").glob("unet-random-corpuslarge-labels1-seed0"))
    assert json.loads((same / "finetune" / "labelled.json").read_text())["subjects"] == labelled["subjects"]
    # random - scratch paired by seed at every (corpus, labels) point
    pairs = {(e["corpus"], e["labels"]): e for e in result["paired"]}
    assert set(pairs) == {("small", "1"), ("small", "all"), ("large", "1"), ("large", "all")}
    by = {(r["policy"], r["corpus"], str(r["labels"]), r["seed"]): r["dice"] for r in result["rows"]}
    diffs = [by[("random", "large", "1", s)] - by[("scratch", "-", "1", s)] for s in (0, 1)]
    assert pairs[("large", "1")]["dice"] == pytest.approx(sum(diffs) / 2)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12 and {r["corpus"] for r in rows} == {"-", "small", "large"}
    md = (out / "results.md").read_text()
    assert "| unet | random | large (9) | all (6) | 2 |" in md and "| unet | large | 1 | random - scratch | 2 |" in md
    # corpus size, paired by seed: the larger corpus minus the first one given (no `data` corpus in this grid)
    assert "| unet | 1 | random | large (9) - small (3) | 2 |" in md
    # the floors of each labels point, fitted on the same labelled subjects per seed, and each point flagged
    floor1 = json.loads((out / "baseline-labels1.json").read_text())
    assert floor1["labels_subjects"] == 1 and [r["seed"] for r in floor1["rows"]] == [0, 1]
    assert json.loads((out / "baseline-labelsall.json").read_text())["rows"][0]["labelled_images"] == 12
    assert floor1["rows"][0]["labelled_subjects"] == labelled["subjects"]
    assert "| labels | n | intensity lookup: Dice (test) |" in md and "| 1 | 2 |" in md
    flags = [line.rsplit("|", 2)[-2].strip() for line in md.splitlines() if line.startswith("| unet | ")
             and line.count("|") == 10]
    assert len(flags) == 6 and all(f == "above both" or f.startswith("**not clearly above") for f in flags)
    assert (out / "results.png").stat().st_size > 1000

    assert {"hardness_ratio", "critic_spearman", "pretrain_final_loss"} <= set(rows[0])
    # a cell finished before the agent's figures were recorded takes them from its pretraining run's summary
    old_cell = out / "cells" / "unet-random-corpuslarge-labels1-seed0" / "cell.json"
    old_row = {k: v for k, v in json.loads(old_cell.read_text()).items()
               if k not in ("hardness_ratio", "critic_spearman")}
    old_cell.write_text(json.dumps(old_row))
    pre_summary = out / "pretrain" / "unet-random-corpuslarge-seed0" / "summary.json"
    pre_summary.write_text(json.dumps({**json.loads(pre_summary.read_text()), "hardness_ratio": 3.5}))

    def boom(*a, **k):
        raise AssertionError("a finished cell was rerun")

    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    again = run_curve(data, out, seeds=2, **kwargs)
    assert [r["dice"] for r in again["rows"]] == [r["dice"] for r in result["rows"]]
    by_cell = {(r["policy"], r["corpus"], str(r["labels"]), r["seed"]): r for r in again["rows"]}
    assert by_cell[("random", "large", "1", 0)]["hardness_ratio"] == 3.5
    assert by_cell[("random", "small", "1", 0)]["hardness_ratio"] is None  # random masking has no agent


def test_curve_refusals(tmp_path: Path) -> None:
    from ahm.bench.curve import parse_labels, run_curve

    assert parse_labels("1, 2,all,2") == [1, 2, "all"]
    for bad, message in (("0", "at least 1"), ("two", "'two' is not a number"), ("", "at least one value")):
        with pytest.raises(AhmError, match=f"--labels: .*{message}|--labels: {message}"):
            parse_labels(bad)
    data = make_blob_folder(tmp_path / "data", n=20)
    with pytest.raises(AhmError, match="--labels 7: .* has 6 training subjects"):
        run_curve(data, tmp_path / "o", ["scratch"], ["unet"], [7], 1, 1, 1, overrides=_overrides(tmp_path))
    with pytest.raises(AhmError, match="--corpus .*nowhere: not a folder"):
        run_curve(data, tmp_path / "o", ["random"], ["unet"], [1], 1, 1, 1, corpora=[tmp_path / "nowhere"],
                  overrides=_overrides(tmp_path))
    from ahm.cli.app import _register, app

    _register()
    res = CliRunner().invoke(app, ["bench", "curve", str(data), "--out", str(tmp_path / "o"), "--labels", "x"])
    assert res.exit_code != 0 and "--labels: 'x'" in res.output


def test_the_labelled_set_given_as_a_corpus_is_the_default_corpus(tmp_path: Path) -> None:
    from ahm.bench.curve import SAME, corpus_names

    data, big = tmp_path / "bs60", tmp_path / "c200"
    data.mkdir(), big.mkdir(), (tmp_path / "other").mkdir(), (tmp_path / "other" / "c200").mkdir()
    assert corpus_names(data, None) == [(SAME, data)]
    # by path, however written: its cells are the default corpus's cells
    again = tmp_path / "other" / ".." / "bs60"
    assert corpus_names(data, [again, big]) == [(SAME, again), ("c200", big)]
    with pytest.raises(AhmError, match="--corpus: two folders share one name"):
        corpus_names(data, [big, tmp_path / "other" / "c200"])


def test_curve_epoch_budget_grows_with_the_labelled_set(tmp_path: Path) -> None:
    """--finetune-epochs E with --finetune-steps S: E epochs over each cell's labelled slices, at least S steps."""
    import json

    from ahm.bench.curve import parse_labels, run_curve

    data = make_blob_folder(tmp_path / "data", n=20)  # 6 training subjects of 2 slices each
    out = tmp_path / "grid"
    run_curve(data, out, ["scratch"], ["unet"], parse_labels("1,all"), 1, 1, 3, overrides=_overrides(tmp_path),
              finetune_epochs=1)
    steps = {n: json.loads((out / "cells" / f"unet-scratch-corpus--labels{n}-seed0" / "finetune" /
                            "summary.json").read_text())["steps"] for n in ("1", "all")}
    # 1 subject: 2 slices, batch 2 -> 1 step an epoch, raised to the floor of 3; all: 12 slices -> 6 steps
    assert steps == {"1": 3, "all": 6}
    with pytest.raises(AhmError, match="--finetune-epochs 0"):
        run_curve(data, tmp_path / "o", ["scratch"], ["unet"], [1], 1, 1, 3, overrides=_overrides(tmp_path),
                  finetune_epochs=0)


def test_gather_reports_the_finished_cells_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ahm.bench.curve import parse_labels, run_curve

    data = make_blob_folder(tmp_path / "data", n=20)
    out = tmp_path / "grid"
    with pytest.raises(AhmError, match="--gather: no finished cell of this grid"):
        run_curve(data, out, ["scratch"], ["unet"], [1], 2, 1, 1, overrides=_overrides(tmp_path), gather=True)
    run_curve(data, out, ["scratch"], ["unet"], [1], 1, 1, 1, overrides=_overrides(tmp_path))  # seed 0 only

    def boom(*a, **k):
        raise AssertionError("--gather ran a cell")

    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    seen = []
    result = run_curve(data, out, ["scratch", "random"], ["unet"], parse_labels("1,all"), 2, 1, 1,
                       overrides=_overrides(tmp_path), gather=True, log=seen.append)
    assert [(r["policy"], r["labels"], r["seed"]) for r in result["rows"]] == [("scratch", 1, 0)]
    assert len(result["missing"]) == 7 and "unet-random-corpusdata-labels1-seed0" in result["missing"]
    assert any("1 of 8 cells finished; 7 not run" in m for m in seen)
    assert "**Partial: 1 of 8 cells finished**" in (out / "results.md").read_text()


def test_corpus_size_is_paired_by_seed_against_the_labelled_sets_own_corpus() -> None:
    from ahm.bench.curve_stats import paired_by_corpus

    sizes = {"data": 42, "c1000": 1000, "c200": 200}
    rows = [{"backbone": "unet", "policy": "scratch", "corpus": "-", "corpus_subjects": None, "labels": 5,
             "seed": s, "dice": 0.5, "val_dice": 0.5} for s in range(3)]
    for policy, gain in (("random", 0.01), ("ahm", -0.02)):
        for corpus in ("c1000", "data", "c200"):  # first seen is not the reference: `data` is
            for seed in range(3):
                if corpus == "c1000" and seed == 2:
                    continue  # not finished: paired on the seeds both arms have
                bonus = {"data": 0.0, "c200": gain, "c1000": 2 * gain}[corpus] + 0.001 * seed * (corpus != "data")
                rows.append({"backbone": "unet", "policy": policy, "corpus": corpus, "corpus_subjects": sizes[corpus],
                             "labels": 5, "seed": seed, "dice": 0.7 + bonus, "val_dice": 0.6 + bonus / 2})
    out = paired_by_corpus(rows)
    assert [(e["policy"], e["corpus"], e["reference"], e["n"]) for e in out] == [
        ("random", "c200", "data", 3), ("random", "c1000", "data", 2), ("ahm", "c200", "data", 3),
        ("ahm", "c1000", "data", 2)]
    random200, random1000, ahm200, ahm1000 = out
    assert random200["dice"] == pytest.approx(0.011) and random200["dice_ahead"] == 3
    assert random1000["dice"] == pytest.approx(0.0205) and random1000["val_dice"] == pytest.approx(0.01025)
    assert ahm1000["dice"] == pytest.approx(-0.0395) and ahm1000["dice_ahead"] == 0
    assert ahm200["dice_p"] == pytest.approx(0.25) and (ahm200["corpus_subjects"], ahm200["reference_subjects"]) == (
        200, 42)
    assert paired_by_corpus([r for r in rows if r["corpus"] in ("-", "data")]) == []  # one corpus: nothing to pair


def test_the_plot_adds_the_paired_corpus_panel_only_when_corpora_pair(tmp_path: Path) -> None:
    import struct

    from ahm.bench.curve_render import _plot
    from ahm.bench.curve_stats import aggregate

    def width(rows) -> int:
        _plot(tmp_path / "p.png", aggregate(rows), "test", None, rows)
        return struct.unpack(">I", (tmp_path / "p.png").read_bytes()[16:20])[0]  # PNG IHDR width

    rows = [{"backbone": "unet", "policy": "random", "corpus": c, "corpus_subjects": n, "labels": 1,
             "labelled_subjects": 1, "seed": s, "dice": 0.6 + 0.01 * s, "val_dice": 0.6, "hd95": 3.0}
            for c, n in (("data", 42), ("c200", 200)) for s in range(2)]
    one_corpus = [r for r in rows if r["corpus"] == "data"]
    unpaired = [r if r["corpus"] == "data" else {**r, "seed": r["seed"] + 10} for r in rows]  # no common seed
    assert width(one_corpus) < width(unpaired) < width(rows)  # 1, 2 and 3 panels


def test_corpus_trend_is_one_paired_slope_test_per_policy_and_labels() -> None:
    from ahm.bench.curve_stats import corpus_trend

    sizes = {"data": 10, "c100": 100, "c10000": 10000}
    rows = [{"backbone": "unet", "policy": "scratch", "corpus": "-", "corpus_subjects": None, "labels": 1,
             "seed": s, "dice": 0.5, "val_dice": 0.5} for s in range(4)]
    for policy, slope in (("random", 0.02), ("ahm", -0.01)):
        for corpus, size in sizes.items():
            for seed in range(4):
                if policy == "ahm" and corpus == "c100" and seed == 3:
                    continue  # a seed missing one corpus has no slope: left out, not fitted on two points
                # a seed effect shifts every corpus alike (no slope); seed 1's middle corpus is 0.03 up, which
                # a least-squares fit on x = 1, 2, 4 turns into a slope 0.03 * (2 - 7/3) / (42/9) lower (an
                # end-to-end difference would not see it)
                wobble = 0.03 if (seed == 1 and corpus == "c100") else 0.0
                dice = 0.6 + 0.05 * seed + slope * math.log10(size / 10) + wobble
                rows.append({"backbone": "unet", "policy": policy, "corpus": corpus, "corpus_subjects": size,
                             "labels": 1, "seed": seed, "dice": dice, "val_dice": dice - 0.01})
    out = corpus_trend(rows)
    assert [(e["policy"], e["n"], e["corpus_subjects"]) for e in out] == [
        ("random", 4, [10, 100, 10000]), ("ahm", 3, [10, 100, 10000])]
    random, ahm = out
    seed1 = 0.02 - 0.03 * (1 / 3) * (9 / 42)
    assert random["dice"] == pytest.approx((3 * 0.02 + seed1) / 4) and random["dice_ahead"] == 4
    assert random["dice_p"] == pytest.approx(2 / 2 ** 4) and random["val_dice"] == pytest.approx(random["dice"])
    assert ahm["dice"] == pytest.approx((2 * -0.01 + (-0.01 - 0.03 * (1 / 3) * (9 / 42))) / 3)
    assert ahm["dice_ahead"] == 0 and ahm["dice_p"] == pytest.approx(0.25)
    # two corpora: a slope is only the paired difference again, so no trend row
    assert corpus_trend([r for r in rows if r["corpus"] != "c100"]) == []


def _restore_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "experiments" / "brain-subjects-cells" / "restore.py"
    spec = importlib.util.spec_from_file_location("restore_cells", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cell_records_rebuilt_from_results_csv_are_kept_by_gather(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy grid's records (experiments/brain-subjects-cells/restore.py): a grid folder lost with its machine is
    rebuilt from its gathered results.csv, and `--gather` then reads back the same rows, typed as cell.json had them."""
    from ahm.bench.curve import parse_labels, run_curve
    from ahm.bench.curve_render import COLUMNS

    restore = _restore_module()
    data = make_blob_folder(tmp_path / "data", n=20)
    first = run_curve(data, tmp_path / "grid", ["scratch"], ["unet"], parse_labels("1,all"), 1, 1, 1,
                      overrides=_overrides(tmp_path))
    assert restore.from_csv(tmp_path / "grid" / "results.csv", tmp_path / "lost", skip=set()) == 2
    assert restore.from_csv(tmp_path / "grid" / "results.csv", tmp_path / "lost", skip=set()) == 0  # never over

    def boom(*a, **k):
        raise AssertionError("--gather ran a cell")

    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    again = run_curve(data, tmp_path / "lost", ["scratch"], ["unet"], parse_labels("1,all"), 1, 1, 1,
                      overrides=_overrides(tmp_path), gather=True)
    assert len(again["rows"]) == 2 and not again["missing"]
    for old, new in zip(first["rows"], again["rows"]):
        for key in COLUMNS:
            if isinstance(old.get(key), float):
                assert new[key] == pytest.approx(old[key], rel=1e-12), key
            else:
                assert new.get(key) == old.get(key), key
        assert new["restored_from"] == "experiments/results.csv"

    records = tmp_path / "records"
    assert restore.copy_records(tmp_path / "lost", records) == 2
    assert restore.copy_records(records, tmp_path / "fresh") == 2
    assert sorted(p.parent.name for p in (tmp_path / "fresh" / "cells").glob("*/cell.json")) == [
        "unet-scratch-corpus--labels1-seed0", "unet-scratch-corpus--labelsall-seed0"]


def test_hd95_of_cells_scored_in_different_units_is_never_averaged() -> None:
    from ahm.bench.compare import aggregate as compare_aggregate
    from ahm.bench.curve_stats import aggregate

    rows = [{"backbone": "unet", "policy": "random", "corpus": "data", "corpus_subjects": 4, "labels": 1,
             "labelled_subjects": 1, "seed": s, "dice": 0.5, "hd95": hd, "hd95_unit": unit, "val_dice": 0.5}
            for s, (hd, unit) in enumerate([(4.0, "pixels of the model grid"), (9.0, "mm")])]
    for entry in (aggregate(rows)[0], compare_aggregate(rows)[0]):
        assert math.isnan(entry["hd95"]) and entry["dice"] == pytest.approx(0.5)
    rows[1]["hd95_unit"] = "pixels of the model grid"
    assert aggregate(rows)[0]["hd95"] == pytest.approx(6.5)


def test_pretrain_epoch_budget_grows_with_the_corpus_and_the_grid_keeps_its_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pretrain-epochs E with --pretrain-steps S: E epochs over each corpus, at least S steps; the grid folder's
    grid.json then refuses a rerun with another budget before any work, and keeps its cells."""
    import json

    from ahm.bench.curve import run_curve

    data = make_blob_folder(tmp_path / "data", n=20)
    small = make_blob_folder(tmp_path / "small", n=10, seed=1)  # 3 training subjects, 6 slices
    large = make_blob_folder(tmp_path / "large", n=30, seed=2)  # 9 training subjects, 18 slices
    out = tmp_path / "grid"
    kwargs = dict(policies=["random"], backbones=["unet"], labels=[1], seeds=1, finetune_steps=1,
                  corpora=[small, large], overrides=_overrides(tmp_path))
    result = run_curve(data, out, pretrain_steps=4, pretrain_epochs=1, **kwargs)
    # batch 2: the small corpus has 3 steps an epoch, raised to the floor of 4; the large one 9
    steps = {r["corpus"]: r["pretrain_steps"] for r in result["rows"]}
    assert steps == {"small": 4, "large": 9}
    for name, n in steps.items():
        summary = json.loads((out / "pretrain" / f"unet-random-corpus{name}-seed0" / "summary.json").read_text())
        assert summary["steps"] == n
    saved = json.loads((out / "grid.json").read_text())
    assert saved["pretrain_epochs"] == 1 and saved["pretrain_steps"] == 4

    def boom(*a, **k):
        raise AssertionError("a refused grid ran a cell")

    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    before = {p: p.read_bytes() for p in out.rglob("cell.json")}
    with pytest.raises(AhmError, match=r"--out .*grid: its cells were run with another --pretrain-epochs 1, "
                                       r"not \(unset\)"):
        run_curve(data, out, pretrain_steps=4, **kwargs)
    other = dict(kwargs, overrides=_merge_train(kwargs["overrides"], {"lr": 0.5}))
    with pytest.raises(AhmError, match=r"another --config \(its contents\) \("):
        run_curve(data, out, pretrain_steps=4, pretrain_epochs=1, **other)
    assert {p: p.read_bytes() for p in out.rglob("cell.json")} == before
    # the same settings: every cell kept, nothing run
    again = run_curve(data, out, pretrain_steps=4, pretrain_epochs=1, **kwargs)
    assert [r["dice"] for r in again["rows"]] == [r["dice"] for r in result["rows"]]
    with pytest.raises(AhmError, match="--pretrain-epochs 0: give at least 1"):
        run_curve(data, tmp_path / "o", pretrain_steps=4, pretrain_epochs=0, **kwargs)


def test_a_grid_folder_without_recorded_settings_gets_them_and_a_broken_record_is_named(tmp_path: Path) -> None:
    from ahm.bench.compare import SETTINGS, check_settings

    settings = {"pretrain_steps": 1000, "pretrain_epochs": None, "split": "test", "config": {"overrides": {"a": (1, 2)}}}
    old = tmp_path / "old"
    (old / "cells").mkdir(parents=True)  # a grid of an earlier version: cells, no grid.json
    check_settings(old, settings)
    assert (old / SETTINGS).is_file()
    check_settings(old, settings)  # tuples and lists are one setting
    with pytest.raises(AhmError, match="another --pretrain-steps 1000, not 3000"):
        check_settings(old, dict(settings, pretrain_steps=3000))
    (old / SETTINGS).write_text("{not json")
    with pytest.raises(AhmError, match=f"{SETTINGS}: not readable"):
        check_settings(old, settings)


def _merge_train(overrides: dict, train: dict) -> dict:
    import copy

    merged = copy.deepcopy(overrides)
    merged["pretrain"]["train"] = {**merged["pretrain"]["train"], **train}
    return merged


def test_pretrain_cell_remakes_a_run_kept_only_as_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid folder rebuilt from kept records has pretraining summaries without weights: the cells still to run
    need the encoder, so the run is made again (not taken as done), and the cell says it is a rerun."""
    import json

    from ahm.bench.compare import pretrain_cell, pretrain_figures
    from ahm.config import PretrainConfig, build_config

    data = make_blob_folder(tmp_path / "data", n=10)
    cfg = build_config(PretrainConfig, overrides=tiny_pretrain_overrides(data, backbone="unet", steps=2))
    run = tmp_path / "pretrain" / "unet-random-corpusdata-seed3"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 2, "final_loss": 9.25}))  # what `restore.py load` leaves
    summary, _ = pretrain_cell(cfg, run)
    assert (run / "encoder.safetensors").is_file() and (run / "run.json").is_file()
    assert summary["recorded_final_loss"] == 9.25 and summary["final_loss"] != 9.25
    assert pretrain_figures(summary)["pretrain_recorded_final_loss"] == 9.25
    assert "recorded_final_loss" not in json.loads((run / "summary.json").read_text())

    def boom(*a, **k):
        raise AssertionError("a finished run was made again")

    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    again, _ = pretrain_cell(cfg, run)  # summary and weights: done, kept
    assert again["final_loss"] == summary["final_loss"] and "pretrain_recorded_final_loss" not in pretrain_figures(again)
    # weights gone from a run folder that holds more than the record: the run is remade (--force), not resumed
    (run / "encoder.safetensors").unlink()
    monkeypatch.undo()
    third, _ = pretrain_cell(cfg, run)
    assert (run / "encoder.safetensors").is_file() and third["recorded_final_loss"] == summary["final_loss"]


def test_plot_styles_one_colour_per_policy_one_look_per_corpus_and_labels() -> None:
    """4 policies on 4 corpora and scratch are 17 lines: a colour cycle alone would give two policies one colour."""
    from ahm.bench.curve_render import plot_styles

    table = [{"backbone": "unet", "policy": "scratch", "corpus": "-", "labels": n} for n in (1, 5)]
    table += [{"backbone": "unet", "policy": p, "corpus": c, "labels": n}
              for p in ("random", "hpm", "ahm", "ahm-official") for c in ("data", "c50", "c200", "c1000")
              for n in (1, 5)]
    styles = plot_styles(table)
    colours = styles["colour"]
    assert len(colours) == 5 and len(set(colours.values())) == 5
    looks = [tuple(sorted(v.items())) for v in styles["corpus"].values()]
    assert len(looks) == 5 and len(set(looks)) == 5  # '-' (scratch) and the four corpora
    assert set(styles["labels"]) == {"1", "5"} and styles["labels"]["1"] != styles["labels"]["5"]


def test_budget_axis_and_frozen_protocol_share_pretraining_runs_and_keep_their_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pretrain-steps 2,4 with --protocol finetune,frozen: one pretraining run per budget, each with its own
    complete schedule, shared by both protocols' cells; scratch once per protocol; tables name both axes."""
    import json

    from ahm.bench.curve import run_curve

    data = make_blob_folder(tmp_path / "data", n=20)
    out = tmp_path / "grid"
    kwargs = dict(policies=["scratch", "random"], backbones=["unet"], labels=[1], seeds=1, finetune_steps=2,
                  overrides=_overrides(tmp_path))
    result = run_curve(data, out, pretrain_steps=[3, 6], protocols=["finetune", "frozen"], **kwargs)
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["unet-random-corpusdata-steps3-labels1-frozen-seed0", "unet-random-corpusdata-steps3-labels1-seed0",
                     "unet-random-corpusdata-steps6-labels1-frozen-seed0", "unet-random-corpusdata-steps6-labels1-seed0",
                     "unet-scratch-corpus--labels1-frozen-seed0", "unet-scratch-corpus--labels1-seed0"]
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["unet-random-corpusdata-steps3-seed0",
                                                                   "unet-random-corpusdata-steps6-seed0"]
    # each budget is its own run on its own complete schedule (warm-up, cosine to its own last step), so the
    # small budget is not a snapshot taken part-way through the large one's cosine
    from ahm.train.schedule import lr_factor

    lrs = {}
    for budget in (3, 6):
        run = out / "pretrain" / f"unet-random-corpusdata-steps{budget}-seed0"
        assert json.loads((run / "summary.json").read_text())["steps"] == budget
        lrs[budget] = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
        cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))["train"]
        assert lrs[budget] == pytest.approx([cfg["lr"] * lr_factor(s, budget, cfg["warmup_steps"],
                                                                   cfg["min_lr"] / cfg["lr"]) for s in range(budget)])
    assert lrs[3][2] < lrs[6][2]
    rows = {(r["policy"], r["protocol"], r["pretrain_budget"]): r for r in result["rows"]}
    assert set(rows) == {("scratch", "finetune", None), ("scratch", "frozen", None), ("random", "finetune", 3),
                         ("random", "frozen", 3), ("random", "finetune", 6), ("random", "frozen", 6)}
    for cell in cells:
        summary = json.loads((out / "cells" / cell / "finetune" / "summary.json").read_text())
        assert summary["protocol"] == ("frozen" if "frozen" in cell else "finetune")
    frozen_scratch = json.loads((out / "cells" / cells[4] / "finetune" / "summary.json").read_text())
    whole_scratch = json.loads((out / "cells" / cells[5] / "finetune" / "summary.json").read_text())
    assert frozen_scratch["trainable_parameters"] < whole_scratch["trainable_parameters"]
    # random - scratch paired within each protocol and budget
    pairs = {(e["protocol"], e["pretrain_budget"]) for e in result["paired"] if e["reference"] == "scratch"}
    assert pairs == {("finetune", 3), ("finetune", 6), ("frozen", 3), ("frozen", 6)}
    md = (out / "results.md").read_text()
    assert "| backbone | protocol | budget (steps) | policy |" in md
    assert "| unet | frozen | 6 | random | data (6) | 1 (1) | 1 |" in md
    assert "Budget trend" in md and "| unet | frozen | data | 1 | random | 3, 6 | 1 |" in md
    header = next(csv.reader((out / "results.csv").open()))
    assert {"protocol", "pretrain_budget"} <= set(header)
    saved = json.loads((out / "grid.json").read_text())
    assert saved["pretrain_steps"] == [3, 6] and saved["protocols"] == ["finetune", "frozen"]

    def boom(*a, **k):
        raise AssertionError("a refused grid ran a cell")

    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    before = {p: p.read_bytes() for p in out.rglob("*.json")}
    with pytest.raises(AhmError, match=r"another --pretrain-steps \[3, 6\], not \[3, 6, 12\]"):
        run_curve(data, out, pretrain_steps=[3, 6, 12], protocols=["finetune", "frozen"], **kwargs)
    with pytest.raises(AhmError, match=r"another --protocol"):
        run_curve(data, out, pretrain_steps=[3, 6], protocols=["finetune"], **kwargs)
    assert {p: p.read_bytes() for p in out.rglob("*.json")} == before


def test_run_steps_runs_the_chosen_budgets_and_reports_every_finished_cell(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--run-steps 6 on a 3,6 axis: scratch and the 6-step cells run, the 3-step ones are left (counted missing);
    a later call without it runs them and keeps the rest; a budget off the axis, or no axis, is refused before
    any work."""
    from ahm.bench.curve import run_curve

    data = make_blob_folder(tmp_path / "data", n=20)
    out = tmp_path / "grid"
    kwargs = dict(policies=["scratch", "random"], backbones=["unet"], labels=[1], seeds=1, finetune_steps=2,
                  overrides=_overrides(tmp_path))
    said: list[str] = []
    first = run_curve(data, out, pretrain_steps=[3, 6], run_steps=[6], log=said.append, **kwargs)
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["unet-random-corpusdata-steps6-seed0"]
    assert {(r["policy"], r["pretrain_budget"]) for r in first["rows"]} == {("scratch", None), ("random", 6)}
    assert first["missing"] == ["unet-random-corpusdata-steps3-labels1-seed0"]
    assert any(m.startswith("--run-steps 6: 1 cells at other budgets not run") for m in said)
    assert "Partial: 2 of 3 cells finished" in (out / "results.md").read_text()
    kept = {p: p.read_bytes() for p in (out / "cells").rglob("cell.json")}
    second = run_curve(data, out, pretrain_steps=[3, 6], **kwargs)
    assert second["missing"] == [] and len(second["rows"]) == 3
    assert {p: p.read_bytes() for p in kept} == kept

    monkeypatch.setattr("ahm.train.pretrain.pretrain", lambda *a, **k: pytest.fail("a refused grid pretrained"))
    with pytest.raises(AhmError, match=r"--run-steps 4: not on the --pretrain-steps axis 3,6"):
        run_curve(data, out, pretrain_steps=[3, 6], run_steps=[4], **kwargs)
    with pytest.raises(AhmError, match=r"--run-steps 3: needs a budget axis"):
        run_curve(data, tmp_path / "single", pretrain_steps=3, run_steps=[3], **kwargs)
    assert not (tmp_path / "single").exists()
    with pytest.raises(AhmError, match=r"--run-steps 6,3: budgets must be positive and increasing"):
        run_curve(data, out, pretrain_steps=[3, 6], run_steps=[6, 3], **kwargs)


def test_budget_and_protocol_refusals(tmp_path: Path) -> None:
    from ahm.bench.curve import parse_budgets, parse_protocols, run_curve

    assert parse_budgets("1000, 3000,10000") == [1000, 3000, 10000]
    for bad, message in (("3000,1000", "positive and increasing"), ("0", "positive and increasing"),
                         ("1000,1000", "positive and increasing"), ("1e3", "'1e3' is not a number of steps"),
                         ("", "give at least one budget")):
        with pytest.raises(AhmError, match=f"--pretrain-steps.*{message}"):
            parse_budgets(bad)
    assert parse_protocols("frozen, finetune,frozen") == ["frozen", "finetune"]
    with pytest.raises(AhmError, match="--protocol: 'linear' is not a protocol"):
        parse_protocols("linear")
    data = make_blob_folder(tmp_path / "data", n=20)
    with pytest.raises(AhmError, match="--pretrain-steps 2,4 with --pretrain-epochs"):
        run_curve(data, tmp_path / "o", ["random"], ["unet"], [1], 1, [2, 4], 1, pretrain_epochs=2,
                  overrides=_overrides(tmp_path))
    assert not (tmp_path / "o").exists()
    from ahm.cli.app import _register, app

    _register()
    res = CliRunner().invoke(app, ["bench", "curve", str(data), "--out", str(tmp_path / "o"),
                                   "--pretrain-steps", "3000,1000"])
    assert res.exit_code == 2 and "increasing" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_budget_trend_slope_per_tenfold_budget_and_where_the_gain_reaches_the_target() -> None:
    from ahm.bench.curve_stats import budget_trend

    rows = []
    for seed in range(3):
        rows.append({"backbone": "unet", "policy": "scratch", "corpus": "-", "labels": 1, "seed": seed,
                     "protocol": "frozen", "dice": 0.5 + 0.1 * seed, "val_dice": 0.5})
        for budget in (1000, 10000, 100000):
            # gain over scratch: 0.01 at 1000 steps, +0.01 per tenfold budget: reaches 0.03 at 100,000
            gain = 0.01 + 0.01 * math.log10(budget / 1000)
            rows.append({"backbone": "unet", "policy": "random", "corpus": "data", "labels": 1, "seed": seed,
                         "protocol": "frozen", "pretrain_budget": budget, "dice": 0.5 + 0.1 * seed + gain,
                         "val_dice": 0.5 + gain})
    (entry,) = budget_trend(rows)
    assert entry["budgets"] == [1000, 10000, 100000] and entry["n"] == 3 and entry["protocol"] == "frozen"
    assert entry["dice"] == pytest.approx(0.01) and entry["dice_ahead"] == 3
    assert entry["gain_at_largest"] == pytest.approx(0.03)
    assert entry["crosses_at"] == pytest.approx(100000, rel=1e-6)
    # a gain that falls by 0.01 per tenfold budget never reaches the target
    falling = [dict(r, dice=r["dice"] - 0.02 * math.log10(r["pretrain_budget"] / 1000)) if r.get("pretrain_budget")
               else r for r in rows]
    (entry,) = budget_trend(falling)
    assert entry["dice"] == pytest.approx(-0.01) and entry["crosses_at"] is None


def test_positive_control_is_chosen_on_validation_and_decided_on_test(tmp_path: Path) -> None:
    from ahm.bench.curve_render import write_results
    from ahm.bench.curve_stats import aggregate, control_verdict, paired_by_point, verdict_line

    def grid(seeds: int, test_gain: dict[int, float], val_gain: dict[int, float]) -> list[dict]:
        rows = []
        for seed in range(seeds):
            base = {"backbone": "vit", "corpus": "-", "labels": 1, "labelled_subjects": 1, "seed": seed,
                    "protocol": "frozen", "corpus_subjects": None}
            rows.append({**base, "policy": "scratch", "dice": 0.5 + 0.01 * seed, "val_dice": 0.5})
            for budget in test_gain:
                # a little seed-to-seed spread in the gain, so p is not degenerate
                rows.append({**base, "policy": "random", "corpus": "data", "corpus_subjects": 42,
                             "pretrain_budget": budget, "dice": 0.5 + 0.01 * seed + test_gain[budget] + 0.001 * seed,
                             "val_dice": 0.5 + val_gain[budget]})
        return rows

    # validation prefers 3,000 steps; test there is +0.05 on every seed: succeeds with p = 2/64
    rows = grid(6, {1000: 0.10, 3000: 0.05}, {1000: 0.01, 3000: 0.04})
    v = control_verdict(rows)
    assert v is not None and not v["provisional"] and v["succeeded"]
    assert v["point"]["pretrain_budget"] == 3000 and v["entry"]["dice_p"] == pytest.approx(2 / 64)
    # the same gain on validation's choice but too small on test: no success, whatever another budget did
    v = control_verdict(grid(6, {1000: 0.10, 3000: 0.02}, {1000: 0.01, 3000: 0.04}))
    assert v is not None and not v["succeeded"] and v["point"]["pretrain_budget"] == 3000
    # three seeds: the best point so far, no verdict
    few = grid(3, {1000: 0.10, 3000: 0.05}, {1000: 0.01, 3000: 0.04})
    v = control_verdict(few)
    assert v is not None and v["provisional"] and not v["succeeded"] and v["needs_seeds"] == 3
    assert v["point"]["pretrain_budget"] == 3000 and v["choice_seeds"] == [0, 1, 2]
    # three more seeds at 1,000 steps only, which validation loves there: the choice stays on the seeds every
    # point has (3,000 steps), which now needs its own three more seeds before there is a verdict
    extra = [r for r in grid(6, {1000: 0.10, 3000: 0.05}, {1000: 0.30, 3000: 0.04})
             if r["seed"] >= 3 and r.get("pretrain_budget") != 3000]
    v = control_verdict(few + extra)
    assert v["point"]["pretrain_budget"] == 3000 and v["choice_seeds"] == [0, 1, 2] and v["provisional"]
    line = verdict_line(v, "test")
    assert line.startswith("Positive control: no verdict yet") and "seeds 0, 1, 2, the seeds every point has" in line
    assert "needs 3 more paired seeds" in line
    # three more seeds where the choice fell (and scratch's): the verdict is decided there, on all six
    more = [r for r in grid(6, {1000: 0.10, 3000: 0.05}, {1000: 0.01, 3000: 0.04})
            if r["seed"] >= 3 and r.get("pretrain_budget") != 1000]
    v = control_verdict(few + more)
    assert v["point"]["pretrain_budget"] == 3000 and v["choice_seeds"] == [0, 1, 2]
    assert not v["provisional"] and v["succeeded"] and v["entry"]["dice_n"] == 6
    # a point without validation figures (NaN means) is never the one chosen on validation
    no_val = [dict(r, val_dice=None) if r.get("pretrain_budget") == 1000 else r for r in rows]
    paired = paired_by_point(no_val)
    assert any(e["policy"] == "random" and e["val_dice"] != e["val_dice"] for e in paired)  # NaN there
    v = control_verdict(no_val)
    assert v is not None and v["point"]["pretrain_budget"] == 3000 and v["entry"]["dice_n"] == 6
    # no scratch arm: nothing to decide
    assert control_verdict([r for r in rows if r["policy"] != "scratch"]) is None
    # results.md opens with the verdict
    write_results(tmp_path, rows, aggregate(rows), paired_by_point(rows), "test")
    first = (tmp_path / "results.md").read_text().splitlines()[0]
    assert first.startswith("Positive control succeeds") and "3000 pretraining steps" in first and "p 0.031" in first
