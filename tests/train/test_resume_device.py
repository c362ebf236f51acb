"""Resume puts every optimiser state tensor where its parameter is: the state is loaded after Fabric has moved the
model to its device (loaded before, AdamW's moments would stay on the CPU beside CUDA parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from train_helpers import make_blob_folder, tiny_pretrain_overrides

from ahm.config import FinetuneConfig, PretrainConfig, build_config
from ahm.train.finetune import finetune
from ahm.train.loop import Interrupted
from ahm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data", n=16)


@pytest.fixture
def watch(monkeypatch):
    """Record the order of Fabric's set-up and optimiser loads, and the optimisers a resumed run steps."""
    events: list[str] = []
    optimizers: list[torch.optim.Optimizer] = []
    setup, load, step = Fabric.setup, torch.optim.Optimizer.load_state_dict, torch.optim.AdamW.step

    def recording_setup(self, module, *optimizers_, **kw):
        events.append("setup")
        return setup(self, module, *optimizers_, **kw)

    def recording_load(self, state):
        events.append("load")
        return load(self, state)

    def recording_step(self, *a, **k):
        if self not in optimizers:
            optimizers.append(self)
        return step(self, *a, **k)

    monkeypatch.setattr(Fabric, "setup", recording_setup)
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", recording_load)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return events, optimizers


def _assert_state_beside_parameters(optimizers: list[torch.optim.Optimizer]) -> None:
    checked = 0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                for name, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        assert value.device == p.device and value.dtype == p.dtype, name
                        checked += 1
    assert checked


def _interrupt_after(monkeypatch, module, steps: int) -> None:
    original = module.stop_requested
    count = {"n": 0}

    def stop(fabric, sig, step, every):
        count["n"] += 1
        return count["n"] >= steps or original(fabric, sig, step, every)

    monkeypatch.setattr(module, "stop_requested", stop)


def _pretrain_run(blobs, out):
    cfg = build_config(PretrainConfig, overrides=tiny_pretrain_overrides(blobs, backbone="unet", steps=4))
    return lambda resume: pretrain(cfg, out, resume=resume, progress=False)


def _finetune_run(blobs, out):
    cfg = build_config(FinetuneConfig, overrides={
        "data": {"path": str(blobs), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0},
        "segmenter": "unet", "train": {"epochs": None, "steps": 4, "batch_size": 2, "warmup_steps": 1,
                                       "accelerator": "cpu"}})
    return lambda resume: finetune(cfg, out, resume=resume, progress=False)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_resume_loads_optimiser_state_after_the_model_is_on_its_device(blobs, tmp_path, monkeypatch, watch,
                                                                      kind) -> None:
    import ahm.train.engine as module

    events, optimizers = watch
    run = _pretrain_run(blobs, tmp_path / "run") if kind == "pretrain" else _finetune_run(blobs, tmp_path / "run")
    _interrupt_after(monkeypatch, module, 2)
    with pytest.raises(Interrupted):
        run(False)
    monkeypatch.setattr(module, "stop_requested", lambda fabric, sig, step, every: False)
    events.clear()
    optimizers.clear()
    run(True)
    assert events[:2] == ["setup", "load"]
    _assert_state_beside_parameters(optimizers)
