"""Fine-tuning on volumes (`data.spatial_dims: 3`): scratch and from a 3D pretraining, the 2D/3D refusal, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ahm.config import FinetuneConfig, PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.train.finetune import finetune
from ahm.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_volume_fixture  # noqa: E402
from train_helpers import ctrl_c_after, tiny_pretrain_overrides  # noqa: E402

UNET = {"backbone": "unet", "unet_channels": [8, 16], "unet_strides": [2], "unet_num_res_units": 1}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_msd_volume_fixture(tmp_path_factory.mktemp("vol"), cases=tuple(range(1, 7)))


def _volume_data(task: Path) -> dict:
    return {"path": str(task), "spatial_dims": 3, "spacing": [1.5, 1.5, 1.5], "crop_size": [16, 16, 16],
            "val_fraction": 0.2, "test_fraction": 0.2}


def _ft_cfg(task: Path, init: str | None = None, model: dict | None = None, **extra) -> FinetuneConfig:
    over = {"data": _volume_data(task), "model": dict(model or UNET), "segmenter": "unet", "init": init,
            "val_every": 2, "crop_fraction": 1.0,
            "train": {"batch_size": 2, "warmup_steps": 1, "log_every": 1,
                      "checkpoint_every": 1, "seed": 5, "accelerator": "cpu", "workers": 0}, **extra}
    return build_config(FinetuneConfig, overrides=over)


def _pretrain(task: Path, out: Path, spatial_dims: int) -> Path:
    over = tiny_pretrain_overrides(task, policy="random", backbone="unet", steps=2)
    over["train"].update(workers=0)
    if spatial_dims == 3:
        over["data"].update(spatial_dims=3, spacing=[1.5, 1.5, 1.5], crop_size=[16, 16, 16])
    pretrain(build_config(PretrainConfig, overrides=over), out, progress=False)
    return out


def _steps(cfg: FinetuneConfig, steps: int) -> FinetuneConfig:
    cfg.train.epochs, cfg.train.steps = None, steps  # the run counts steps (as `--steps` does)
    return cfg


def test_scratch_3d_unet_writes_the_contract_checkpoint_and_mm_scores(task: Path, tmp_path: Path) -> None:
    from ahm.io import load_torch

    cfg = _steps(_ft_cfg(task), 4)
    summary = finetune(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 4 and summary["spatial_dims"] == 3 and summary["roi_size"] == [16, 16, 16]
    assert summary["val"]["hd95_unit"] == "mm" and summary["val"]["level"] == "volume"
    assert 0.0 <= summary["best_val_dice"] <= 1.0 and summary["val"]["dice"] is not None
    best = load_torch(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert best["meta"]["spatial_dims"] == 3 and best["meta"]["roi_size"] == [16, 16, 16]
    assert best["meta"]["image_size"] == 16 and best["meta"]["segmenter"] == "unet"
    # the weights are a 3D network: its first convolution has a 3D kernel
    assert any(w.dim() == 5 for w in best["model"].values())
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val"]["hd95_unit"] == "mm"
    metrics = json.loads((tmp_path / "run" / "eval" / "val" / "metrics.json").read_text())
    assert metrics["n_cases"] == summary["val_images"] and metrics["case"] == "volume"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_dice" in r for r in rows) == 2  # val_every 2 over 4 steps
    assert (tmp_path / "run" / "report.html").is_file()


def test_3d_finetune_loads_a_3d_pretrained_encoder(task: Path, tmp_path: Path) -> None:
    run = _pretrain(task, tmp_path / "pre3d", spatial_dims=3)
    summary = finetune(_steps(_ft_cfg(task, init=str(run)), 2), tmp_path / "ft", progress=False)
    # every UNet weight but the new last layer comes from the encoder
    assert summary["encoder_loaded"]["loaded"] > 0 and summary["init"] == str(run)
    # and the reverse: a 3D encoder is refused by a 2D fine-tuning, in one line, before its run directory
    cfg2d = _steps(_ft_cfg(task, init=str(run)), 2)
    cfg2d.data.spatial_dims = 2
    with pytest.raises(AhmError, match=r"pretrained in 3D .* this fine-tuning is 2D"):
        finetune(cfg2d, tmp_path / "ft2d", progress=False)
    assert not (tmp_path / "ft2d").exists()


def test_a_2d_encoder_is_refused_by_a_3d_finetune_before_any_run_directory(task: Path, tmp_path: Path) -> None:
    run = _pretrain(task, tmp_path / "pre2d", spatial_dims=2)
    with pytest.raises(AhmError, match=r"pretrained in 2D .* this fine-tuning is 3D") as err:
        finetune(_steps(_ft_cfg(task, init=str(run)), 2), tmp_path / "ft", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ft").exists()


def test_3d_crop_must_suit_the_segmenter_before_any_run_directory(task: Path, tmp_path: Path) -> None:
    cfg = _steps(_ft_cfg(task, model={**UNET, "unet_strides": [2, 2], "unet_channels": [8, 16, 32]}), 2)
    cfg.data.crop_size = (16, 16, 10)
    with pytest.raises(AhmError, match="data.crop_size 16x16x10"):
        finetune(cfg, tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()


def test_3d_resume_after_interrupt_equals_the_uninterrupted_run(task: Path, tmp_path: Path, monkeypatch) -> None:

    import ahm.train.engine as engine
    from ahm.io import load_torch
    from ahm.train.loop import Interrupted

    cfg = _steps(_ft_cfg(task), 4)
    finetune(cfg, tmp_path / "straight", progress=False)

    fake_sigint = ctrl_c_after(3)  # a Ctrl-C after the 3rd step
    monkeypatch.setattr(engine, "stop_on_sigint", fake_sigint)
    with pytest.raises(Interrupted, match="--resume"):
        finetune(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert load_torch(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state"]["step"] == 3
    finetune(cfg, tmp_path / "resumed", resume=True, progress=False)
    for name in ("last.ckpt", "best.ckpt"):
        wa = load_torch(tmp_path / "straight" / "checkpoints" / name)["model"]
        wb = load_torch(tmp_path / "resumed" / "checkpoints" / name)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]

    assert rows("straight") == rows("resumed")


def test_3d_loader_workers_change_nothing_and_a_resume_with_them_is_exact(task: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Without workers, uninterrupted; with 2 (the cached volumes shared with them), interrupted after step 3 and
    resumed: the same weights."""

    import ahm.train.engine as engine
    from ahm.io import load_torch
    from ahm.train.loop import Interrupted

    finetune(_steps(_ft_cfg(task), 4), tmp_path / "straight", progress=False)
    cfg = _steps(_ft_cfg(task), 4)
    cfg.train.workers = 2

    fake_sigint = ctrl_c_after(3)  # a Ctrl-C after the 3rd step
    with monkeypatch.context() as m:
        m.setattr(engine, "stop_on_sigint", fake_sigint)
        with pytest.raises(Interrupted):
            finetune(cfg, tmp_path / "resumed", progress=False)
    finetune(cfg, tmp_path / "resumed", resume=True, progress=False)
    wa = load_torch(tmp_path / "straight" / "checkpoints" / "last.ckpt")["model"]
    wb = load_torch(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_spatial_dims_and_overlap_options(task: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ahm.cli.app import _register, app

    _register()
    res = CliRunner().invoke(app, ["finetune", str(task), "--init", "none", "--out", str(tmp_path / "run"),
                                   "--spatial-dims", "3", "--overlap", "1.5"])
    assert res.exit_code != 0 and "overlap" in res.output
    assert not (tmp_path / "run").exists()


def test_3d_unetr_loads_a_3d_vit_encoder_and_refuses_another_crop(task: Path, tmp_path: Path) -> None:
    # MONAI's UNETR fixes 16-voxel patches and 12 blocks; a 32^3 crop gives a 2x2x2 patch grid
    vit = {"backbone": "vit", "preset": "custom", "patch_size": 16, "hidden_size": 32, "mlp_dim": 64,
           "num_layers": 12, "num_heads": 2, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
    over = tiny_pretrain_overrides(task, policy="random", backbone="vit", steps=2)
    over["model"].update(vit)
    over["train"].update(workers=0)
    over["data"].update(spatial_dims=3, spacing=[1.5, 1.5, 1.5], crop_size=[32, 32, 32])
    pretrain(build_config(PretrainConfig, overrides=over), tmp_path / "pre", progress=False)

    cfg = _steps(_ft_cfg(task, init=str(tmp_path / "pre"), model=vit, segmenter="unetr"), 1)
    cfg.data.crop_size = (32, 32, 16)
    with pytest.raises(AhmError, match="patch grid 2x2x2 .* pretrained vs 2x2x1 here"):
        finetune(cfg, tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()

    cfg.data.crop_size = (32, 32, 32)
    summary = finetune(cfg, tmp_path / "ft", progress=False)
    assert summary["segmenter"] == "unetr" and summary["roi_size"] == [32, 32, 32]
    assert summary["encoder_loaded"] == {"loaded": 161, "skipped": []}
    assert summary["val"]["hd95_unit"] == "mm"


def test_cli_finetune_takes_the_pretraining_runs_volume_settings_unless_told(task: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from ahm.cli.app import _register, app

    over = tiny_pretrain_overrides(task, policy="random", backbone="unet", steps=2)
    over["train"].update(workers=0)
    over["data"].update(spatial_dims=3, spacing=[2.0, 2.0, 2.0], orientation="LPS", crop_size=[16, 16, 16],
                        val_fraction=0.2, test_fraction=0.2)
    run = tmp_path / "pre"
    pretrain(build_config(PretrainConfig, overrides=over), run, progress=False)
    _register()
    common = ["--labels-subjects", "1", "--steps", "1", "--val-every", "1", "--batch-size", "1",
              "--accelerator", "cpu"]
    res = CliRunner().invoke(app, ["finetune", str(task), "--init", str(run), "--out", str(tmp_path / "ft"), *common])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["data"]
    # no --spatial-dims, no spacing given: the encoder's dimension, spacing, orientation and crop
    assert (data["spatial_dims"], data["spacing"], data["orientation"], data["crop_size"]) == (
        3, [2.0, 2.0, 2.0], "LPS", [16, 16, 16])
    # what the --config's data: says wins over the pretraining run; the rest is still inherited
    # what the --config says (flat, or in its finetune: section like configs/3d-cpu.yaml) wins over the
    # pretraining run; the rest is still inherited
    for name, text in (("flat", "data: {spacing: [1.5, 1.5, 1.5], crop_size: [32, 32, 32]}\n"),
                       ("sections", "pretrain: {data: {crop_size: [16, 16, 16]}}\n"
                                    "finetune: {data: {spacing: [1.5, 1.5, 1.5], crop_size: [32, 32, 32]}}\n")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text)
        res = CliRunner().invoke(app, ["finetune", str(task), "--init", str(run), "--out", str(tmp_path / name),
                                       "--config", str(cfg), *common])
        assert res.exit_code == 0, res.output
        data = yaml.safe_load((tmp_path / name / "config.yaml").read_text())["data"]
        assert (data["spatial_dims"], data["spacing"], data["orientation"], data["crop_size"]) == (
            3, [1.5, 1.5, 1.5], "LPS", [32, 32, 32]), name
    # a pretraining that kept each volume's own spacing (spacing: null) is fine-tuned the same way
    over["data"].update(spacing=None)
    pretrain(build_config(PretrainConfig, overrides=over, nulls=True), tmp_path / "pre-own", progress=False)
    res = CliRunner().invoke(app, ["finetune", str(task), "--init", str(tmp_path / "pre-own"),
                                   "--out", str(tmp_path / "ft-own"), *common])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "ft-own" / "config.yaml").read_text())["data"]["spacing"] is None
    # a --config whose data: is not a mapping is still one line
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: 5\n")
    res = CliRunner().invoke(app, ["finetune", str(task), "--init", str(run), "--out", str(tmp_path / "ft-bad"),
                                   "--config", str(bad), *common])
    assert res.exit_code == 2 and "Traceback" not in res.output and "data" in res.output
