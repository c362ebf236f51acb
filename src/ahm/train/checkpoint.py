"""Checkpoints of both training loops: where they live, writing them atomically, reading them safely.

checkpoints/last.ckpt (kind "pretrain" or "finetune") holds everything a resume needs; checkpoints/best.ckpt
(kind "finetune-best") holds the weights and what the network was built for, which `ahm evaluate` and
`ahm predict` read from the run directory (eval reads the file, it does not import this module).
Files are written with `save_torch` (temp file, fsync, rename) and read with `load_torch` (weights_only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ahm.errors import AhmError
from ahm.io import load_torch, restore_state, save_torch
from ahm.train.rundir import CHECKPOINT_DIR, LAST
from ahm.version import __version__

__all__ = ["BEST", "checkpoint_path", "load_checkpoint", "restore_state", "save_checkpoint", "save_model_checkpoint"]

BEST = "best.ckpt"
_WHAT = {"pretrain": "pretraining", "finetune": "fine-tuning"}


def checkpoint_path(run_dir: str | Path, name: str = LAST) -> Path:
    """`run_dir/checkpoints/<name>`."""
    return Path(run_dir) / CHECKPOINT_DIR / name


def save_checkpoint(path: str | Path, kind: str, payload: dict[str, Any]) -> Path:
    """Write a resumable checkpoint of `kind` ("pretrain", "finetune") with the package version."""
    return save_torch(path, {"kind": kind, "version": __version__, **payload})


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """A resumable checkpoint of `kind`, or AhmError naming the file when it is something else."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or "model" not in ckpt:
        raise AhmError(f"{path}: not an ahm {_WHAT.get(kind, kind)} checkpoint")
    return ckpt


def save_model_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                          epoch: int, val_dice: float) -> Path:
    """The inference checkpoint `ahm.eval.evaluate.load_run` reads: weights plus what the network was built for
    (meta: segmenter, num_classes, in_channels, image_size, slice_axis, index_modality, ...)."""
    missing = [k for k in ("segmenter", "num_classes", "in_channels", "image_size") if k not in meta]
    if missing:
        raise AhmError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    return save_torch(path, {"kind": "finetune-best", "version": __version__, "epoch": int(epoch),
                             "val_dice": float(val_dice), "model": state_dict, "meta": dict(meta)})
