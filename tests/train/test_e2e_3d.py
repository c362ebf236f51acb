"""A Decathlon-layout task of 3D volumes through the whole CLI: pretrain -> finetune -> evaluate -> predict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_volume_fixture  # noqa: E402

DATA = {"spatial_dims": 3, "spacing": [1.5, 1.5, 1.5], "crop_size": [16, 16, 16], "val_fraction": 0.2,
        "test_fraction": 0.2}
MODEL = {"backbone": "unet", "patch_size": 8, "unet_channels": [8, 16], "unet_strides": [2], "unet_num_res_units": 1}


@pytest.mark.parametrize("policy", ["random", "ahm"])
def test_msd_volumes_pretrain_finetune_evaluate_predict(tmp_path: Path, policy: str) -> None:
    from ahm.cli.app import _register, app

    _register()
    task = make_msd_volume_fixture(tmp_path / "data", cases=tuple(range(1, 9)))
    pre_yaml = tmp_path / "pre.yaml"
    pre_yaml.write_text(yaml.safe_dump({
        "data": DATA, "model": MODEL, "masking": {"agent_dim": 16, "agent_heads": 2},
        "train": {"batch_size": 2, "warmup_steps": 1, "log_every": 1, "workers": 0, "accelerator": "cpu"}}))
    ft_yaml = tmp_path / "ft.yaml"
    ft_yaml.write_text(yaml.safe_dump({
        "data": DATA, "model": MODEL, "val_every": 2,
        "train": {"batch_size": 2, "warmup_steps": 1, "log_every": 1, "workers": 0, "accelerator": "cpu"}}))
    runner = CliRunner()

    def ok(*args: str) -> str:
        res = runner.invoke(app, list(args))
        assert res.exit_code == 0, res.output
        return res.output

    ok("pretrain", str(task), "--out", str(tmp_path / "pre"), "--config", str(pre_yaml), "--policy", policy,
       "--steps", "3")
    meta = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert meta["steps"] == 3 and meta["policy"] == policy
    ok("finetune", str(task), "--out", str(tmp_path / "seg"), "--config", str(ft_yaml), "--init", str(tmp_path / "pre"),
       "--model", "unet", "--steps", "4")
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["spatial_dims"] == 3 and summary["encoder_loaded"]
    output = ok("evaluate", str(tmp_path / "seg"), "--split", "test")
    assert "mm" in output
    metrics = json.loads((tmp_path / "seg" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["hd95_unit"] == "mm"
    volume = sorted((task / "imagesTr").glob("*.nii.gz"))[0]
    ok("predict", str(tmp_path / "seg"), str(volume), "--out", str(tmp_path / "preds"))
    masks = list((tmp_path / "preds").rglob("*.nii.gz"))
    assert len(masks) == 1
    src, mask = nib.load(str(volume)), nib.load(str(masks[0]))
    assert mask.shape == src.shape
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
