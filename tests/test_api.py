"""The Python API does what the commands do: same runs, same inheritance, models a user can call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ahm
from ahm.config import FinetuneConfig, PretrainConfig
from ahm.io import load_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from train_helpers import make_blob_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNET = {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0, "patch_size": 8}
TRAIN = {"steps": 3, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "seed": 2, "accelerator": "cpu",
         "workers": 0}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data", n=12)


@pytest.fixture(scope="module")
def pretrained(blobs: Path, tmp_path_factory) -> ahm.PretrainResult:
    cfg = PretrainConfig(data={"path": str(blobs), "image_size": 32}, model=UNET, masking={"policy": "random"},
                         train=TRAIN)
    return ahm.pretrain(cfg, tmp_path_factory.mktemp("api") / "pre")


def test_api_pretraining_equals_the_command(blobs: Path, pretrained: ahm.PretrainResult, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {UNET}\ntrain: {TRAIN}\n".replace("'", ""))
    _register()
    res = CliRunner().invoke(app, ["-q", "pretrain", str(blobs), "--out", str(tmp_path / "cli"), "--image-size", "32",
                                   "--policy", "random", "--config", str(config)])
    assert res.exit_code == 0, res.output
    api_weights = load_safetensors(pretrained.encoder)
    cli_weights = load_safetensors(tmp_path / "cli" / "encoder.safetensors")
    assert api_weights.keys() == cli_weights.keys()
    assert all(torch.equal(api_weights[k], cli_weights[k]) for k in api_weights)
    assert pretrained.summary["steps"] == 3 and pretrained.final_loss > 0


def test_api_finetuning_inherits_from_its_pretraining(blobs: Path, pretrained: ahm.PretrainResult,
                                                      tmp_path: Path) -> None:
    # image size not given: the pretraining run's 32 (the default would be 128), as `ahm finetune --init` takes it
    seg = ahm.finetune(FinetuneConfig(data={"path": str(blobs)}, labels_fraction=0.5, train=TRAIN),
                       out=tmp_path / "seg", init=pretrained.run_dir)
    assert seg.summary["init"] == str(pretrained.run_dir) and 0 <= seg.best_val_dice <= 1
    assert "image_size: 32" in (tmp_path / "seg" / "config.yaml").read_text()

    scores = ahm.evaluate(seg.run_dir, split="val", report=False)
    assert (scores.out_dir / "metrics.json").is_file() and "dataset_dice" in scores.metrics

    image = sorted((blobs / "images").iterdir())[0]
    masks = ahm.predict(seg.run_dir, [image], out=tmp_path / "masks")
    assert len(masks.outputs) == 1 and not masks.failures

    model = ahm.load_segmenter(seg.run_dir)
    assert not model.training and type(model).__module__.startswith("monai.")
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, seg.summary["num_classes"], 32, 32)


def test_load_encoder_holds_the_pretrained_weights(pretrained: ahm.PretrainResult) -> None:
    from ahm.models.unet_nets import head_prefix

    network = ahm.load_encoder(pretrained.run_dir, num_classes=3)
    state = network.state_dict()
    head = head_prefix(network)  # the new last layer: classes out, not pixels
    weights = {k: v for k, v in load_safetensors(pretrained.encoder).items() if not k.startswith(head)}
    assert len(weights) > 4 and all(torch.equal(state[k], v) for k, v in weights.items())
    assert network(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_api_errors_are_ahm_errors(tmp_path: Path) -> None:
    with pytest.raises(ahm.AhmError, match="--init"):
        ahm.finetune({"data": {"path": str(tmp_path)}}, out=tmp_path / "seg")
    with pytest.raises(TypeError, match="config"):
        ahm.pretrain(42, out=tmp_path / "pre")  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_example_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path), "--tiny"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test: dataset-level Dice" in done.stdout and "predicted: 1 mask(s)" in done.stdout
