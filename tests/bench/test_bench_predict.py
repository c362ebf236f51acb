"""`ahm bench predict`: times the real predict() on synthetic slices of the run's grid, refuses bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from eval_helpers import make_run  # noqa: E402

from ahm.errors import AhmError  # noqa: E402


@pytest.fixture(scope="module")
def run1(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "gray", num_classes=3, image_size=32)


def test_document_counts_every_slice_each_round(run1: Path) -> None:
    from ahm.bench.predict_speed import format_predict_bench, run_predict_bench

    doc = run_predict_bench(run1, n=5, rounds=2, batch_size=2)
    assert doc["image_size"] == 32 and doc["num_classes"] == 3 and len(doc["rounds"]) == 2
    for r in doc["rounds"]:
        assert r["slices"] == 5 and r["slices_per_s"] > 0
        # The model is only a part of each round, so it alone is at least as fast as the whole.
        assert r["model_slices_per_s"] >= r["slices_per_s"]
    assert min(r["slices_per_s"] for r in doc["rounds"]) <= doc["slices_per_s"] <= max(
        r["slices_per_s"] for r in doc["rounds"])
    text = format_predict_bench(doc)
    assert "5 synthetic 32x32 PNG slices" in text and "slices/s" in text


def test_bad_run_and_options_are_one_line(tmp_path: Path, run1: Path) -> None:
    from ahm.bench.predict_speed import run_predict_bench
    from ahm.cli.app import _register, app

    with pytest.raises(AhmError, match="--n 0"):
        run_predict_bench(run1, n=0)
    _register()
    res = CliRunner().invoke(app, ["bench", "predict", str(tmp_path)])
    assert res.exit_code == 2 and "not a fine-tuning run directory" in res.output
    res = CliRunner().invoke(app, ["bench", "predict", str(run1), "--n", "3", "--rounds", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["rounds"][0]["slices"] == 3
