"""`ahm demo`: the main job end to end (the real presets' recipe, shrunk to a few steps on a small grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ahm import demo
from ahm.errors import AhmError


def test_presets_are_the_documented_recipe(tmp_path: Path) -> None:
    pre, ft = demo.demo_configs(True, tmp_path)
    assert pre.masking.policy == "ahm" and pre.model.backbone == "unet" and ft.segmenter == "unet"
    assert ft.labels_fraction == 0.1 and ft.train.epochs is None and ft.train.steps
    assert pre.data.path == ft.data.path == str(tmp_path)
    long_pre, long_ft = demo.demo_configs(False, tmp_path)
    assert long_pre.train.steps > pre.train.steps and long_ft.train.steps > ft.train.steps


def test_demo_end_to_end_then_reuses_its_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ahm.datasets

    real_prepare, real_configs = ahm.datasets.prepare_brain_demo, demo.demo_configs

    def small_set(out, **kw):
        return real_prepare(out, image_size=32)

    def few_steps(quick, data):
        pre, ft = real_configs(quick, data)
        pre.data.image_size = ft.data.image_size = 32
        pre.train.steps, ft.train.steps = 4, 4
        pre.train.batch_size, pre.train.warmup_steps, ft.train.warmup_steps = 8, 1, 1
        pre.train.checkpoint_every = 2
        return pre, ft

    monkeypatch.setattr(ahm.datasets, "prepare_brain_demo", small_set)
    monkeypatch.setattr(demo, "demo_configs", few_steps)
    said: list[str] = []
    out = tmp_path / "demo"
    result = demo.run_demo(out, quick=True, progress=False, say=said.append)
    assert 0.0 <= result["dice"] <= 1.0 and result["peak_rss_mib"] > 0
    assert (out / "finetune" / "report.html").is_file() and (out / "finetune" / "eval" / "test" / "metrics.json").is_file()
    assert json.loads((out / "demo.json").read_text())["dice"] == result["dice"]
    assert [line[:3] for line in said] == ["1/4", "2/4", "3/4", "4/4"]
    assert result["finetune"]["init"] == str(out / "pretrain") and result["finetune"]["labelled_subjects"] >= 1

    # Run again: the finished pretraining and fine-tuning are reused, the data is not rebuilt.
    def boom(*a, **k):
        raise AssertionError("a finished step was run again")

    monkeypatch.setattr("ahm.train.pretrain.pretrain", boom)
    monkeypatch.setattr("ahm.train.finetune.finetune", boom)
    monkeypatch.setattr(ahm.datasets, "prepare_brain_demo", boom)
    again = demo.run_demo(out, quick=True, progress=False)
    assert again["dice"] == result["dice"]


def test_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(AhmError, match="not empty"):
        demo.run_demo(tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
