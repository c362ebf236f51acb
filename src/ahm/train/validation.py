"""Validation during fine-tuning: the figure that keeps the best checkpoint, sharded over the ranks, and the
final scoring of the best checkpoint on the validation split."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.config import FinetuneConfig, model_input_size
from ahm.io import load_torch, write_json
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
    from ahm.eval.evaluate import predict_labels, score_arrays

    best = load_torch(checkpoint_path(out, BEST))
    model.load_state_dict(best["model"])
    extra = {"checkpoint": f"checkpoints/{BEST}", "checkpoint_epoch": best["epoch"], "data": str(cfg.data.path),
             "source": data.val_source}
    if cfg.data.spatial_dims == 3:
        scores, _ = _score_volumes(model, cfg, data, device, meta["class_names"])
        val_metrics = {"split": "val", **scores, "level": "volume", **extra}
        write_json(out / "eval" / "val" / "metrics.json", val_metrics)
        return {k: val_metrics.get(k) for k in VAL_KEYS}
    preds = predict_labels(model, data.val.images, batch_size=batch_size, device=device)
    val_metrics = score_arrays(out / "eval" / "val", preds, data.val.labels, data.val.images, data.val.ids,
                               data.val.items, data.num_classes, "val", names=meta["class_names"],
                               spacing=data.val.spacing, slice_mm=data.val.slice_mm, extra=extra)
    return {k: val_metrics[k] for k in VAL_KEYS}


def validation_score(model, cfg: FinetuneConfig, data: FinetuneData, fabric, batch_size: int,
                     progress: Callable[[str], None] | None = None) -> float:
    """The figure that keeps the best checkpoint (`cfg.select_by`), with the validation set sharded over the ranks:
    each predicts every world-th case from its rank on, the predictions are gathered, and every rank scores the
    whole set, so the figure is the one-process figure exactly and every rank keeps the same best epoch. It runs in
    the run's precision on a GPU (`inference_precision`)."""
    from ahm.eval.evaluate import inference_precision, predict_labels
    from ahm.eval.metrics import selection_score

    rank, world = fabric.global_rank, fabric.world_size
    precision = inference_precision(cfg, fabric.device, None)
    if cfg.data.spatial_dims == 3:
        shares = gather_objects(fabric, _predict_volumes(model, cfg, data, fabric.device,
                                                         range(rank, len(data.val), world), precision, progress))
        cases = sorted((case for share in shares for case in share), key=lambda case: case[0])
        return _volume_selection(_volume_scores(cases, data.num_classes)[0], cfg.select_by)
    mine = np.arange(rank, len(data.val.images), world)
    shares = gather_objects(fabric, (mine, predict_labels(model, data.val.images[mine], batch_size=batch_size,
                                                          device=fabric.device, precision=precision)))
    preds = np.zeros((len(data.val.images),) + shares[0][1].shape[1:], dtype=np.int64)
    for indices, share in shares:
        preds[indices] = share
    return selection_score(preds, data.val.labels, data.num_classes, cfg.select_by)


def _predict_volumes(model, cfg: FinetuneConfig, data: FinetuneData, device, indices,
                     precision: str = "32-true", progress: Callable[[str], None] | None = None) -> list[tuple]:
    """(index, prediction, target, spacing, id) of the validation volumes `indices`, each predicted whole by
    sliding windows of the training crop on the preprocessed grid."""
    from ahm.data.volumes import preprocessed_spacing
    from ahm.eval.evaluate import predict_volume_labels

    cases = []
    indices = list(indices)
    for n, i in enumerate(indices):
        if progress is not None:
            progress(f"validating volume {n + 1}/{len(indices)}")
        sample = data.val[i]
        (pred,) = predict_volume_labels(model, [sample["image"].as_tensor()], list(model_input_size(cfg.data)),
                                        overlap=cfg.overlap, mode="gaussian", device=device, precision=precision)
        cases.append((i, pred, torch.round(sample["label"].as_tensor()[0]).long().numpy(),
                      preprocessed_spacing(sample), sample["id"]))
    return cases


def _volume_scores(cases: list[tuple], num_classes: int, names: list[str] | None = None) -> tuple[dict, dict]:
    """`volume_scores` of predicted volumes, each one case, HD95 in mm from the preprocessed grid's spacing."""
    from ahm.eval.metrics import volume_scores

    _, preds, targets, spacings, ids = (list(column) for column in zip(*cases))
    return volume_scores(preds, targets, num_classes, spacings=spacings, class_names=names, empty="exclude", ids=ids)


def _score_volumes(model, cfg: FinetuneConfig, data: FinetuneData, device,
                   names: list[str] | None = None) -> tuple[dict, dict]:
    """`volume_scores` of every validation volume, predicted in this process."""
    return _volume_scores(_predict_volumes(model, cfg, data, device, range(len(data.val))), data.num_classes, names)


def _volume_selection(scores: dict, select_by: str) -> float:
    """`selection_score`'s two figures from a `volume_scores` summary: dataset_dice pooled over the volumes,
    case_dice the per-volume mean (empty-empty volumes left out); 0 when undefined."""
    value = scores.get("dataset_dice" if select_by == "dataset_dice" else "dice")
    return float(value) if value is not None else 0.0
