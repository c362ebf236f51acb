"""configs/3d-cpu.yaml and configs/3d-gpu.yaml: both sections load, the crops suit both backbones, and the CPU
preset's models take its crop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ahm.config import FinetuneConfig, PretrainConfig, build_config, load_config
from ahm.data.volumes import check_crop
from ahm.models import build_mim_model, build_segmenter
from ahm.models.backbones import get_backbone
from ahm.pipeline import model_input_size

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,crop,hidden,precision", [("3d-cpu.yaml", 64, 192, "32-true"),
                                                        ("3d-gpu.yaml", 128, 768, "bf16-mixed")])
def test_3d_preset_loads(name: str, crop: int, hidden: int, precision: str) -> None:
    path = CONFIGS / name
    pre, ft = build_config(PretrainConfig, file=path), build_config(FinetuneConfig, file=path)
    for cfg in (pre, ft):
        assert cfg.data.spatial_dims == 3 and cfg.data.crop_size == (crop,) * 3
        assert cfg.data.spacing == (1.5, 1.5, 1.5) and cfg.model.patch_size == 16
        assert cfg.model.vit_dims()["hidden_size"] == hidden and cfg.train.precision == precision
        for backbone in ("vit", "unet"):
            model = cfg.model.model_copy(update={"backbone": backbone})
            check_crop(cfg.data, math.lcm(model.patch_size, get_backbone(backbone).crop_multiple(model)))
    # the bench's MONAI 3D MAE reference can be built at these sizes (sin-cos widths divisible by 6)
    assert pre.model.vit_dims()["hidden_size"] % 6 == 0 and pre.model.decoder_dims()["decoder_dim"] % 6 == 0
    assert (crop // 16) ** 3 == {64: 64, 128: 512}[crop]


def test_3d_cpu_preset_models_take_the_crop() -> None:
    path = CONFIGS / "3d-cpu.yaml"
    pre, ft = build_config(PretrainConfig, file=path), build_config(FinetuneConfig, file=path)
    x = torch.rand(1, 1, *pre.data.crop_size)
    with torch.no_grad():
        for backbone in ("vit", "unet"):
            model_cfg = pre.model.model_copy(update={"backbone": backbone})
            mim = build_mim_model(model_cfg, model_input_size(pre.data), 1, spatial_dims=3).eval()
            assert mim.patch_grid.num_patches == 64
            mask = torch.zeros(1, 64, dtype=torch.bool)
            mask[:, :48] = True
            assert mim(x, mask).prediction.shape == x.shape
        # a cube: its side is the segmenter's input size
        seg = build_segmenter(ft.segmenter, ft.model, ft.data.crop_size[0], 1, 2, spatial_dims=3).eval()
        assert seg(x).shape == (1, 2, *ft.data.crop_size)


def test_pretrain_help_with_a_3d_preset() -> None:
    from ahm.cli.app import _register, app

    _register()
    for name in ("3d-cpu.yaml", "3d-gpu.yaml"):
        res = CliRunner().invoke(app, ["pretrain", "--config", str(CONFIGS / name), "--help"])
        assert res.exit_code == 0 and "--spatial-dims" in res.output


def test_gpu_presets_keep_the_agent_on_the_device_and_asynchronous_workers_are_refused_there() -> None:
    from types import SimpleNamespace

    from ahm.errors import AhmError
    from ahm.train.pretrain import check_agent_workers

    for name in ("paper-like.yaml", "3d-gpu.yaml"):
        cfg = load_config(PretrainConfig, CONFIGS / name)
        assert cfg.train.accelerator == "cuda" and cfg.masking.agent_workers == 0
        check_agent_workers(cfg, SimpleNamespace(device=torch.device("cuda"), world_size=4))
    cfg.masking.agent_workers = 4
    with pytest.raises(AhmError, match="masking.agent_workers 4: asynchronous agent workers run the agent on the CPU"):
        check_agent_workers(cfg, SimpleNamespace(device=torch.device("cuda"), world_size=1))
    with pytest.raises(AhmError, match="cannot be combined with 2 processes"):
        check_agent_workers(cfg, SimpleNamespace(device=torch.device("cpu"), world_size=2))
    check_agent_workers(cfg, SimpleNamespace(device=torch.device("cpu"), world_size=1))  # where they help
