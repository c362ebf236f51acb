"""`ahm bench recon`: every run scored on the same held-out images under the same random masks, in pixel space,
beside a mean-fill reference, and summarised over seeds; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_blob_folder, tiny_pretrain_overrides  # noqa: E402

from ahm.bench.recon import recon_scores  # noqa: E402
from ahm.cli.app import _register, app  # noqa: E402
from ahm.config import PretrainConfig, build_config  # noqa: E402
from ahm.errors import AhmError  # noqa: E402
from ahm.eval.visualize import load_run  # noqa: E402
from ahm.train.pretrain import pretrain  # noqa: E402

_register()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recon")
    data = make_blob_folder(root / "data", n=16)
    made = {"data": data}
    for name, policy, seed, size in (("r3", "random", 3, 32), ("r4", "random", 4, 32), ("a3", "ahm", 3, 32),
                                     ("big", "random", 3, 48)):
        over = tiny_pretrain_overrides(data, policy=policy, backbone="unet", steps=4)
        over["data"]["image_size"] = size
        over["train"]["seed"] = seed
        pretrain(build_config(PretrainConfig, overrides=over), root / name, progress=False)
        made[name] = root / name
    return made


def _by_hand(run: Path, data: Path, ratio: float, seed: int) -> np.ndarray:
    """The masked-pixel MSE per image, written out from the model's prediction and a mask drawn here."""
    cfg, model, policy, arrays = load_run(run, data, None, split="val")
    policy.close()
    images = torch.from_numpy(arrays.images).float()
    n, grid = len(images), model.patch_grid
    k = int(round(ratio * grid.num_patches))
    chosen = torch.rand(n, grid.num_patches, generator=torch.Generator().manual_seed(seed)).topk(k, dim=1).indices
    mask = torch.zeros(n, grid.num_patches, dtype=torch.bool).scatter_(1, chosen, True)
    with torch.no_grad():
        pred = model(images, mask).prediction
    side = grid.patch_size[0]
    pixels = mask.reshape(n, *grid.shape).repeat_interleave(side, 1).repeat_interleave(side, 2)[:, None]
    return np.array([((pred[i] - images[i])[pixels[i].expand_as(images[i])] ** 2).mean().item() for i in range(n)])


def test_every_run_is_scored_on_the_same_images_and_masks(runs: dict[str, Path]) -> None:
    data = runs["data"]
    doc = recon_scores([runs["r3"], runs["r4"], runs["a3"], runs["r3"]], data, split="val", mask_ratio=0.5, seed=7)
    r3, r4, a3, again, fill = doc["rows"]
    assert doc["n_images"] == len(r3["per_image"]) == len(doc["ids"]) > 1
    assert np.allclose(r3["per_image"], _by_hand(runs["r3"], data, 0.5, 7), rtol=1e-5)
    assert np.allclose(a3["per_image"], _by_hand(runs["a3"], data, 0.5, 7), rtol=1e-5)
    assert r3["per_image"] == again["per_image"]  # the same run twice: the same masks, the same numbers
    assert r3["per_image"] != r4["per_image"]
    assert (r3["policy"], a3["policy"], r3["seed"], r4["seed"], r3["steps"]) == ("random", "ahm", 3, 4, 4)
    assert fill["policy"] == "mean-fill" and fill["mse"] > 0  # its values: the next test
    other = recon_scores([runs["r3"]], data, split="val", mask_ratio=0.5, seed=8)
    assert other["rows"][0]["per_image"] != r3["per_image"]  # another mask seed: other patches
    # summaries over seeds: r3, r4 and r3 again are one group of three runs; ahm is its own
    groups = {g["policy"]: g for g in doc["groups"]}
    assert set(groups) == {"random", "ahm"} and groups["random"]["runs"] == 3 and groups["ahm"]["runs"] == 1
    values = [r3["mse"], r4["mse"], r3["mse"]]
    assert groups["random"]["mse"] == pytest.approx(np.mean(values))
    assert groups["random"]["mse_sd"] == pytest.approx(np.std(values, ddof=1)) and groups["ahm"]["mse_sd"] is None


def test_mean_fill_is_the_visible_mean_per_image(runs: dict[str, Path]) -> None:
    doc = recon_scores([runs["r3"]], runs["data"], split="test", mask_ratio=0.25, seed=1)
    _, model, policy, arrays = load_run(runs["r3"], runs["data"], None, split="test")
    policy.close()
    grid, images = model.patch_grid, arrays.images
    k = int(round(0.25 * grid.num_patches))
    chosen = torch.rand(len(images), grid.num_patches, generator=torch.Generator().manual_seed(1)).topk(k, 1).indices
    mask = torch.zeros(len(images), grid.num_patches, dtype=torch.bool).scatter_(1, chosen, True)
    side = grid.patch_size[0]
    pixels = mask.reshape(len(images), *grid.shape).repeat_interleave(side, 1).repeat_interleave(side, 2).numpy()
    expected = [float(((im[0][m] - im[0][~m].mean()) ** 2).mean()) for im, m in zip(images, pixels)]
    assert np.allclose(doc["rows"][-1]["per_image"], expected, rtol=1e-5)
    assert doc["split"] == "test" and doc["mask_ratio"] == 0.25


def test_runs_that_cannot_share_masks_or_images_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AhmError, match="patch grid differs"):
        recon_scores([runs["r3"], runs["big"]], runs["data"])
    with pytest.raises(AhmError, match="--mask-ratio 1.0"):
        recon_scores([runs["r3"]], runs["data"], mask_ratio=1.0)
    with pytest.raises(AhmError, match="not a pretraining run directory"):
        recon_scores([tmp_path], runs["data"])


def test_cli_prints_the_tables_writes_json_and_refuses_bad_input_in_one_line(runs: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    def ahm(*args: str):
        return CliRunner().invoke(app, ["--quiet", "bench", "recon", *args])

    out = tmp_path / "recon.json"
    result = ahm(str(runs["r3"]), str(runs["r4"]), "--data", str(runs["data"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "| r3 | random |" in result.output and "| mean-fill | mean-fill |" in result.output
    assert "| unet | random |" in result.output and "| 2 |" in result.output  # two runs summarised
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == ["r3", "r4", "mean-fill"] and doc["mask_ratio"] == 0.75
    before = out.read_text()
    for args, message in (((str(runs["r3"]), "--out", str(out)), "already exists; use --force"),
                          ((str(runs["r3"]), "--split", "holdout"), "--split holdout: give train, val or test"),
                          ((str(tmp_path / "nowhere"),), "not a pretraining run directory")):
        bad = ahm(*args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1, bad.output
    assert out.read_text() == before  # nothing overwritten
