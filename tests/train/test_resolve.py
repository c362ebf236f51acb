"""`resolve_finetune_config`: the config `ahm finetune` runs, available to Python callers of the library."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ahm.config import PretrainConfig, build_config, save_config
from ahm.errors import AhmError
from ahm.io import save_safetensors, write_json
from ahm.train.resolve import resolve_finetune_config

UNET = {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0}


def _pretrain_run(root: Path, image_size: int = 48) -> Path:
    from ahm.models import build_mim_model

    cfg = build_config(PretrainConfig, overrides={"data": {"image_size": image_size}, "model": UNET})
    mim = build_mim_model(cfg.model, image_size, 1)
    root.mkdir(parents=True)
    save_config(cfg, root / "config.yaml")
    write_json(root / "run.json", {"kind": "pretrain", "version": "test", "seed": 0, "created": "now"})
    save_safetensors(root / "encoder.safetensors", mim.export_encoder(), metadata=mim.encoder_metadata())
    return root


def test_the_pretraining_run_decides_what_nothing_else_sets(tmp_path: Path) -> None:
    pre = _pretrain_run(tmp_path / "pre")
    cfg = resolve_finetune_config({"data": {"path": "x", "image_size": None}}, pre)
    assert cfg.data.image_size == 48 and cfg.init == str(pre)
    # an option, or the file, wins over the pretraining run
    assert resolve_finetune_config({"data": {"image_size": 32}}, pre).data.image_size == 32
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"data": {"image_size": 64}}))
    assert resolve_finetune_config({}, pre, file=tmp_path / "ft.yaml").data.image_size == 64
    with pytest.raises(AhmError, match="--segmenter unetr does not match"):
        resolve_finetune_config({"segmenter": "unetr"}, pre)


def test_init_comes_from_the_file_or_is_required(tmp_path: Path) -> None:
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"init": "none"}))
    assert resolve_finetune_config({}, file=tmp_path / "ft.yaml").init == "none"  # finetune() reads it as scratch
    with pytest.raises(AhmError, match="--init: give a pretraining run directory"):
        resolve_finetune_config({})
    resumed = resolve_finetune_config({"train": {"steps": None, "epochs": None}}, resume=True)
    assert resumed.train.epochs is None  # a resume keeps the run's own length
    assert resolve_finetune_config({"train": {"steps": 5}}, "none").train.epochs is None
