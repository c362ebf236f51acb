"""Under real `torchrun` (two CPU processes, gloo): global rank 0 alone makes the run directory; pretraining and
fine-tuning finish, resume after a kill, accept --force, and end with the weights of `--devices 2`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import make_blob_folder, tiny_pretrain_overrides

from ahm.io import load_safetensors, load_torch

pytestmark = pytest.mark.slow


def _torchrun(*args: str, wait: bool = True, timeout: float = 300):
    # `python -m ahm` with the hook that leaves the evidence of DDP semantics (summary["ranks_agree"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("rank_evidence_cli.py")), "-q", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _ahm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ahm", "-q", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torchrun")
    data = make_blob_folder(root / "data", n=16)
    pre = tiny_pretrain_overrides(data, backbone="unet", steps=8)
    pre["data"].pop("path")
    pre["train"].update({"checkpoint_every": 1, "num_threads": 1, "batch_size": 2})
    ft = {"data": dict(pre["data"]), "model": dict(pre["model"]),
          "train": {"batch_size": 2, "warmup_steps": 1, "num_threads": 1, "checkpoint_every": 1}}
    (root / "pre.yaml").write_text(yaml.safe_dump(pre))
    (root / "ft.yaml").write_text(yaml.safe_dump(ft))
    return {"root": root, "data": data, "pre": root / "pre.yaml", "ft": root / "ft.yaml"}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key


def test_pretrain_and_finetune_under_torchrun_resume_after_a_kill_and_match_devices_2(setup) -> None:
    root, data = setup["root"], str(setup["data"])
    common = ["--accelerator", "cpu", "--config", str(setup["pre"])]
    # the reference: the same run with Fabric spawning the two processes itself
    spawned = _ahm("pretrain", data, "--out", str(root / "spawned"), "--devices", "2", *common)
    assert spawned.returncode == 0, spawned.stdout + spawned.stderr
    # a pretraining killed (SIGKILL to torchrun and its workers, as a pre-emption) once it has checkpoints,
    # then resumed under torchrun
    out = root / "pre"
    proc = _torchrun("pretrain", data, "--out", str(out), *common, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ckpt = out / "checkpoints" / "last.ckpt"
        if ckpt.is_file() and load_torch(ckpt)["step"] >= 2:
            break
        time.sleep(0.2)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _torchrun("pretrain", data, "--out", str(out), *common, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # results printed once (by rank 0), the run directory written once
    assert resumed.stdout.count("pretrained random/unet") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 2 and summary["ranks_agree"]
    _same_weights(load_safetensors(out / "encoder.safetensors"),
                  load_safetensors(root / "spawned" / "encoder.safetensors"))
    assert killed or summary["steps"] == 8  # a machine fast enough to finish before the kill still tests --resume
    # --force under torchrun replaces the run (one rank clears it, the other does not delete what it wrote)
    forced = _torchrun("pretrain", data, "--out", str(out), *common, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    _same_weights(load_safetensors(out / "encoder.safetensors"),
                  load_safetensors(root / "spawned" / "encoder.safetensors"))
    # a second run on the same --out is refused, in one line, before any work; nothing is touched
    before = (out / "summary.json").read_bytes()
    refused = _torchrun("pretrain", data, "--out", str(out), *common)
    assert refused.returncode != 0 and "directory is not empty" in refused.stdout + refused.stderr
    assert (out / "summary.json").read_bytes() == before

    # fine-tuning from it under torchrun equals --devices 2
    ft_common = ["--init", str(out), "--accelerator", "cpu", "--config", str(setup["ft"]), "--steps", "6"]
    spawned_ft = _ahm("finetune", data, "--out", str(root / "ft-spawned"), "--devices", "2", *ft_common)
    assert spawned_ft.returncode == 0, spawned_ft.stdout + spawned_ft.stderr
    ft = _torchrun("finetune", data, "--out", str(root / "ft"), *ft_common)
    assert ft.returncode == 0, ft.stdout + ft.stderr
    assert ft.stdout.count("fine-tuned unet") == 1
    _same_weights(load_torch(root / "ft" / "checkpoints" / "last.ckpt")["model"],
                  load_torch(root / "ft-spawned" / "checkpoints" / "last.ckpt")["model"])
    again = _torchrun("finetune", data, "--out", str(root / "ft"), *ft_common, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
