"""`finetune --init RUN_A` on dataset B: channels, image size, patch grid and normalisation of A's pretraining must
agree with B's fine-tuning, and what differs is said in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_blob_folder, tiny_pretrain_overrides
from typer.testing import CliRunner

from ahm.config import FinetuneConfig, PretrainConfig, build_config, save_config
from ahm.errors import AhmError
from ahm.io import safetensors_metadata, save_safetensors, write_json
from ahm.train.finetune import finetune

UNET = {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0}
VIT = {"backbone": "vit", "preset": "custom", "patch_size": 16, "hidden_size": 16, "mlp_dim": 32, "num_layers": 12,
       "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data", n=16)


def _cfg(data: Path, **data_over) -> FinetuneConfig:
    return build_config(FinetuneConfig, overrides={
        "data": {"path": str(data), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25, **data_over},
        "model": UNET, "segmenter": "unet",
        "train": {"epochs": 1, "batch_size": 2, "warmup_steps": 1, "seed": 1, "accelerator": "cpu"},
    })


def _pretrain_run(root: Path, model: dict, image_size: int, channels: int, normalization: str | None) -> Path:
    """A pretraining run directory as `ahm pretrain` leaves it, from a real (untrained) MIM model's export."""
    from ahm.models import build_mim_model

    cfg = build_config(PretrainConfig, overrides={"data": {"image_size": image_size}, "model": model})
    mim = build_mim_model(cfg.model, image_size, channels)
    root.mkdir(parents=True)
    save_config(cfg, root / "config.yaml")
    write_json(root / "run.json", {"kind": "pretrain", "version": "test", "seed": 0, "created": "now"})
    meta = {**mim.encoder_metadata(), "policy": "random"}
    if normalization is not None:
        meta["normalization"] = normalization
    save_safetensors(root / "encoder.safetensors", mim.export_encoder(), metadata=meta)
    return root


def _message(cfg: FinetuneConfig, out: Path) -> str:
    with pytest.raises(AhmError) as info:
        finetune(cfg, out, progress=False)
    message = str(info.value)
    assert "\n" not in message and not out.exists()  # refused before the run directory is made
    return message


def test_every_difference_is_named_in_one_line(blobs: Path, tmp_path: Path) -> None:
    pre = _pretrain_run(tmp_path / "pre", UNET, image_size=48, channels=3, normalization="ct -1000..1000")
    message = _message(_cfg(blobs, **{}).model_copy(update={"init": str(pre)}), tmp_path / "run")
    assert message.startswith(f"--init {pre}: the pretraining does not match this fine-tuning: ")
    assert f"channels 3 pretrained vs 1 in {blobs}" in message
    assert "image size 48 pretrained vs 32 here" in message
    assert "normalisation ct -1000..1000 pretrained vs auto here (set data.modality and data.ct_window" in message
    assert "patch grid" not in message  # a UNet has no position embeddings: its grid does not transfer


def test_vit_names_its_patch_grid_and_agreeing_runs_pass(blobs: Path, tmp_path: Path) -> None:
    pre = _pretrain_run(tmp_path / "vit", VIT, image_size=64, channels=1, normalization="auto")
    cfg = _cfg(blobs).model_copy(update={"init": str(pre)})
    message = _message(cfg, tmp_path / "run")
    assert "image size 64 pretrained vs 32 here" in message and "patch grid 4x4 of 16 px pretrained vs 2x2 here" in message
    assert "channels" not in message and "normalisation" not in message
    ok = _pretrain_run(tmp_path / "unet", UNET, image_size=32, channels=1, normalization="auto")
    summary = finetune(_cfg(blobs).model_copy(update={"init": str(ok)}), tmp_path / "run_ok", progress=False)
    assert summary["encoder_loaded"]


def test_pretrain_records_its_normalisation_and_finetune_elsewhere_checks_it(blobs: Path, tmp_path: Path) -> None:
    from ahm.train.pretrain import pretrain

    overrides = tiny_pretrain_overrides(blobs, backbone="unet")
    overrides["data"]["modality"] = "ct"
    overrides["data"]["ct_window"] = [-200, 300]
    pre = tmp_path / "pre"
    pretrain(build_config(PretrainConfig, overrides=overrides), pre, progress=False)
    assert safetensors_metadata(pre / "encoder.safetensors")["normalization"] == "ct -200..300"
    model = {k: overrides["model"][k] for k in ("backbone", "unet_channels", "unet_strides", "unet_num_res_units")}
    base = _cfg(blobs).model_copy(update={"init": str(pre)})
    base.model = base.model.model_copy(update=model)
    message = _message(base, tmp_path / "run")
    assert message.endswith("normalisation ct -200..300 pretrained vs auto here (set data.modality and data.ct_window "
                            "in a --config)")
    matched = _cfg(blobs, modality="ct", ct_window=[-200, 300]).model_copy(update={"init": str(pre)})
    assert finetune(matched, tmp_path / "run_ok", progress=False)["encoder_loaded"]


def test_cli_prints_the_one_line(blobs: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    pre = _pretrain_run(tmp_path / "pre", UNET, image_size=32, channels=3, normalization="auto")
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", str(pre), "--steps", "2",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code != 0
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "channels 3 pretrained vs 1" in res.output and not (tmp_path / "run").exists()
