"""report.html: self-contained, with the sections a reader looks for, and never broken by a missing part."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ahm.eval.evaluate import score_arrays
from ahm.eval.report import write_report
from ahm.io import write_json


def _run_with_eval(root: Path, init: str = "none", policy: str | None = None) -> Path:
    root.mkdir(parents=True)
    write_json(root / "run.json", {"kind": "finetune", "version": "t", "seed": 0, "created": "now"})
    write_json(root / "summary.json", {"segmenter": "unet", "init": init, "init_policy": policy, "best_val_dice": 0.7,
                                       "best_epoch": 2, "epochs": 3, "num_classes": 3, "labels_fraction": 0.1})
    lines = [{"epoch": e, "step": s, "loss": 1.0 / s, "lr": 1e-3} for e, s in ((1, 1), (1, 2), (2, 3), (2, 4))]
    lines += [{"epoch": 1, "step": 2, "val_dice": 0.5}, {"epoch": 2, "step": 4, "val_dice": 0.7}]
    (root / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in lines) + "{torn")
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 16, 16), np.int64)
    labels[:, 4:10, 4:10] = 1
    labels[:, 11:14, 2:6] = 2
    preds = labels.copy()
    preds[:3, 4:6, :] = 0
    images = rng.random((6, 1, 16, 16)).astype(np.float32)
    score_arrays(root / "eval" / "test", preds, labels, images, [f"img{i}" for i in range(6)], None, 3, "test")
    return root


def test_report_is_self_contained_with_sections(tmp_path: Path) -> None:
    run = _run_with_eval(tmp_path / "run")
    path = write_report(run)
    html = path.read_text()
    assert path == run / "report.html"
    for heading in ("Learning curves", "Metrics: test split (6 images)", "Best and worst cases"):
        assert heading in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) >= 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in html and "<script" not in html
    # the metric table holds the per-class rows and the mean
    assert "<td>1</td>" in html and "<td>2</td>" in html and "<td>mean</td>" in html
    assert "AHM agent" not in html  # not pretrained with ahm


def test_agent_masks_section_when_encoder_came_from_ahm(tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    pre.mkdir()
    Image.fromarray(np.full((10, 10), 128, np.uint8)).save(pre / "reconstructions.png")
    run = _run_with_eval(tmp_path / "run", init=str(pre), policy="ahm")
    html = write_report(run).read_text()
    assert "Masks chosen by the AHM agent" in html
    # the pretraining run was deleted since: the report still builds, without that section
    (pre / "reconstructions.png").unlink()
    pre.rmdir()
    html = write_report(run).read_text()
    assert "AHM agent" not in html and "Best and worst cases" in html


def test_report_of_an_unfinished_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    html = write_report(run).read_text()
    assert "has not finished" in html and "No evaluation yet" in html
