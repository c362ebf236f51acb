"""The AHM policy inside the real pretraining loop: resume equivalence, async run, incompatible checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ahm.config import PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.io import load_torch
from ahm.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import RankEvidence, make_blob_folder, tiny_pretrain_overrides


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data")


def _cfg(data: Path, workers: int = 0, steps: int = 4) -> PretrainConfig:
    overrides = tiny_pretrain_overrides(data, policy="ahm", steps=steps)
    overrides["masking"]["agent_workers"] = workers
    overrides["masking"]["hard_fraction_max"] = 0.5
    return build_config(PretrainConfig, overrides=overrides)


@pytest.mark.slow
def test_ahm_resume_equals_uninterrupted(blobs: Path, tmp_path: Path) -> None:
    pretrain(_cfg(blobs), tmp_path / "full", progress=False)
    pretrain(_cfg(blobs), tmp_path / "part", progress=False, stop_at=2)
    pretrain(_cfg(blobs), tmp_path / "part", resume=True, progress=False)
    a = load_torch(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = load_torch(tmp_path / "part" / "checkpoints" / "last.ckpt")
    for key, value in a["policy"].items():
        assert torch.equal(value, b["policy"][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["policy_extra"]["generator"], b["policy_extra"]["generator"])
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    for key in ("critic_spearman", "policy_entropy", "mean_reward", "background_share", "transitions_dropped"):
        assert key in summary, key


def test_resume_with_another_agent_shape_is_one_clear_line(blobs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(_cfg(blobs), run, progress=False, stop_at=2)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["masking"]["agent_dim"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(AhmError) as info:
        pretrain(_cfg(blobs), run, resume=True, progress=False)
    message = str(info.value)
    assert "last.ckpt" in message and "agent." in message and "--agent-dim" in message and "\n" not in message


@pytest.mark.slow
def test_async_run_end_to_end(blobs: Path, tmp_path: Path) -> None:
    summary = pretrain(_cfg(blobs, workers=1, steps=6), tmp_path / "run", progress=False)
    assert summary["steps"] == 6 and "transitions_dropped" in summary
    ckpt = load_torch(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert "a3c" in ckpt["policy_extra"] and "adam" in ckpt["policy_extra"]["a3c"]
    # resuming an async run restores the shared optimiser state
    pretrain(_cfg(blobs, workers=1, steps=8), tmp_path / "run", resume=True, progress=False)
    later = load_torch(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert later["step"] == 8
    assert later["policy_extra"]["a3c"]["transitions_pushed"] >= ckpt["policy_extra"]["a3c"]["transitions_pushed"]


@pytest.mark.slow
def test_ddp_ranks_end_with_the_same_agent(blobs: Path, tmp_path: Path) -> None:
    cfg = _cfg(blobs, steps=3)
    cfg.train.devices = 2
    cfg.train.batch_size = 2
    summary = pretrain(cfg, tmp_path / "run", progress=False, hooks=[RankEvidence()])
    assert summary["world_size"] == 2 and summary["ranks_agree"]
    prints = json.loads((tmp_path / "run" / "rank_fingerprints.json").read_text())
    assert prints["0"] == prints["1"]  # includes every agent parameter (all-reduced A2C gradients)


@pytest.mark.slow
def test_worker_crash_stops_the_run_keeps_checkpoint_and_leaves_no_process(blobs: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ahm.masking.ahm.policy import AHMPolicy

    seen: dict[str, object] = {"calls": 0}
    original = AHMPolicy.observe

    def observe(self, images, mask, per_patch_loss, progress):
        step = original(self, images, mask, per_patch_loss, progress)
        seen["calls"] = int(seen["calls"]) + 1
        if seen["calls"] == 3:
            seen["pids"] = self.workers.pids
            self.workers.inject_fault("simulated worker bug")
            self.flush(timeout=180)  # surfaces the failure at this step, deterministically
        return step

    monkeypatch.setattr(AHMPolicy, "observe", observe)
    run = tmp_path / "run"
    with pytest.raises(AhmError, match="A3C worker 0 failed: RuntimeError: simulated worker bug"):
        pretrain(_cfg(blobs, workers=1, steps=8), run, progress=False)
    assert load_torch(run / "checkpoints" / "last.ckpt")["step"] == 2
    for pid in seen["pids"]:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
