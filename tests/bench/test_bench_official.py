"""`ahm bench speed` and `ahm bench compare` take the staged ahm-official policy."""

from __future__ import annotations

import sys
from pathlib import Path

from ahm.config import PretrainConfig, build_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_blob_folder, tiny_pretrain_overrides  # noqa: E402


def test_speed_times_each_stage_of_ahm_official(tmp_path: Path) -> None:
    from ahm.bench.speed import format_speed, run_speed

    cfg = build_config(PretrainConfig, overrides=tiny_pretrain_overrides(tmp_path))
    doc = run_speed(cfg, ["random", "ahm-official"], steps=5, warmup=1, rounds=1)
    row = doc["policies"]["ahm-official"]
    # 6 steps: reconstructor 0-1, agent 2, MIM 3-5; the timed ones start after the warm-up step
    assert set(row["stages"]) == {"reconstructor", "agent", "mim"}
    assert row["images_per_s"] > 0 and row["mean_images_per_s"] > 0
    assert "random" in doc["policies"] and "stages" not in doc["policies"]["random"]
    assert "ahm-official:" in format_speed(doc)


def test_compare_runs_ahm_official(tmp_path: Path) -> None:
    from ahm.bench import compare

    data = make_blob_folder(tmp_path / "data", n=16)
    pre = tiny_pretrain_overrides(tmp_path, backbone="unet", steps=5)
    pre["data"].pop("path")
    pre["masking"]["official_probe_every"] = 1
    ft = {"data": dict(pre["data"]), "model": dict(pre["model"]),
          "train": {"epochs": None, "steps": 2, "batch_size": 2, "warmup_steps": 1, "accelerator": "cpu"}}
    result = compare.run_compare(data, tmp_path / "grid", ["scratch", "ahm-official"], ["unet"], seeds=1,
                                 labels_fraction=0.5, pretrain_steps=5, finetune_epochs=1,
                                 overrides={"pretrain": pre, "finetune": ft})
    row = next(r for r in result["rows"] if r["policy"] == "ahm-official")
    assert 0.0 <= row["dice"] <= 1.0 and row["hardness_ratio"] is not None and row["critic_spearman"] is not None
    assert (tmp_path / "grid" / "pretrain" / "unet-ahm-official-seed0" / "summary.json").is_file()
