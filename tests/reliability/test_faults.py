"""Resource and numerical faults: a full disk keeps the last good checkpoint and says so; out-of-range options are
refused before any work; NaN/inf losses or gradients stop the run naming the last good checkpoint, or are skipped
and counted."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from rel_helpers import last_ckpt, tiny_cfg, tiny_overrides, write_yaml_config
from train_helpers import make_blob_folder
from typer.testing import CliRunner

from ahm.config import FinetuneConfig, build_config
from ahm.errors import AhmError
from ahm.io import load_torch
from ahm.train.loop import NonFiniteLoss
from ahm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data")


def _cli(args: list[str]):
    from ahm.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, ["-q", *args])


def _temp_files(run: Path) -> list[str]:
    return [p.name for folder in (run, run / "checkpoints") if folder.is_dir()
            for p in folder.iterdir() if p.name.endswith(".tmp")]


def _disk_full_on(monkeypatch, name: str, fail_at: int) -> list[bytes]:
    """Make the `fail_at`-th atomic write of a file called `name` hit ENOSPC halfway through; returns the bytes of
    the writes that went through, oldest first."""
    import ahm.io as aio

    real = aio.write_bytes
    written: list[bytes] = []
    calls = {"n": 0}

    def write_bytes(path, data):
        if Path(path).name != name:
            return real(path, data)
        calls["n"] += 1
        if calls["n"] < fail_at:
            result = real(path, data)
            written.append(bytes(data))
            return result

        def half_then_full(fh) -> None:
            fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        return aio.atomic_write(path, half_then_full)

    monkeypatch.setattr(aio, "write_bytes", write_bytes)
    return written


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    config = write_yaml_config(tmp_path / "tiny.yaml", blobs, steps=6, checkpoint_every=2)
    written = _disk_full_on(monkeypatch, "last.ckpt", fail_at=2)  # the checkpoint of step 4 fails
    result = _cli(["pretrain", str(blobs), "--out", str(run), "--config", str(config)])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "last.ckpt: could not save the checkpoint of step 4 (No space left on device)" in line
    assert "the previous checkpoint (step 2) is kept" in line and "--resume" in line
    assert len(written) == 1 and last_ckpt(run).read_bytes() == written[0]  # byte for byte the good one
    assert load_torch(last_ckpt(run))["step"] == 2
    assert _temp_files(run) == []
    assert not (run / "summary.json").exists()

    # once there is room again, the run continues from the kept checkpoint
    assert _cli(["pretrain", str(blobs), "--out", str(run), "--resume"]).exit_code == 0
    assert load_torch(last_ckpt(run))["step"] == 6


def test_disk_full_on_the_first_checkpoint(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _disk_full_on(monkeypatch, "last.ckpt", fail_at=1)
    with pytest.raises(AhmError, match=r"step 1 \(No space left on device\); no checkpoint was written yet"):
        pretrain(tiny_cfg(blobs, steps=3, checkpoint_every=1), run, progress=False)
    monkeypatch.undo()
    assert not last_ckpt(run).exists() and _temp_files(run) == []
    pretrain(tiny_cfg(blobs, steps=3), run, resume=True, progress=False)  # nothing to keep: starts again
    assert load_torch(last_ckpt(run))["step"] == 3


def test_disk_full_in_the_metrics_log(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    from ahm.train import rundir

    class FullAfter:
        """The log file; the disk fills up after `lines` lines."""

        def __init__(self, fh, lines: int) -> None:
            self.fh, self.left = fh, lines

        def write(self, text: str) -> int:
            if self.left == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= 1
            return self.fh.write(text)

        def flush(self) -> None:
            self.fh.flush()

        def close(self) -> None:
            self.fh.close()

    real_init = rundir.MetricsLog.__init__

    def init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        self._fh = FullAfter(self._fh, lines=3)

    monkeypatch.setattr(rundir.MetricsLog, "__init__", init)
    run = tmp_path / "run"
    with pytest.raises(AhmError, match=r"metrics.jsonl: could not write \(No space left on device\); the last "
                                       r"checkpoint is kept") as err:
        pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=2), run, progress=False)
    assert "\n" not in str(err.value)
    assert load_torch(last_ckpt(run))["step"] == 2


def _finetune_cfg(data: Path, **train) -> FinetuneConfig:
    return build_config(FinetuneConfig, overrides={
        "data": {"path": str(data), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0},
        "segmenter": "unet", "init": "none",
        "train": {"epochs": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "seed": 1, "accelerator": "cpu",
                  "num_threads": 1, **train},
    })


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("seg") / "data", n=16)


def test_disk_full_while_finetuning_keeps_the_previous_checkpoint(seg: Path, tmp_path: Path, monkeypatch) -> None:
    from ahm.train.finetune import finetune

    run = tmp_path / "run"
    written = _disk_full_on(monkeypatch, "last.ckpt", fail_at=2)  # the end of epoch 2 fails
    with pytest.raises(AhmError, match=r"last.ckpt: could not write \(No space left on device\); the previous "
                                       r"file is kept"):
        finetune(_finetune_cfg(seg), run, progress=False)
    monkeypatch.undo()
    assert last_ckpt(run).read_bytes() == written[0] and _temp_files(run) == []


# ------------------------------------------------------------------ out-of-range options, refused before any work

PRETRAIN_BAD = [
    (["--steps", "-1"], "train.steps"),
    (["--batch-size", "0"], "train.batch_size"),
    (["--mask-ratio", "1.2"], "mask ratio"),
    (["--agent-workers", "10000"], "agent_workers"),
    (["--precision", "fp8"], "precision"),
    (["--lr", "inf"], "train.lr"),
    (["--accelerator", "tpu"], "accelerator"),
    (["--image-size", "8"], "image_size"),
    (["--patch-size", "64", "--image-size", "32"], "not divisible"),
]

YAML_BAD = [
    ({"train": {"warmup_steps": -5}}, "warmup_steps"),
    ({"train": {"num_threads": -2}}, "num_threads"),
    ({"data": {"channels": 0}}, "channels"),
    ({"data": {"max_pixels": 0}}, "max_pixels"),
    ({"data": {"ct_window": [100, -100]}}, "ct_window"),
    ({"model": {"num_heads": 0}}, "num_heads"),
    ({"model": {"decoder_heads": 5}}, "decoder_heads"),
    ({"model": {"backbone": "unet", "unet_channels": [0, 4]}}, "unet_channels"),
    ({"masking": {"ema_decay": 1.5}}, "ema_decay"),
    ({"masking": {"queue_size": 0}}, "queue_size"),
    ({"masking": {"policy_lr": -1}}, "policy_lr"),
]


def _assert_refused(result, out: Path, expected: str) -> None:
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line and expected in line, line
    assert not out.exists()  # refused before the run directory was made


@pytest.mark.parametrize("args, expected", PRETRAIN_BAD, ids=[" ".join(a) for a, _ in PRETRAIN_BAD])
def test_bad_options_are_refused_before_any_work(blobs: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    config = write_yaml_config(tmp_path / "tiny.yaml", blobs, steps=2)
    out = tmp_path / "run"
    _assert_refused(_cli(["pretrain", str(blobs), "--out", str(out), "--config", str(config), *args]), out, expected)


@pytest.mark.parametrize("change, expected", YAML_BAD, ids=[e for _, e in YAML_BAD])
def test_bad_config_values_are_refused_before_any_work(blobs: Path, tmp_path: Path, change: dict, expected: str) -> None:
    over = copy.deepcopy(tiny_overrides(blobs, steps=2))
    over["data"].pop("path")
    for section, values in change.items():
        over[section].update(values)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(over))
    out = tmp_path / "run"
    _assert_refused(_cli(["pretrain", str(blobs), "--out", str(out), "--config", str(config)]), out, expected)


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "train.epochs"),
    (["--labels-fraction", "0"], "labels_fraction"),
    (["--labels-subjects", "0"], "labels_subjects"),
    (["--labels-subjects", "2", "--labels-fraction", "0.5"], "--labels-fraction and --labels-subjects"),
    (["--batch-size", "0"], "train.batch_size"),
    (["--precision", "fp8"], "precision"),
])
def test_bad_finetune_options_are_refused_before_any_work(seg: Path, tmp_path: Path, args: list[str],
                                                          expected: str) -> None:
    out = tmp_path / "run"
    _assert_refused(_cli(["finetune", str(seg), "--init", "none", "--out", str(out), *args]), out, expected)


# ------------------------------------------------------------------ NaN / inf


class _InfGrad(torch.autograd.Function):
    """Adds nothing to the loss, sends inf back: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def _faulty_forward(monkeypatch, nan_at: tuple[int, ...] = (), inf_grad_at: tuple[int, ...] = ()) -> None:
    """Corrupt the pretraining step's loss (NaN) or gradients (inf) on the given 1-based steps."""
    import ahm.train.engine as engine

    real = engine.forward_step
    calls = {"n": 0}

    def forward_step(model, policy, images, progress, *rest):  # rest: the staged loop's trains_model
        loss, out, pstep = real(model, policy, images, progress, *rest)
        calls["n"] += 1
        if calls["n"] in nan_at:
            loss = loss * float("nan")
        if calls["n"] in inf_grad_at:
            loss = loss + _InfGrad.apply(next(model.parameters()).sum())
        return loss, out, pstep

    monkeypatch.setattr(engine, "forward_step", forward_step)


