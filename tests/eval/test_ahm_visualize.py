"""`ahm visualize`: panels of what the masking agent does, and the diagnostics over training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahm.config import PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.eval.visualize import visualize_run
from ahm.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_blob_folder, tiny_pretrain_overrides

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ahm_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vis")
    data = make_blob_folder(root / "data")
    cfg = build_config(PretrainConfig, overrides=tiny_pretrain_overrides(data, policy="ahm", steps=3))
    pretrain(cfg, root / "run", progress=False)
    return root / "run", data


def test_visualize_writes_panels_and_diagnostics(ahm_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = ahm_run
    written = visualize_run(run, data, tmp_path / "vis", n_images=2)
    names = [p.name for p in written]
    assert "diagnostics.png" in names and len(names) == 3
    for path in written:
        assert path.read_bytes()[:8] == PNG


def test_visualize_cli_and_errors(ahm_run: tuple[Path, Path], tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    run, _ = ahm_run
    _register()
    result = CliRunner().invoke(app, ["visualize", str(run), "--out", str(tmp_path / "v"), "--n-images", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v" / "diagnostics.png").is_file()
    with pytest.raises(AhmError, match="no config.yaml"):
        visualize_run(tmp_path, None, tmp_path / "x")
    bad = CliRunner().invoke(app, ["visualize", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "no config.yaml" in bad.output
