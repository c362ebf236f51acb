"""`ahm pretrain --policy ahm-official`: three stages in one run directory, exact resume inside each stage, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import make_blob_folder, tiny_pretrain_overrides

from ahm.config import PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.io import load_torch
from ahm.train.pretrain import pretrain

STEPS = 10  # stages: reconstructor steps 0-3, agent 4-5, MIM 6-9 (fractions 0.4 and 0.2)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data")


def _cfg(data: Path, backbone: str = "unet", steps: int = STEPS, image_size: int = 32) -> PretrainConfig:
    over = tiny_pretrain_overrides(data, policy="ahm-official", backbone=backbone, steps=steps)
    over["masking"]["official_probe_every"] = 2
    over["data"]["image_size"] = image_size
    return build_config(PretrainConfig, overrides=over)


@pytest.fixture(scope="module")
def full_run(blobs: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("official") / "full"
    pretrain(_cfg(blobs), run, progress=False)
    return run


def test_three_stages_in_one_run_and_summary(full_run: Path) -> None:
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["policy"] == "ahm-official" and summary["steps"] == STEPS
    assert summary["agent_parameters"] > 0
    stages = summary["stages"]
    assert [(s["name"], s["start"], s["end"], s["trains_model"]) for s in stages] == [
        ("reconstructor", 0, 4, True), ("agent", 4, 6, False), ("mim", 6, 10, True)]
    for stage in stages[1:]:
        assert {"hardness_ratio", "critic_spearman", "background_share"} <= stage.keys(), stage
    assert "agent_loss" in stages[1] and "agent_loss" not in stages[2]
    records = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0] * 4 + [1] * 2 + [2] * 4
    # the model's lr schedule (warm-up, cosine) restarts at the MIM stage's first step
    assert records[6]["lr"] == pytest.approx(records[0]["lr"]) and records[6]["lr"] > records[3]["lr"]


def test_summary_averages_the_last_steps_not_the_last_probes(blobs: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The hardness ratio is probed every `official_probe_every` steps: averaging its last 50 probes would reach
    500 steps back, into the agent stage. summary.json averages what was logged in the last SUMMARY_WINDOW steps
    (here 3: steps 8-10, all in the MIM stage), so the run's figure is its final stage's."""
    from ahm.train import pretrain as module

    monkeypatch.setattr(module, "SUMMARY_WINDOW", 3)
    run = tmp_path / "run"
    pretrain(_cfg(blobs), run, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    probes = {r["step"]: r["hardness_ratio"] for r in records if "hardness_ratio" in r}
    assert [s for s in probes if s > STEPS - 3] == [9, 10]  # every 2 steps (0-based) and at a stage's last step
    assert summary["hardness_ratio"] == pytest.approx((probes[9] + probes[10]) / 2)
    spearman = [r["critic_spearman"] for r in records if r["step"] > STEPS - 3]
    assert summary["critic_spearman"] == pytest.approx(sum(spearman) / len(spearman))
    # nothing logged in the window: the last value stands
    assert module.recent_mean([(2, 1.0), (4, 3.0)], 10) == 3.0
    assert module.recent_mean([(2, 1.0), (8, 3.0), (9, 5.0)], 10) == 4.0


def test_model_frozen_during_agent_stage(blobs: Path, tmp_path: Path) -> None:
    run = tmp_path / "part"
    pretrain(_cfg(blobs), run, progress=False, stop_at=4)
    before = load_torch(run / "checkpoints" / "last.ckpt")
    pretrain(_cfg(blobs), run, resume=True, progress=False, stop_at=6)
    after = load_torch(run / "checkpoints" / "last.ckpt")
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key  # BN statistics included: eval mode
    assert any(not torch.equal(v, after["policy"][k]) for k, v in before["policy"].items())


@pytest.mark.parametrize("stop", [2, 5, 8])  # inside the reconstructor, agent and MIM stages
def test_resume_inside_each_stage_equals_uninterrupted(blobs: Path, tmp_path: Path, full_run: Path, stop: int) -> None:
    run = tmp_path / "part"
    pretrain(_cfg(blobs), run, progress=False, stop_at=stop)
    assert load_torch(run / "checkpoints" / "last.ckpt")["step"] == stop
    pretrain(_cfg(blobs), run, resume=True, progress=False)
    a = load_torch(full_run / "checkpoints" / "last.ckpt")
    b = load_torch(run / "checkpoints" / "last.ckpt")
    for part in ("model", "policy"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    la = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "hardness_ratio", "agent_loss"):
        assert [r.get(key) for r in la] == [r.get(key) for r in lb], key
    assert json.loads((full_run / "summary.json").read_text())["stages"] == \
        json.loads((run / "summary.json").read_text())["stages"]


def test_resume_with_another_stage_layout_or_grid_is_refused(blobs: Path, tmp_path: Path) -> None:
    run = tmp_path / "part"
    pretrain(_cfg(blobs), run, progress=False, stop_at=5)
    kept = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(AhmError, match="stages are reconstructor 0-4, agent 4-6, mim 6-10") as err:
        pretrain(_cfg(blobs, steps=20), run, resume=True, progress=False)
    assert "\n" not in str(err.value) and "--steps 10" in str(err.value)
    # the saved config decides the image size on resume; a checkpoint of another grid is refused all the same
    cfg = _cfg(blobs, image_size=64)
    from ahm.config import save_config

    save_config(cfg, run / "config.yaml")
    with pytest.raises(AhmError, match="grid") as err:
        pretrain(cfg, run, resume=True, progress=False)
    assert "\n" not in str(err.value)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == kept


def test_vit_backbone_takes_it(blobs: Path, tmp_path: Path) -> None:
    summary = pretrain(_cfg(blobs, backbone="vit", steps=5), tmp_path / "vit", progress=False)
    assert summary["steps"] == 5 and [s["steps"] for s in summary["stages"]] == [2, 1, 2]


def test_other_policies_report_agent_parameters(blobs: Path, tmp_path: Path) -> None:
    cfg = build_config(PretrainConfig, overrides=tiny_pretrain_overrides(blobs, policy="random", steps=2))
    summary = pretrain(cfg, tmp_path / "random", progress=False)
    assert summary["agent_parameters"] == 0 and "stages" not in summary


def test_too_few_steps_for_the_stages_is_one_line(blobs: Path, tmp_path: Path) -> None:
    with pytest.raises(AhmError, match="too few") as err:
        pretrain(_cfg(blobs, steps=2), tmp_path / "short", progress=False)
    assert "\n" not in str(err.value)