def _finite(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_loss_names_the_last_good_checkpoint(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _faulty_forward(monkeypatch, nan_at=(5,))
    with pytest.raises(NonFiniteLoss) as err:
        pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=2), run, progress=False)
    message = str(err.value)
    assert message.startswith("step 5: the loss is nan; run stopped.")
    assert f"Last good checkpoint: {last_ckpt(run)} (step 4)" in message and "nan_policy: skip" in message
    ckpt = load_torch(last_ckpt(run))
    assert ckpt["step"] == 4 and _finite(ckpt)


def test_nan_before_any_checkpoint_says_none_yet(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    _faulty_forward(monkeypatch, nan_at=(1,))
    with pytest.raises(NonFiniteLoss, match=r"step 1: the loss is nan; .*Last good checkpoint: none yet"):
        pretrain(tiny_cfg(blobs, steps=3, checkpoint_every=2), tmp_path / "run", progress=False)


def test_non_finite_gradient_stops_before_it_reaches_the_weights(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _faulty_forward(monkeypatch, inf_grad_at=(3,))
    with pytest.raises(NonFiniteLoss, match=r"step 3: the loss is [\d.]+ but a gradient is not finite.*\(step 2\)"):
        pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=2), run, progress=False)
    assert _finite(load_torch(last_ckpt(run)))


