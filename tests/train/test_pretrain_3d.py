"""Pretraining on volumes (`data.spatial_dims: 3`): every backbone with a fixed and a learned policy, 3D crops."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahm.config import PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.io import load_safetensors, safetensors_metadata
from ahm.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_volume_fixture  # noqa: E402
from train_helpers import tiny_pretrain_overrides  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_msd_volume_fixture(tmp_path_factory.mktemp("vol"), cases=tuple(range(1, 9)))


def _cfg(task: Path, backbone: str, policy: str, steps: int = 3) -> PretrainConfig:
    over = tiny_pretrain_overrides(task, policy=policy, backbone=backbone, steps=steps)
    over["data"].update(spatial_dims=3, spacing=[1.5, 1.5, 1.5], crop_size=[16, 16, 16])
    over["train"].update(workers=0)
    return build_config(PretrainConfig, overrides=over)


@pytest.mark.parametrize("backbone,policy", [("vit", "random"), ("vit", "ahm"), ("unet", "random"),
                                             ("unet", "ahm-official")])
def test_3d_pretraining_writes_a_3d_encoder(task: Path, tmp_path: Path, backbone: str, policy: str) -> None:
    cfg = _cfg(task, backbone, policy, steps=6 if policy == "ahm-official" else 3)
    summary = pretrain(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == cfg.train.steps and summary["final_loss"] > 0
    weights = load_safetensors(tmp_path / "run" / "encoder.safetensors")
    meta = safetensors_metadata(tmp_path / "run" / "encoder.safetensors")
    assert meta["spatial_dims"] == "3" and weights
    assert (tmp_path / "run" / "reconstructions.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.train.steps


def test_3d_crop_must_hold_whole_patches(task: Path, tmp_path: Path) -> None:
    cfg = _cfg(task, "vit", "random")
    cfg.data.crop_size = (16, 16, 12)
    with pytest.raises(AhmError, match="data.crop_size 16x16x12"):
        pretrain(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_spatial_dims_option(task: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    res = CliRunner().invoke(app, ["pretrain", str(task), "--out", str(tmp_path / "run"), "--spatial-dims", "4"])
    assert res.exit_code != 0 and "spatial_dims" in res.output
    assert not (tmp_path / "run").exists()
