"""`ahm visualize` on a 3D pretraining run: the model is rebuilt on the training crop and fed centre crops."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ahm.config import PretrainConfig, build_config
from ahm.eval.visualize import load_run, visualize_run
from ahm.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from fixtures import make_msd_volume_fixture  # noqa: E402
from train_helpers import tiny_pretrain_overrides  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_msd_volume_fixture(tmp_path_factory.mktemp("vol"), cases=tuple(range(1, 9)))


@pytest.mark.parametrize("backbone,policy", [("vit", "ahm"), ("unet", "random")])
def test_visualize_a_3d_run(task: Path, tmp_path: Path, backbone: str, policy: str) -> None:
    over = tiny_pretrain_overrides(task, policy=policy, backbone=backbone, steps=3)
    over["data"].update(spatial_dims=3, spacing=[1.5, 1.5, 1.5], crop_size=[16, 16, 16])
    over["train"].update(workers=0)
    pretrain(build_config(PretrainConfig, overrides=over), tmp_path / "run", progress=False)

    cfg, model, policy_, arrays = load_run(tmp_path / "run", None, 2)
    policy_.close()
    assert model.patch_grid.spatial_dims == 3 and tuple(model.patch_grid.spatial_shape) == (16, 16, 16)
    assert arrays.images.shape == (2, 1, 16, 16, 16)  # centre crops of two held-out volumes
    written = visualize_run(tmp_path / "run", None, tmp_path / "vis", n_images=2)
    assert sorted(p.name for p in written) == sorted([f"{i}.png" for i in arrays.ids] + ["diagnostics.png"])
    for path in written:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
