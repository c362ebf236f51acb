"""The pretraining loop: run directory, resume equivalence, refusal of bad input, NaN stop, DDP agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import RankEvidence, make_blob_folder, tiny_pretrain_overrides
from typer.testing import CliRunner

from ahm.config import PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.io import load_safetensors, load_torch
from ahm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data")


def _cfg(data: Path, **kw) -> PretrainConfig:
    return build_config(PretrainConfig, overrides=tiny_pretrain_overrides(data, **kw))


@pytest.mark.parametrize("backbone", ["vit", "unet"])
def test_run_directory_contents(blobs: Path, tmp_path: Path, backbone: str) -> None:
    summary = pretrain(_cfg(blobs, backbone=backbone), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "splits.json", "checkpoints/last.ckpt", "encoder.safetensors",
                 "summary.json", "metrics.jsonl", "reconstructions.png"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["policy"] == "random" and on_disk["steps"] == 4
    assert {"final_loss", "images_per_s"} <= on_disk.keys()
    assert summary["steps"] == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all({"loss", "lr", "images_per_s"} <= r.keys() for r in lines)
    assert load_safetensors(run / "encoder.safetensors")
    # no test split image was used for pretraining
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] and not set(splits["test"]) & set(splits["train"])


@pytest.mark.parametrize("policy", ["random", "adamae"])
def test_resume_equals_uninterrupted(blobs: Path, tmp_path: Path, policy: str) -> None:
    full = _cfg(blobs, policy=policy, steps=4)
    pretrain(full, tmp_path / "full", progress=False)
    pretrain(_cfg(blobs, policy=policy, steps=4), tmp_path / "part", progress=False, stop_at=2)
    assert load_torch(tmp_path / "part" / "checkpoints" / "last.ckpt")["step"] == 2
    pretrain(_cfg(blobs, policy=policy, steps=4), tmp_path / "part", resume=True, progress=False)
    a = load_torch(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = load_torch(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["policy"].items():
        assert torch.equal(value, b["policy"][key]), key
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]


def test_refuses_to_overwrite_and_foreign_checkpoint(blobs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(_cfg(blobs), run, progress=False)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(AhmError, match="not empty"):
        pretrain(_cfg(blobs), run, progress=False)
    # a foreign file as checkpoint: refused with one line, nothing overwritten
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(AhmError, match="last.ckpt"):
        pretrain(_cfg(blobs, steps=6), run, resume=True, progress=False)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"not a checkpoint at all"
    assert before


def test_checkpoint_of_other_model_is_refused(blobs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(_cfg(blobs), run, progress=False)
    ckpt = load_torch(run / "checkpoints" / "last.ckpt")
    ckpt["model"] = {k + ".x": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    with pytest.raises(AhmError, match="does not match"):
        pretrain(_cfg(blobs, steps=6), run, resume=True, progress=False)


def test_nan_loss_stops_with_message(blobs: Path, tmp_path: Path) -> None:
    cfg = _cfg(blobs, steps=6)
    cfg.train.lr = 1e30  # diverges within a few steps
    cfg.train.clip_grad = 0.0
    cfg.train.warmup_steps = 0
    with pytest.raises(AhmError, match=r"step \d+: the loss is"):
        pretrain(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"masking": {"policy": "nope"}}, "unknown masking policy"),
        ({"model": {"preset": "huge"}}, "unknown model preset"),
        ({"data": {"image_size": 36}}, "not divisible by patch_size"),
        ({"masking": {"mask_ratio": 1.5}}, "mask ratio"),
    ],
)
def test_bad_options(blobs: Path, tmp_path: Path, overrides: dict, message: str) -> None:
    base = tiny_pretrain_overrides(blobs)
    for section, values in overrides.items():
        base[section].update(values)
    with pytest.raises(AhmError, match=message):
        cfg = build_config(PretrainConfig, overrides=base)
        pretrain(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_one_line_errors(blobs: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", str(blobs), "--out", str(tmp_path / "r"), "--mask-ratio", "0"])
    assert result.exit_code != 0
    assert "mask ratio" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["pretrain", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")])
    assert result.exit_code != 0 and "Traceback" not in result.output


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(blobs: Path, tmp_path: Path) -> None:
    cfg = _cfg(blobs, policy="adamae", steps=3)
    cfg.train.devices = 2
    cfg.train.batch_size = 2
    summary = pretrain(cfg, tmp_path / "run", progress=False, hooks=[RankEvidence()])
    assert summary["world_size"] == 2
    # each rank saved its weights fingerprint: they must agree (model under DDP, policy by grad all-reduce)
    prints = json.loads((tmp_path / "run" / "rank_fingerprints.json").read_text())
    assert len(prints) == 2
    assert prints["0"] == prints["1"]
    # the streamed corpus is sharded: within an epoch each rank reads its own samples (2 a step, 3 steps)
    seen = json.loads((tmp_path / "run" / "rank_samples.json").read_text())
    assert len(seen["0"]) == len(seen["1"]) == 6
    per_epoch = 2 * (json.loads((tmp_path / "run" / "corpus.json").read_text())["images_per_epoch"] // 4)
    assert per_epoch >= 2
    for start in range(0, 6, per_epoch):
        a, b = seen["0"][start:start + per_epoch], seen["1"][start:start + per_epoch]
        assert not set(a) & set(b) and len(set(a + b)) == len(a + b)
