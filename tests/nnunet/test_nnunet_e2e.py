"""From an nnU-Net raw dataset to nnU-Net's own fine-tuning of an ahm-pretrained network, on the CPU: 2D PNG
slices (configuration 2d) and NIfTI volumes (3d_fullres, where ahm's axis order is not nnU-Net's); and ahm's own
fine-tuning of nnU-Net's network from scratch (`--segmenter nnunet`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.nnunet.e2e import assert_loaded_and_trained, finetune_in_nnunet, plan_and_preprocess
from tests.nnunet.make_raw import make_raw_2d, make_raw_3d

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                       reason="nnU-Net v2 is not installed (pip install 'ahm[nnunet]')"),
]


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(nnU-Net's folders, the 2D raw dataset, its plans for configuration 2d), planned once for the module."""
    root = tmp_path_factory.mktemp("nnunet")
    raw = make_raw_2d(root / "raw", 501)
    return root, raw, plan_and_preprocess(root, raw, 501, "2d")


def _ahm(*args: str) -> str:
    """`ahm ARGS` in this process; its output (exit code 0 asserted)."""
    from ahm.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _pretrain(raw: Path, out: Path, policy: str, plans: Path, configuration: str, *extra: str, steps: int = 2) -> str:
    """A short ahm pretraining run on the nnunet backbone; returns its config.yaml."""
    from ahm.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, [
        "-q", "pretrain", str(raw), "--out", str(out), "--policy", policy, "--backbone", "nnunet",
        "--plans", str(plans), "--configuration", configuration, "--steps", str(steps), *extra,
        "--accelerator", "cpu", "--workers", "0", "--agent-workers", "0"])
    assert result.exit_code == 0, result.output
    return (out / "config.yaml").read_text()


def _network_input_shape(run: Path) -> tuple[int, ...]:
    """The shape nnU-Net's network receives inside run `run`'s model, fed one crop of ahm's."""
    import torch

    from ahm.config import PretrainConfig, load_config
    from ahm.models.backbones import build_mim_model
    from ahm.pipeline import model_input_size

    cfg = load_config(PretrainConfig, run / "config.yaml")
    model = build_mim_model(cfg.model, model_input_size(cfg.data), 1, spatial_dims=3)
    seen: list[tuple[int, ...]] = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.features(torch.zeros(1, 1, *cfg.data.crop_size))
    return seen[0]


def test_pretrain_export_and_finetune_in_nnunet(discs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from ahm.export import export_run

    root, raw, plans = discs
    runs = {}
    # every masking policy drives nnU-Net's network (the published pipeline needs a step for each of its stages)
    for policy in ("random", "block", "hpm", "adamae", "ahm", "ahm-official"):
        runs[policy] = tmp_path / f"run_{policy}"
        config = _pretrain(raw, runs[policy], policy, plans, "2d", "--batch-size", "4",
                           steps=5 if policy == "ahm-official" else 2)
        assert "image_size: 64" in config  # the plans' 2D patch size

    weights = tmp_path / "ahm_random.pth"
    export_run(runs["random"], "nnunet", weights, plans=plans, configuration="2d")
    assert "configuration: 2d" in (tmp_path / "ahm_random.pth.txt").read_text()
    assert_loaded_and_trained(finetune_in_nnunet(root, plans, "2d", weights))


def test_nnunet_segmenter_fine_tunes_from_scratch_then_evaluates_and_predicts(discs: tuple[Path, Path, Path],
                                                                              tmp_path: Path) -> None:
    import json

    import numpy as np
    import yaml
    from PIL import Image

    from ahm.errors import AhmError
    from ahm.train.finetune import finetune
    from ahm.train.resolve import resolve_finetune_config

    _, raw, plans = discs
    run = tmp_path / "seg"
    scratch = ["finetune", str(raw), "--init", "none", "--segmenter", "nnunet", "--out", str(run)]
    cheap = ["--steps", "1", "--batch-size", "2", "--accelerator", "cpu", "--workers", "0"]
    # without the plans there is no network: refused before the run directory is made
    with pytest.raises(AhmError, match=r"the nnunet backbone needs model.plans and model.configuration"):
        finetune(resolve_finetune_config({"data": {"path": str(raw)}, "segmenter": "nnunet"}, "none"), run,
                 progress=False)
    assert not run.exists()

    _ahm("-q", *scratch, "--plans", str(plans), "--configuration", "2d", *cheap)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["segmenter"] == "nnunet" and cfg["init"] is None
    assert cfg["data"]["image_size"] == 64  # the plans' 2D patch size
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"] == "none" and summary["segmenter"] == "nnunet" and summary["steps"] == 1

    metrics = json.loads(_ahm("evaluate", str(run), "--split", "all", "--json"))
    assert metrics["n_images"] == 8 and 0.0 <= metrics["per_class"]["disc"]["dice"] <= 1.0
    image = raw / "imagesTr" / "case000_0000.png"
    _ahm("predict", str(run), str(image), "--out", str(tmp_path / "masks"))
    mask = np.asarray(Image.open(tmp_path / "masks" / "case000_0000_mask.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}


def test_3d_fullres_pretrain_export_and_finetune_in_nnunet(tmp_path: Path) -> None:
    import yaml

    from ahm.export import export_run

    # stored (x, y, z) 32x32x24 at (1, 1, 2) mm: nnU-Net sees (z, y, x), so its patch is 24x32x32 at (2, 1, 1) mm
    # five cases: nnU-Net splits them 5-fold
    raw = make_raw_3d(tmp_path / "raw", 502, cases=5, shape=(32, 32, 24), spacing=(1.0, 1.0, 2.0))
    plans = plan_and_preprocess(tmp_path, raw, 502, "3d_fullres")
    run = tmp_path / "run_random"
    # patch 8 divides every axis of the plans' patch; the default 16 does not divide 24
    data = yaml.safe_load(_pretrain(raw, run, "random", plans, "3d_fullres", "--batch-size", "2",
                                    "--patch-size", "8"))["data"]
    assert data["spatial_dims"] == 3
    assert list(data["crop_size"]) == [32, 32, 24] and list(data["spacing"]) == [1.0, 1.0, 2.0]  # in ahm's order
    # unpermuted crops would run too (every axis is divisible), with the (1, 3, 3) kernels along x instead of z
    assert _network_input_shape(run) == (1, 1, 24, 32, 32)

    weights = tmp_path / "ahm_3d.pth"
    export_run(run, "nnunet", weights, plans=plans, configuration="3d_fullres")
    assert "configuration: 3d_fullres" in (tmp_path / "ahm_3d.pth.txt").read_text()
    assert_loaded_and_trained(finetune_in_nnunet(tmp_path, plans, "3d_fullres", weights))
