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


def _pretrain(data: Path, out: Path, policy: str = "random", seed: int = 3, size: int = 32,
              masking: dict | None = None, **model) -> Path:
    over = tiny_pretrain_overrides(data, policy=policy, backbone="unet", steps=4)
    over["data"]["image_size"] = size
    over["train"]["seed"] = seed
    over["model"].update({"norm_pix": False, **model})
    over["masking"].update(masking or {})
    pretrain(build_config(PretrainConfig, overrides=over), out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recon")
    data = make_blob_folder(root / "data", n=16)
    return {"data": data, "r3": _pretrain(data, root / "r3"), "r4": _pretrain(data, root / "r4", seed=4),
            "a3": _pretrain(data, root / "a3", policy="ahm"), "big": _pretrain(data, root / "big", size=48),
            "np3": _pretrain(data, root / "np3", norm_pix=True)}


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
    doc = recon_scores([runs["r3"], runs["r4"], runs["a3"]], data, split="val", mask_ratio=0.5, seed=7)
    r3, r4, a3, fill, patch_fill = doc["rows"]
    assert doc["n_images"] == len(r3["per_image"]) == len(doc["ids"]) > 1 and doc["norm_pix"] is False
    assert np.allclose(r3["per_image"], _by_hand(runs["r3"], data, 0.5, 7), rtol=1e-5)
    assert np.allclose(a3["per_image"], _by_hand(runs["a3"], data, 0.5, 7), rtol=1e-5)
    again = recon_scores([runs["a3"], runs["r3"]], data, split="val", mask_ratio=0.5, seed=7)
    assert again["rows"][1]["per_image"] == r3["per_image"]  # scored second: the same masks, the same numbers
    assert r3["per_image"] != r4["per_image"]
    assert (r3["policy"], a3["policy"], r3["seed"], r4["seed"], r3["steps"]) == ("random", "ahm", 3, 4, 4)
    assert (r3["seen"], fill["policy"], patch_fill["policy"]) == (False, "mean-fill", "patch-mean-fill")
    other = recon_scores([runs["r3"]], data, split="val", mask_ratio=0.5, seed=8)
    assert other["rows"][0]["per_image"] != r3["per_image"]  # another mask seed: other patches
    # summaries over seeds: r3 and r4 are one setting of two runs; ahm is its own
    groups = {g["policy"]: g for g in doc["groups"]}
    assert set(groups) == {"random", "ahm"} and groups["random"]["runs"] == 2 and groups["ahm"]["runs"] == 1
    values = [r3["mse"], r4["mse"]]
    assert groups["random"]["mse"] == pytest.approx(np.mean(values))
    assert groups["random"]["mse_sd"] == pytest.approx(np.std(values, ddof=1)) and groups["ahm"]["mse_sd"] is None
    # the training split of the set they pretrained on is not held out, and says so
    seen = recon_scores([runs["r3"]], data, split="train")
    assert seen["rows"][0]["seen"] is True


def test_runs_of_one_setting_are_grouped_by_their_whole_config(runs: dict[str, Path], tmp_path: Path) -> None:
    data = runs["data"]
    half = _pretrain(data, tmp_path / "half", masking={"mask_ratio": 0.5})  # r3's setting but for the mask ratio
    doc = recon_scores([runs["r3"], half, runs["r4"]], data, mask_ratio=0.5)
    assert [g["names"] for g in doc["groups"]] == [["r3", "r4"], ["half"]]


def test_a_norm_pix_run_that_predicts_nothing_scores_the_patch_mean_fill(runs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    import shutil

    zero = tmp_path / "zero"
    shutil.copytree(runs["np3"], zero)
    ckpt_path = zero / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["model"] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, ckpt_path)
    doc = recon_scores([zero, runs["np3"]], runs["data"])
    zero_row, trained, fill, patch_fill = doc["rows"]
    assert doc["norm_pix"] is True
    # de-normalising hands every masked patch its true mean: a model of zeros scores the patch-mean fill, which
    # (knowing each patch's mean) is far below the mean-fill floor of pixel runs
    assert np.allclose(zero_row["per_image"], patch_fill["per_image"], rtol=1e-4, atol=1e-7)
    assert patch_fill["mse"] < fill["mse"]
    with pytest.raises(AhmError, match="norm_pix True.*score them apart"):
        recon_scores([runs["r3"], runs["np3"]], runs["data"])


def test_a_recorded_relative_dataset_is_found_beside_the_runs(tmp_path: Path, monkeypatch) -> None:
    make_blob_folder(tmp_path / "set", n=16)
    monkeypatch.chdir(tmp_path)
    for name, seed in (("one", 3), ("two", 4)):
        _pretrain(Path("set"), Path(name), seed=seed)
    monkeypatch.chdir(tmp_path / "set")  # elsewhere: "set" resolves beside the runs, for every run
    doc = recon_scores([tmp_path / "one", tmp_path / "two"])
    assert doc["data"] == str((tmp_path / "set").resolve()) and len(doc["rows"]) == 4


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
    assert np.allclose(doc["rows"][-2]["per_image"], expected, rtol=1e-5)
    assert doc["split"] == "test" and doc["mask_ratio"] == 0.25


def test_runs_that_cannot_share_masks_or_images_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AhmError, match="patch grid .* differs"):
        recon_scores([runs["r3"], runs["big"]], runs["data"])
    with pytest.raises(AhmError, match="given twice"):
        recon_scores([runs["r3"], runs["r3"]], runs["data"])
    with pytest.raises(AhmError, match="--n-images must be at least 1"):
        recon_scores([runs["r3"]], runs["data"], n_images=0)
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
    assert [r["name"] for r in doc["rows"]] == ["r3", "r4", "mean-fill", "patch-mean-fill"]
    assert doc["mask_ratio"] == 0.75
    before = out.read_text()
    for args, message in (((str(runs["r3"]), "--out", str(out)), "already exists; use --force"),
                          ((str(runs["r3"]), "--split", "holdout"), "--split holdout: give train, val or test"),
                          ((str(tmp_path / "nowhere"),), "not a pretraining run directory")):
        bad = ahm(*args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1, bad.output
    assert out.read_text() == before  # nothing overwritten
