"""3D without a config: the 3D defaults, crops drawn with replacement, and fine-tuning epochs of fixed length."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from ahm.config import FinetuneConfig, PretrainConfig, build_config
from ahm.data.corpus import StepBatches, epoch_rounds
from ahm.train.finetune import run_length
from ahm.train.loop import ShuffledItems

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixtures import make_msd_volume_fixture  # noqa: E402


def test_spatial_dims_3_brings_the_3d_defaults_and_options_still_win(tmp_path: Path) -> None:
    cfg = build_config(PretrainConfig, overrides={"data": {"spatial_dims": 3}})
    assert (cfg.train.batch_size, tuple(cfg.data.crop_size), tuple(cfg.data.spacing)) == (2, (64, 64, 64),
                                                                                        (1.5, 1.5, 1.5))
    assert build_config(PretrainConfig, overrides={"data": {"spatial_dims": 3},
                                                   "train": {"batch_size": 6}}).train.batch_size == 6
    assert build_config(PretrainConfig).train.batch_size == 32  # 2D keeps its own
    file = tmp_path / "c.yaml"
    file.write_text("data: {spatial_dims: 3}\ntrain: {batch_size: 3}\n")
    assert build_config(PretrainConfig, file=file).train.batch_size == 3
    ft = build_config(FinetuneConfig, base={"data": {"spatial_dims": 3}})  # as inherited from a 3D pretraining
    assert ft.iterations_per_epoch == 250 and ft.train.batch_size == 2
    assert build_config(FinetuneConfig).iterations_per_epoch is None


class _Volumes:
    with_replacement = True

    def __init__(self, n: int) -> None:
        self.epoch_size = n

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        return ShuffledItems(self.epoch_size).epoch_order(epoch, seed)

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        return epoch_rounds(self, batch_size, world_size)[1]


def test_a_batch_of_crops_may_outnumber_the_volumes() -> None:
    assert epoch_rounds(_Volumes(3), 8) == (3, 1)  # three rounds of the 3 volumes fill a batch of 8
    assert epoch_rounds(_Volumes(20), 8) == (1, 2)  # enough volumes: one pass, as before
    assert epoch_rounds(ShuffledItems(3), 8) == (1, 0)  # 2D images: no replacement
    batches = list(StepBatches(_Volumes(3), seed=0, batch_size=8, start=0, stop=2))
    for batch in batches:
        entries = Counter(entry for _, _, entry in batch)
        assert sorted(entries) == [0, 1, 2] and max(entries.values()) - min(entries.values()) <= 1
        assert len({position for _, position, _ in batch}) == 8  # each draw its own crop key


def test_finetuning_epochs_of_fixed_length_draw_every_volume_evenly() -> None:
    cfg = build_config(FinetuneConfig, base={"data": {"spatial_dims": 3}})
    length = run_length(cfg, n_train=3, world=1)
    assert (length.batch_size, length.steps_per_epoch, length.total) == (2, 250, 1000)
    plan = ShuffledItems(3, draws=500)
    order = plan.epoch_order(0, seed=1)
    assert len(order) == 500 and set(Counter(order).values()) <= {166, 167}
    assert order == plan.epoch_order(0, seed=1) and order != plan.epoch_order(1, seed=1)


def test_3d_pretraining_on_fewer_volumes_than_the_batch(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    task = make_msd_volume_fixture(tmp_path / "task", cases=(1, 2, 3, 4, 5, 6))  # 4 training volumes
    _register()
    args = ["-q", "pretrain", str(task), "--out", str(tmp_path / "run"), "--spatial-dims", "3", "--steps", "2",
            "--batch-size", "6", "--workers", "0", "--backbone", "unet"]
    cfg = tmp_path / "small.yaml"
    cfg.write_text("data: {crop_size: [16, 16, 16]}\nmodel: {unet_channels: [4, 8], unet_strides: [2], patch_size: 8, norm_pix: false}\n"
                   "train: {log_every: 1, accelerator: cpu}\n")
    res = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 6" in saved and "- 1.5" in saved  # the option, and the 3D default spacing


def test_2d_still_refuses_a_batch_larger_than_the_set(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    task = make_msd_volume_fixture(tmp_path / "task", cases=(1, 2, 3, 4, 5, 6))
    _register()
    res = CliRunner().invoke(app, ["pretrain", str(task), "--out", str(tmp_path / "run"), "--steps", "2",
                                   "--batch-size", "10000", "--workers", "0"])
    assert res.exit_code != 0 and "fewer than --batch-size 10000" in res.output
