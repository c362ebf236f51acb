"""Shared pieces of the reliability tests: tiny configs as YAML, checkpoint comparison, the trial report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from train_helpers import tiny_pretrain_overrides

from ahm.config import PretrainConfig, build_config
from ahm.io import load_torch


def tiny_overrides(data: Path, steps: int, policy: str = "random", **train: Any) -> dict:
    """The tiny pretraining of tests/train, one thread (so a subprocess computes what this process does)."""
    over = tiny_pretrain_overrides(data, policy=policy, steps=steps)
    over["train"].update({"num_threads": 1, **train})
    return over


def tiny_cfg(data: Path, steps: int, policy: str = "random", **train: Any) -> PretrainConfig:
    return build_config(PretrainConfig, overrides=tiny_overrides(data, steps, policy, **train))


def write_yaml_config(path: Path, data: Path, steps: int, **train: Any) -> Path:
    """A `--config` file for `ahm pretrain` (the CLI exposes only some options; the file sets the rest)."""
    over = tiny_overrides(data, steps, **train)
    over["data"].pop("path")  # given as the DATA argument
    path.write_text(yaml.safe_dump(over))
    return path


def last_ckpt(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def same(a: Any, b: Any, where: str = "") -> None:
    """Assert `a` and `b` are equal all the way down, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_checkpoint(a_path: Path, b_path: Path, parts: tuple[str, ...] = ("model", "policy")) -> dict:
    """The two checkpoints hold the same step and identical `parts` (tensors bit for bit); returns the first."""
    a, b = load_torch(a_path), load_torch(b_path)
    assert a["step"] == b["step"], (a["step"], b["step"])
    for part in parts:
        same(a[part], b[part], part)
    return a


def logged_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def record_trials(key: str, figures: dict[str, Any]) -> None:
    """Merge `figures` under `key` into the JSON file named by AHM_RELIABILITY_REPORT (for the closing note)."""
    target = os.environ.get("AHM_RELIABILITY_REPORT")
    if not target:
        return
    path = Path(target)
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError:
            report = {}
    report[key] = figures
    path.write_text(json.dumps(report, indent=2) + "\n")