def test_skip_policy_skips_and_counts_bad_batches(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _faulty_forward(monkeypatch, nan_at=(2, 5), inf_grad_at=(3,))
    summary = pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=2, nan_policy="skip"), run, progress=False)
    assert summary["steps"] == 6 and summary["skipped_batches"] == 3
    assert json.loads((run / "summary.json").read_text())["skipped_batches"] == 3
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped_batches", 0) for r in logged] == [0, 1, 2, 2, 3, 3]
    assert "loss" not in logged[1] and "loss" in logged[3]  # a skipped step logs no loss
    ckpt = load_torch(last_ckpt(run))
    assert ckpt["skipped_batches"] == 3 and _finite(ckpt)


def test_finetune_nan_stops_or_skips(seg: Path, tmp_path: Path, monkeypatch) -> None:
    import monai.losses

    from ahm.train.finetune import finetune

    real = monai.losses.DiceCELoss
    calls = {"n": 0}

    class NaNOnStep6(real):
        def forward(self, *args, **kwargs):
            loss = super().forward(*args, **kwargs)
            calls["n"] += 1
            return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(monai.losses, "DiceCELoss", NaNOnStep6)
    run = tmp_path / "stop"
    with pytest.raises(NonFiniteLoss, match=rf"step 6: the loss is nan; .*Last good checkpoint: {last_ckpt(run)}"):
        finetune(_finetune_cfg(seg), run, progress=False)
    assert _finite(load_torch(last_ckpt(run)))

    calls["n"] = 0
    summary = finetune(_finetune_cfg(seg, nan_policy="skip"), tmp_path / "skip", progress=False)
    assert summary["skipped_batches"] == 1
    logged = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1].get("skipped_batches") == 1


def test_refusal_names_where_the_bad_value_came_from(blobs: Path, tmp_path: Path) -> None:
    config = write_yaml_config(tmp_path / "tiny.yaml", blobs, steps=2, batch_size=0)
    from_file = _cli(["pretrain", str(blobs), "--out", str(tmp_path / "a"), "--config", str(config)])
    assert f"{config}: train.batch_size" in from_file.output
    config = write_yaml_config(tmp_path / "tiny.yaml", blobs, steps=2)
    from_option = _cli(["pretrain", str(blobs), "--out", str(tmp_path / "b"), "--config", str(config), "--steps", "-1"])
    assert "options: train.steps" in from_option.output and str(config) not in from_option.output


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(blobs: Path, tmp_path: Path) -> None:
    """Two runs started on one --out: the second is refused in one line (a lock held while the first runs; the
    kernel drops it when that process ends), and with --force it deletes nothing of the first's."""
    import multiprocessing

    from ahm.train.rundir import RunLock

    run = tmp_path / "run"
    pretrain(tiny_cfg(blobs, steps=2), run, progress=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(run, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        for kwargs in ({"resume": True}, {"force": True}):
            with pytest.raises(AhmError, match=r"--out .*run: another ahm run is using this directory"):
                pretrain(tiny_cfg(blobs, steps=4), run, progress=False, **kwargs)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        release.set()
        holder.join(30)
    with RunLock(run):  # free again once the first process has ended
        pass
    assert pretrain(tiny_cfg(blobs, steps=4), run, resume=True, progress=False)["steps"] == 4


def _hold_lock(run: Path, ready, release) -> None:
    from ahm.train.rundir import RunLock

    with RunLock(run):
        ready.set()
        release.wait(60)
