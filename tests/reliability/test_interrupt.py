"""Interruption: Ctrl-C stops after the current step with a checkpoint and a resume hint; SIGKILL at any moment
leaves a loadable checkpoint (or none), and resuming ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rel_helpers import (
    assert_same_checkpoint,
    last_ckpt,
    logged_losses,
    record_trials,
    tiny_cfg,
    write_yaml_config,
)
from train_helpers import make_blob_folder

from ahm.config import FinetuneConfig, PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.io import load_torch
from ahm.train.loop import Interrupted
from ahm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data")


def _wait_for(condition, deadline_s: float, proc=None, what: str = "") -> None:
    """Poll `condition` until true; fail (never hang) after `deadline_s` or if `proc` ended first."""
    end = time.monotonic() + deadline_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except OSError:
        return 0


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from ahm.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, ["-q", *args])


def _sigint_at_call(monkeypatch, module, name: str, calls: tuple[int, ...]):
    """Wrap `module.name` (called once per training step) so that it raises a real SIGINT on the given calls."""
    original = getattr(module, name)
    seen = {"n": 0}

    def wrapped(*args, **kwargs):
        seen["n"] += 1
        for _ in range(calls.count(seen["n"])):
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_sigint_in_process_stops_after_the_step_and_resumes_exactly(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    import ahm.train.engine as engine

    pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=100), tmp_path / "ref", progress=False)
    _sigint_at_call(monkeypatch, engine, "set_lr", (3,))
    with pytest.raises(Interrupted, match=r"interrupted at step 3/6.*--resume"):
        pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=100), tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    assert load_torch(last_ckpt(tmp_path / "run"))["step"] == 3
    # resumed from the command line without repeating the options: the run keeps its own 6 steps
    result = _cli(["pretrain", str(blobs), "--out", str(tmp_path / "run"), "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_checkpoint(last_ckpt(tmp_path / "ref"), last_ckpt(tmp_path / "run"), ("model", "policy", "optimizer"))
    assert logged_losses(tmp_path / "ref") == logged_losses(tmp_path / "run")


def test_second_sigint_stops_at_once_keeping_the_last_checkpoint(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    import ahm.train.engine as engine

    _sigint_at_call(monkeypatch, engine, "set_lr", (3, 3))
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(blobs, steps=6, checkpoint_every=2), tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert load_torch(last_ckpt(tmp_path / "run"))["step"] == 2
    pretrain(tiny_cfg(blobs, steps=6), tmp_path / "run", resume=True, progress=False)
    assert load_torch(last_ckpt(tmp_path / "run"))["step"] == 6


def test_sigint_during_finetuning_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    import ahm.train.engine as engine
    import ahm.train.finetune as ft

    data = make_blob_folder(tmp_path / "seg", n=16)
    over = {
        "data": {"path": str(data), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0},
        "segmenter": "unet", "init": "none",
        "train": {"epochs": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "seed": 1,
                  "accelerator": "cpu", "num_threads": 1},
    }
    cfg = build_config(FinetuneConfig, overrides=over)
    ft.finetune(cfg, tmp_path / "ref", progress=False)
    _sigint_at_call(monkeypatch, engine, "set_lr", (3,))
    with pytest.raises(Interrupted, match=r"interrupted at step 3/.*ahm finetune .*--resume"):
        ft.finetune(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert load_torch(last_ckpt(tmp_path / "run"))["state"]["step"] == 3
    # what a process killed after logging step 4 but before its next checkpoint leaves behind
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "step": 4, "loss": 123.0, "lr": 0.1, "images_per_s": 1.0}) + "\n")
    # resumed as a user would, from the command line without repeating the options: the run keeps its 2 epochs
    result = _cli(["finetune", str(data), "--out", str(tmp_path / "run"), "--resume"])
    assert result.exit_code == 0, result.output
    for name in ("last.ckpt", "best.ckpt"):
        a = load_torch(tmp_path / "ref" / "checkpoints" / name)["model"]
        b = load_torch(tmp_path / "run" / "checkpoints" / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]

    assert rows("ref") == rows("run")


@pytest.mark.slow
def test_sigint_to_the_cli_process(blobs: Path, tmp_path: Path) -> None:
    """A real `python -m ahm pretrain` gets Ctrl-C after its first logged step."""
    steps = 40
    config = write_yaml_config(tmp_path / "tiny.yaml", blobs, steps=steps, checkpoint_every=1000)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ahm", "-q", "pretrain", str(blobs), "--out", str(run), "--config", str(config)]
    with open(tmp_path / "err1.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
        try:
            _wait_for(lambda: _lines(run / "metrics.jsonl") >= 1, 300, proc, "the first logged step")
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "err1.txt").read_text()
    assert code == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    ckpt = load_torch(last_ckpt(run))  # checkpoint_every is 1000: only the interruption can have written it
    assert 1 <= ckpt["step"] < steps
    assert f"interrupted at step {ckpt['step']}/{steps}" in stderr and "--resume" in stderr
    assert max(s for s, _ in logged_losses(run)) <= ckpt["step"]  # it stopped after the step it was in

    # as the hint says, without repeating the options (in this process: the kill test covers other processes)
    done = _cli(["pretrain", str(blobs), "--out", str(run), "--resume"])
    assert done.exit_code == 0, done.output
    pretrain(build_config(PretrainConfig, file=run / "config.yaml"), tmp_path / "ref", progress=False)
    assert assert_same_checkpoint(last_ckpt(tmp_path / "ref"), last_ckpt(run))["step"] == steps
    assert logged_losses(tmp_path / "ref") == logged_losses(run)
    record_trials("sigint_cli", {"trials": 1, "survived": 1, "interrupted_at_step": int(ckpt["step"])})


def _pretrain_child(cfg_json: str, out: str, resume: bool) -> None:
    """Runs in a forked process that the test kills; pretraining exactly as the CLI would call it."""
    from ahm.config import PretrainConfig

    torch.set_num_threads(1)
    pretrain(PretrainConfig.model_validate_json(cfg_json), out, resume=resume, progress=False)


def _checkpoint_state(run: Path) -> int | None:
    """The step of the checkpoint on disk (None if there is none); it must always load."""
    path = last_ckpt(run)
    if not path.exists():
        return None
    ckpt = load_torch(path)  # a half-written file would fail here
    assert ckpt["kind"] == "pretrain"
    return int(ckpt["step"])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(blobs: Path, tmp_path: Path) -> None:
    steps, kills = 20, 4
    cfg = tiny_cfg(blobs, steps=steps, checkpoint_every=1)
    # Forked from a server that imported torch once: a kill can land anywhere in set-up, steps or writes
    # without paying the import for each of the runs.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ahm.train.pretrain", "ahm.models", "ahm.data", "lightning.fabric",
                                "torch.utils.tensorboard"])

    def launch(out: Path, resume: bool):
        child = ctx.Process(target=_pretrain_child, args=(cfg.model_dump_json(), str(out), resume), daemon=True)
        child.start()
        return child

    ref = launch(tmp_path / "ref", False)
    began = time.monotonic()
    ref.join(timeout=300)
    assert ref.exitcode == 0
    full_run_s = time.monotonic() - began  # only scales the random delays; no assertion depends on it

    rng = random.Random(6)
    run = tmp_path / "run"
    trials, survived, seen_steps, previous = 0, 0, [], None
    resume = False
    while trials < kills:
        child = launch(run, resume)
        child.join(timeout=rng.uniform(0.05, 0.5) * full_run_s)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=120)
        assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
        if child.exitcode == 0:
            break  # it finished before the kill
        trials += 1
        state = _checkpoint_state(run)
        # the previous checkpoint or a newer one, never an older or a torn one
        assert previous is None or (state is not None and previous <= state <= steps), (previous, state)
        seen_steps.append(state)
        previous = state
        survived += 1
        resume = run.exists()  # killed before it made its folder: nothing to resume, start it
    else:
        final = launch(run, resume)
        final.join(timeout=300)
        assert final.exitcode == 0
    record_trials("sigkill", {"trials": trials, "survived": survived, "checkpoint_step_after_each_kill": seen_steps})

    assert assert_same_checkpoint(last_ckpt(tmp_path / "ref"), last_ckpt(run), ("model", "policy", "optimizer"))[
        "step"] == steps
    assert logged_losses(tmp_path / "ref") == logged_losses(run)
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    summaries = [json.loads((r / "summary.json").read_text()) for r in (tmp_path / "ref", run)]
    for key in ("steps", "final_loss", "skipped_batches", "policy"):
        assert summaries[0][key] == summaries[1][key], key


def test_resume_of_a_run_killed_before_its_first_checkpoint(blobs: Path, tmp_path: Path) -> None:
    """The folders a kill can leave before the first checkpoint are resumable; other folders are not touched."""
    from ahm.io import write_json

    ref = tmp_path / "ref"
    pretrain(tiny_cfg(blobs, steps=3), ref, progress=False)

    after_config = tmp_path / "after_config"  # killed during data loading: run.json, config.yaml, no checkpoint
    pretrain(tiny_cfg(blobs, steps=3), after_config, progress=False)
    (after_config / "checkpoints" / "last.ckpt").unlink()
    (after_config / "checkpoints" / ".last.ckpt.x1y2.tmp").write_bytes(b"half a checkpo")
    (after_config / "summary.json").unlink()
    pretrain(tiny_cfg(blobs, steps=3), after_config, resume=True, progress=False)
    assert_same_checkpoint(last_ckpt(ref), last_ckpt(after_config))

    bare = tmp_path / "bare"  # killed between creating the folder and writing run.json
    (bare / "checkpoints").mkdir(parents=True)
    (bare / ".run.json.abc.tmp").write_bytes(b"{")
    pretrain(tiny_cfg(blobs, steps=3), bare, resume=True, progress=False)
    assert_same_checkpoint(last_ckpt(ref), last_ckpt(bare))

    foreign = tmp_path / "foreign"  # somebody's folder: --resume must refuse and delete nothing
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(AhmError, match=r"--resume: .*not found"):
        pretrain(tiny_cfg(blobs, steps=3), foreign, resume=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"

    other_kind = tmp_path / "finetune_run"  # a fine-tuning run without checkpoint is not a pretraining run
    (other_kind / "checkpoints").mkdir(parents=True)
    write_json(other_kind / "run.json", {"kind": "finetune"})
    with pytest.raises(AhmError):
        pretrain(tiny_cfg(blobs, steps=3), other_kind, resume=True, progress=False)
    assert (other_kind / "run.json").is_file()
