"""`ahm visualize` panels of a volume: the orthogonal slices through its centre of image, mask, loss, reconstruction;
and on a 3D pretraining run, the model rebuilt on the training crop and fed centre crops."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ahm.config import PretrainConfig, build_config
from ahm.eval.visualize import _save_figure, load_run, sample_figure, visualize_run
from ahm.models.mae import MAEViT
from ahm.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from fixtures import make_msd_volume_fixture  # noqa: E402
from train_helpers import tiny_pretrain_overrides  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_volume_is_drawn_as_three_orthogonal_centre_slices(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MAEViT(image_size=16, in_channels=1, patch_size=8, hidden_size=24, mlp_dim=32, num_layers=1, num_heads=2,
                   decoder_dim=16, decoder_depth=1, decoder_heads=2, spatial_dims=3)
    grid = model.patch_grid  # 2 x 2 x 2 cuboids of 8^3
    volume = torch.rand(1, 1, 16, 16, 16)
    mask = torch.tensor([[True, False, False, True, True, False, True, False]])
    hard = torch.tensor([[False, False, False, True, False, False, False, False]])
    with torch.no_grad():
        out = model(volume, mask)
    probs = np.linspace(0, 1, 8, dtype=np.float32)
    fig = sample_figure("vol", grid, volume[0].numpy(), mask[0].numpy(), hard[0].numpy(),
                        out.per_patch_loss[0].numpy(), out.prediction[0].numpy(), (probs, probs[::-1].copy()))
    rows = np.asarray(fig.axes).reshape(3, -1)
    assert rows.shape[1] == 6  # image, actor probability, critic, mask, true loss, reconstruction
    assert [ax.get_title() for ax in rows[:, 0]] == ["image (axis 0 = 8)", "image (axis 1 = 8)", "image (axis 2 = 8)"]
    # the mask panel of each slice is tinted exactly on the cuboids the slice cuts that are masked
    coords = grid.coordinates().tolist()
    for axis, row in enumerate(rows):
        overlay = row[3].get_images()[0].get_array()
        grey = volume[0, 0].numpy().take(8, axis=axis)
        tinted = ~np.isclose(overlay, np.clip(grey, 0, 1)[..., None]).all(-1)
        expected = np.zeros((16, 16), dtype=bool)
        for index, c in enumerate(coords):
            if mask[0, index] and c[axis] == 1:  # slice 8 lies in the second cuboid along `axis`
                a, b = [c[k] for k in range(3) if k != axis]
                expected[a * 8:a * 8 + 8, b * 8:b * 8 + 8] = True
        assert np.array_equal(tinted, expected), axis
        # the reconstruction panel shows the visible voxels unchanged
        recon = row[5].get_images()[0].get_array()
        assert np.allclose(np.asarray(recon)[~expected], np.clip(grey, 0, 1)[~expected])
    path = _save_figure(fig, tmp_path / "vol.png")
    assert path.read_bytes()[:8] == PNG


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
