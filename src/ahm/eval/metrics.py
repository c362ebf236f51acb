"""Segmentation metrics per case and class: Dice, IoU and HD95, computed with MONAI's metric classes.

Conventions for empty structures (MONAI leaves them undefined or NaN; we fix them here so every figure is a number
or explicitly excluded):

- Dice and IoU of a class absent from both prediction and ground truth: 1 (the model correctly predicted nothing).
  Present in exactly one of them: 0.
- HD95 when both are empty: undefined, stored as NaN and excluded from every mean.
  When exactly one is empty: the diagonal of the image grid (the largest distance possible in it), so that a missed
  or hallucinated structure is penalised rather than silently dropped.
- Only foreground classes (1..K-1) are scored; background is never part of a mean.
- Means over cases ignore NaN; the overall figure is the mean over classes of the per-class means.

Distances are in pixels (voxels) of the grid the masks are given on unless `spacing` is passed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ahm.errors import AhmError

METRICS = ("dice", "iou", "hd95")


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    # [N, *spatial] -> [N, K, *spatial] float, the layout MONAI metrics expect.
    spatial = labels.ndim - 1
    oh = torch.nn.functional.one_hot(labels.long(), num_classes)
    return oh.permute(0, spatial + 1, *range(1, spatial + 1)).float()


def _as_labels(a, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.is_floating_point():
        raise AhmError(f"{name}: label maps must be integer class indices, got {t.dtype}")
    return t.detach().cpu().long()


def case_metrics(pred, target, num_classes: int, spacing: Sequence[float] | None = None,
                 chunk: int = 64) -> dict[str, np.ndarray]:
    """Per-case, per-foreground-class Dice, IoU and HD95.

    pred, target: integer label maps `[N, *spatial]` (2D or 3D), values in [0, num_classes).
    Returns {"dice", "iou", "hd95"}: float arrays `[N, num_classes - 1]` (HD95 may hold NaN, see module doc).
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    if num_classes < 2:
        raise AhmError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    p = _as_labels(pred, "prediction")
    t = _as_labels(target, "ground truth")
    if p.shape != t.shape:
        raise AhmError(f"prediction shape {tuple(p.shape)} does not match ground truth shape {tuple(t.shape)}")
    for name, arr in (("prediction", p), ("ground truth", t)):
        if arr.numel() and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
            raise AhmError(f"{name}: label values must be in [0, {num_classes - 1}], "
                           f"found {int(arr.min())}..{int(arr.max())}")
    spatial_shape = p.shape[1:]
    if spacing is None:
        spacing = [1.0] * len(spatial_shape)
    spacing = [float(s) for s in spacing]
    diagonal = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(spatial_shape, spacing)))

    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    iou_metric = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    out = {k: [] for k in METRICS}
    for start in range(0, p.shape[0], chunk):
        yp = _one_hot(p[start:start + chunk], num_classes)
        yt = _one_hot(t[start:start + chunk], num_classes)
        out["dice"].append(dice_metric(y_pred=yp, y=yt).numpy())
        out["iou"].append(iou_metric(y_pred=yp, y=yt).numpy())
        with warnings.catch_warnings():
            # MONAI warns about empty masks (handled below) and about its own deprecated internals.
            warnings.simplefilter("ignore")
            hd = hd_metric(y_pred=yp, y=yt, spacing=spacing).numpy().astype(np.float64)
        pred_any = yp[:, 1:].flatten(2).amax(-1).bool().numpy()
        true_any = yt[:, 1:].flatten(2).amax(-1).bool().numpy()
        hd = np.where(pred_any & true_any, hd, np.nan)
        hd = np.where(pred_any ^ true_any, diagonal, hd)
        out["hd95"].append(hd)
    return {k: np.concatenate(v, 0).astype(np.float64) if v else np.zeros((0, num_classes - 1))
            for k, v in out.items()}


def _nanmean(a: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, on purpose
        return np.nanmean(a, axis=axis)


def summarize(per_case: dict[str, np.ndarray], class_names: Sequence[str] | None = None) -> dict:
    """Means over cases per class and overall: {"dice", "iou", "hd95", "per_class": {name: {...}}}.

    NaN (undefined) entries are excluded; a figure that is undefined everywhere is reported as None.
    """
    n_fg = next(iter(per_case.values())).shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(1, n_fg + 1)]
    summary: dict = {"per_class": {name: {} for name in names}}
    for metric in METRICS:
        values = per_case[metric]
        class_means = _nanmean(values, axis=0) if len(values) else np.full(n_fg, np.nan)
        for name, value in zip(names, class_means):
            summary["per_class"][name][metric] = _finite_or_none(value)
        summary[metric] = _finite_or_none(_nanmean(class_means)) if np.isfinite(class_means).any() else None
    return summary


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def case_means(per_case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean over foreground classes of each case (NaN where every class is undefined)."""
    return {k: _nanmean(v, axis=1) for k, v in per_case.items()}


def mean_foreground_dice(pred, target, num_classes: int) -> float:
    """Mean over classes of the per-class mean Dice; the figure validation uses to keep the best checkpoint."""
    per = case_metrics_dice(pred, target, num_classes)
    return float(np.mean(per.mean(axis=0))) if len(per) else 0.0


def case_metrics_dice(pred, target, num_classes: int) -> np.ndarray:
    """Dice only (cheap: no distance transforms), same conventions as `case_metrics`. `[N, num_classes - 1]`."""
    from monai.metrics import DiceMetric

    p = _as_labels(pred, "prediction")
    t = _as_labels(target, "ground truth")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    parts = [metric(y_pred=_one_hot(p[s:s + 256], num_classes), y=_one_hot(t[s:s + 256], num_classes)).numpy()
             for s in range(0, p.shape[0], 256)]
    return np.concatenate(parts, 0).astype(np.float64) if parts else np.zeros((0, num_classes - 1))
