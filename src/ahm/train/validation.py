"""Validation during fine-tuning: the figure that keeps the best checkpoint, sharded over the ranks, and the
final scoring of the best checkpoint on the validation split."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ahm.config import FinetuneConfig
from ahm.io import load_torch
from ahm.pipeline import pipeline_for
from ahm.train.checkpoint import BEST, checkpoint_path, save_model_checkpoint
from ahm.train.finetune_data import FinetuneData
from ahm.train.loop import gather_objects
from ahm.train.state import RunState

VAL_KEYS = ("dice", "iou", "hd95", "dataset_dice", "level", "hd95_unit")  # what summary.json keeps of eval/val


MAX_VALIDATIONS = 50


def validation_interval(val_every: int | None, steps_per_epoch: int, total: int) -> int:
    """Steps between validations: `val_every` when set, else one epoch but at most ~MAX_VALIDATIONS per run."""
    if val_every is not None:
        return val_every
    return max(steps_per_epoch, math.ceil(total / MAX_VALIDATIONS))


@dataclass
class BestCheckpoint:
    """Validation as the engine calls it: the selection figure of the current weights, and best.ckpt (on the main
    rank) each time it improves."""

    model: torch.nn.Module  # the plain module: each rank predicts its own share, DDP's collectives stay out
    cfg: FinetuneConfig
    data: FinetuneData
    fabric: Any
    batch_size: int
    path: Path
    meta: dict[str, Any]
    enabled: bool
    progress: Callable[[str], None] | None = None  # shown while whole volumes are predicted (minutes each)

    def __call__(self, state: RunState, epoch: int) -> float:
        dice = validation_score(self.model, self.cfg, self.data, self.fabric, self.batch_size, self.progress)
        if dice > state.best_score:
            state.best_score, state.best_epoch = dice, epoch
            if self.enabled:
                save_model_checkpoint(self.path, self.model.state_dict(), self.meta, epoch, dice)
        return dice


def evaluate_best(model: torch.nn.Module, cfg: FinetuneConfig, data: FinetuneData, device: torch.device,
                  meta: dict[str, Any], out: Path, batch_size: int) -> dict[str, Any]:
    """Score best.ckpt on the validation split into out/eval/val/; returns what summary.json keeps of it."""
    best = load_torch(checkpoint_path(out, BEST))
    model.load_state_dict(best["model"])
    extra = {"checkpoint": f"checkpoints/{BEST}", "checkpoint_epoch": best["epoch"], "data": str(cfg.data.path),
             "source": data.val_source}
    val_metrics = pipeline_for(cfg).score_validation(model, cfg, data.val, data.num_classes, device,
                                                     meta["class_names"], out / "eval" / "val", extra, batch_size)
    return {k: val_metrics.get(k) for k in VAL_KEYS}


def validation_score(model, cfg: FinetuneConfig, data: FinetuneData, fabric, batch_size: int,
                     progress: Callable[[str], None] | None = None) -> float:
    """The figure that keeps the best checkpoint (`cfg.select_by`), with the validation set sharded over the ranks:
    each predicts every world-th case from its rank on, the predictions are gathered, and every rank scores the
    whole set, so the figure is the one-process figure exactly and every rank keeps the same best epoch. It runs in
    the run's precision on a GPU (`inference_precision`)."""
    from ahm.eval.evaluate import inference_precision

    pipeline = pipeline_for(cfg)
    precision = inference_precision(cfg, fabric.device, None)
    share = pipeline.predict_share(model, cfg, data.val, fabric.global_rank, fabric.world_size, fabric.device,
                                   precision, batch_size, progress)
    return pipeline.selection_score(gather_objects(fabric, share), data.val, data.num_classes, cfg.select_by)
