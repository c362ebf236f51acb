"""Segmentation metrics per case and class (Dice, IoU, HD95 with MONAI's metric classes), over a whole split
(dataset-level Dice and IoU), and detection counts: figures that predicting nothing cannot win.

Conventions for empty structures (MONAI leaves them undefined or NaN; we fix them here so every figure is a number
or explicitly excluded):

- Dice and IoU of a class absent from both prediction and ground truth are **undefined by default**
  (`empty="exclude"`, as nnU-Net does): NaN, left out of every mean, and counted per class (`excluded_empty`).
  The old convention, Dice 1 and IoU 1 (the model "correctly predicted nothing"), stays available as
  `empty="one"` for comparison with papers that use it; it rewards predicting nothing wherever a structure is rare.
  Present in exactly one of them: 0 under both conventions (MONAI's `ignore_empty=True` would leave a false
  positive on an empty slice unpunished, so it is not used as is).
- Dataset-level Dice and IoU per class pool the voxel counts of the whole split: 2 sum TP / (2 sum TP + sum FP +
  sum FN). An all-background prediction scores 0 there whenever the structure occurs at all.
- HD95 when both are empty: undefined (NaN, excluded). When exactly one is empty: the diagonal of the image grid
  (the largest distance possible in it), so that a missed or hallucinated structure is penalised.
- Detection per class: `missed` (present in the ground truth, absent from the prediction) and `false_detections`
  (absent from the ground truth, present in the prediction), as counts and as rates over the cases where the
  structure is present (resp. absent).
- Only foreground classes (1..K-1) are scored; background is never part of a mean.
- Means over cases ignore NaN; the overall figure is the mean over classes of the per-class figure.

Distances are in pixels (voxels) of the grid the masks are given on unless `spacing` is passed (one for all
cases, or one per case): then in the spacing's unit, millimetres for NIfTI/DICOM/NRRD voxel sizes (MONAI's
`HausdorffDistanceMetric(spacing=...)`), the grid-diagonal penalty included.
Every summary that reports HD95 names its unit (`hd95_unit`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ahm.errors import AhmError

METRICS = ("dice", "iou", "hd95")
EMPTY_CONVENTIONS = ("exclude", "one")
SELECTION_METRICS = ("dataset_dice", "case_dice")
COUNTS = ("tp", "fp", "fn")

EMPTY_DESCRIPTION = {
    "exclude": "class absent from prediction and ground truth: Dice, IoU and HD95 undefined (excluded, counted in "
               "excluded_empty); absent from exactly one: Dice 0, IoU 0, HD95 = grid diagonal",
    "one": "OLD CONVENTION (empty=one): class absent from prediction and ground truth: Dice 1, IoU 1, HD95 "
           "excluded; absent from exactly one: Dice 0, IoU 0, HD95 = grid diagonal",
}


def check_empty(empty: str) -> str:
    if empty not in EMPTY_CONVENTIONS:
        raise AhmError(f"--empty-cases: unknown convention {empty!r}; choose {' or '.join(EMPTY_CONVENTIONS)}")
    return empty


def class_names(num_classes: int, known: dict[int, str] | None = None) -> list[str]:
    """Names of the foreground classes 1..K-1: the dataset's own (dataset.json, labels.json, a built-in set's)
    where it names them, else the class numbers."""
    known = known or {}
    return [known.get(c) or str(c) for c in range(1, num_classes)]


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


def _checked(pred, target, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    return p, t


def _counts(yp: torch.Tensor, yt: torch.Tensor) -> dict[str, np.ndarray]:
    """TP, FP, FN voxel counts per case and foreground class, by MONAI's confusion matrix."""
    from monai.metrics import get_confusion_matrix

    cm = get_confusion_matrix(yp, yt, include_background=False)  # [N, K-1, (tp, fp, tn, fn)]
    cm = cm.round().to(torch.int64).numpy()
    return {"tp": cm[..., 0], "fp": cm[..., 1], "fn": cm[..., 3]}


def _checked_spacing(spacing: Sequence[float] | None, n_dims: int) -> list[float]:
    if spacing is None:
        return [1.0] * n_dims
    values = [float(s) for s in spacing]
    if len(values) != n_dims or not all(math.isfinite(v) and v > 0 for v in values):
        raise AhmError(f"voxel spacing {tuple(spacing)}: need {n_dims} positive sizes, one per spatial axis")
    return values


def _case_spacings(spacing, n_cases: int, n_dims: int) -> list[list[float]]:
    """One checked spacing per case: `spacing` is None (grid units), one spacing for all cases, or one per case."""
    if spacing is not None and len(spacing) and np.ndim(spacing[0]) > 0:
        if len(spacing) != n_cases:
            raise AhmError(f"{len(spacing)} voxel spacings for {n_cases} cases")
        return [_checked_spacing(s, n_dims) for s in spacing]
    return [_checked_spacing(spacing, n_dims)] * n_cases


def hd95_unit(spacing) -> str:
    """The unit HD95 is reported in: "mm" when distances were scaled by the voxel spacing, else "voxels"."""
    return "mm" if spacing is not None else "voxels"


def _overlap(yp: torch.Tensor, yt: torch.Tensor, empty: str) -> dict[str, np.ndarray]:
    """Dice and IoU (MONAI) plus counts and presence for one chunk of one-hot cases."""
    from monai.metrics import DiceMetric, MeanIoU

    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(y_pred=yp, y=yt)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(y_pred=yp, y=yt)
    out = {"dice": dice.numpy().astype(np.float64), "iou": iou.numpy().astype(np.float64), **_counts(yp, yt)}
    out["pred_present"] = (out["tp"] + out["fp"]) > 0
    out["true_present"] = (out["tp"] + out["fn"]) > 0
    if empty == "exclude":
        both_empty = ~(out["pred_present"] | out["true_present"])
        out["dice"] = np.where(both_empty, np.nan, out["dice"])
        out["iou"] = np.where(both_empty, np.nan, out["iou"])
    return out


def _stack(parts: list[dict[str, np.ndarray]], keys: Sequence[str], n_fg: int) -> dict[str, np.ndarray]:
    if not parts:
        empty = {"pred_present": bool, "true_present": bool, "tp": np.int64, "fp": np.int64, "fn": np.int64}
        return {k: np.zeros((0, n_fg), dtype=empty.get(k, np.float64)) for k in keys}
    return {k: np.concatenate([p[k] for p in parts], 0) for k in keys}


def case_metrics(pred, target, num_classes: int, spacing=None,
                 chunk: int = 64, empty: str = "exclude") -> dict[str, np.ndarray]:
    """Per-case, per-foreground-class Dice, IoU and HD95, voxel counts and presence.

    pred, target: integer label maps `[N, *spatial]` (2D or 3D), values in [0, num_classes).
    spacing: None (HD95 in grid units), one spacing (one size per spatial axis) for every case, or a sequence of
    N spacings, one per case; the diagonal that penalises a missed or hallucinated structure is each case's own.
    Returns {"dice", "iou", "hd95"}: float arrays `[N, num_classes - 1]` (NaN where undefined, see module doc),
    {"tp", "fp", "fn"}: int64 voxel counts, {"pred_present", "true_present"}: bool; same shape.
    """
    from monai.metrics import HausdorffDistanceMetric

    check_empty(empty)
    p, t = _checked(pred, target, num_classes)
    spatial_shape = p.shape[1:]
    spacings = _case_spacings(spacing, p.shape[0], len(spatial_shape))
    diagonals = np.array([math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(spatial_shape, sp)))
                          for sp in spacings], dtype=np.float64)

    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    parts = []
    for start in range(0, p.shape[0], chunk):
        yp = _one_hot(p[start:start + chunk], num_classes)
        yt = _one_hot(t[start:start + chunk], num_classes)
        part = _overlap(yp, yt, empty)
        with warnings.catch_warnings():
            # MONAI warns about empty masks (handled below) and about its own deprecated internals.
            warnings.simplefilter("ignore")
            chunk_spacing = spacings[start:start + chunk]
            shared = all(sp == chunk_spacing[0] for sp in chunk_spacing)
            hd = hd_metric(y_pred=yp, y=yt, spacing=chunk_spacing[0] if shared else chunk_spacing)
            hd = hd.numpy().astype(np.float64)
        pred_any, true_any = part["pred_present"], part["true_present"]
        hd = np.where(pred_any & true_any, hd, np.nan)
        part["hd95"] = np.where(pred_any ^ true_any, diagonals[start:start + chunk, None], hd)
        parts.append(part)
    keys = METRICS + COUNTS + ("pred_present", "true_present")
    return _stack(parts, keys, num_classes - 1)


def overlap_metrics(pred, target, num_classes: int, empty: str = "exclude", chunk: int = 256) -> dict[str, np.ndarray]:
    """Dice, IoU, counts and presence only (cheap: no distance transforms), same conventions as `case_metrics`."""
    check_empty(empty)
    p, t = _checked(pred, target, num_classes)
    parts = [_overlap(_one_hot(p[s:s + chunk], num_classes), _one_hot(t[s:s + chunk], num_classes), empty)
             for s in range(0, p.shape[0], chunk)]
    return _stack(parts, ("dice", "iou") + COUNTS + ("pred_present", "true_present"), num_classes - 1)


def _nanmean(a: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, on purpose
        return np.nanmean(a, axis=axis)


def dataset_overlap(per_case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dataset-level Dice and IoU per class from pooled counts: `[num_classes - 1]` each, NaN for a class absent
    from every prediction and every ground truth of the split."""
    tp, fp, fn = (per_case[k].sum(axis=0).astype(np.float64) for k in COUNTS)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return {"dice": dice, "iou": iou}


def summarize(per_case: dict[str, np.ndarray], class_names: Sequence[str] | None = None,
              empty: str = "exclude") -> dict:
    """Per class and overall: per-case means ("dice", "iou", "hd95"), dataset-level "dataset_dice" and
    "dataset_iou", and detection counts; {"per_class": {name: {...}}, "excluded_empty": {name: n}, ...}.

    NaN (undefined) entries are excluded; a figure that is undefined everywhere is reported as None. `per_case`
    without counts (a table from an older version) gives the per-case means only.
    """
    n_fg = next(iter(per_case.values())).shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(1, n_fg + 1)]
    if len(names) != n_fg:
        raise AhmError(f"{len(names)} class names for {n_fg} foreground classes")
    summary: dict = {"per_class": {name: {} for name in names}, "empty_cases": check_empty(empty)}
    for metric in METRICS:
        values = per_case[metric]
        class_means = _nanmean(values, axis=0) if len(values) else np.full(n_fg, np.nan)
        for name, value in zip(names, class_means):
            summary["per_class"][name][metric] = _finite_or_none(value)
        summary[metric] = _finite_or_none(_nanmean(class_means)) if np.isfinite(class_means).any() else None
    if not all(k in per_case for k in COUNTS + ("pred_present", "true_present")):
        return summary
    pooled = dataset_overlap(per_case)
    for key in ("dice", "iou"):
        for name, value in zip(names, pooled[key]):
            summary["per_class"][name][f"dataset_{key}"] = _finite_or_none(value)
        summary[f"dataset_{key}"] = (_finite_or_none(_nanmean(pooled[key])) if np.isfinite(pooled[key]).any()
                                     else None)
    pred_any, true_any = per_case["pred_present"], per_case["true_present"]
    excluded = (~(pred_any | true_any)).sum(axis=0) if empty == "exclude" else np.zeros(n_fg, dtype=np.int64)
    summary["excluded_empty"] = {name: int(n) for name, n in zip(names, excluded)}
    detection = {}
    for c, name in enumerate(names):
        present, absent = int(true_any[:, c].sum()), int((~true_any[:, c]).sum())
        missed = int((true_any[:, c] & ~pred_any[:, c]).sum())
        false_det = int((~true_any[:, c] & pred_any[:, c]).sum())
        detection[name] = {"present": present, "missed": missed,
                           "missed_rate": missed / present if present else None,
                           "absent": absent, "false_detections": false_det,
                           "false_detection_rate": false_det / absent if absent else None}
        summary["per_class"][name].update(detection[name])
        summary["per_class"][name]["excluded_empty"] = int(excluded[c])
    summary["detection"] = detection
    return summary


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def case_means(per_case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean over foreground classes of each case's Dice, IoU, HD95 (NaN where every class is undefined)."""
    return {k: _nanmean(per_case[k], axis=1) for k in METRICS if k in per_case}


def selection_score(pred, target, num_classes: int, metric: str = "dataset_dice") -> float:
    """The validation figure that keeps the best fine-tuning checkpoint; neither choice can be won by an empty
    prediction: `dataset_dice` (default: mean over foreground classes of the pooled, dataset-level Dice) or
    `case_dice` (mean over classes of the per-case mean Dice, empty-empty cases excluded). A class that is absent
    from the whole split and never predicted does not count; if none is scored, 0."""
    if metric not in SELECTION_METRICS:
        raise AhmError(f"select_by: unknown figure {metric!r}; choose {' or '.join(SELECTION_METRICS)}")
    per = overlap_metrics(pred, target, num_classes, empty="exclude")
    values = dataset_overlap(per)["dice"] if metric == "dataset_dice" else _nanmean(per["dice"], axis=0)
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else 0.0


def _volume_labels(volume, name: str) -> np.ndarray:
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]  # a channel-first label map [1, D, H, W], as MONAI transforms leave it
    if arr.ndim not in (2, 3):
        raise AhmError(f"{name}: a volume's label map must be [D, H, W] or [1, D, H, W], got shape {arr.shape}")
    return arr


def volume_case_metrics(preds, targets, num_classes: int, spacings=None,
                        empty: str = "exclude") -> dict[str, np.ndarray]:
    """`case_metrics` with each volume one case, volumes of any shapes and each with its own voxel spacing.

    preds, targets: sequences of label maps `[D, H, W]` (or `[1, D, H, W]`), or arrays `[N, D, H, W]`.
    spacings: None (HD95 in voxels), one spacing for every volume, or one per volume (HD95 in mm).
    Returns arrays `[N, num_classes - 1]` as `case_metrics` does.
    """
    if len(preds) != len(targets):
        raise AhmError(f"{len(preds)} predicted volumes for {len(targets)} ground-truth volumes")
    if spacings is not None and len(spacings) and np.ndim(spacings[0]) == 0:
        spacings = [spacings] * len(preds)  # one spacing, shared
    if spacings is not None and len(spacings) != len(preds):
        raise AhmError(f"{len(spacings)} voxel spacings for {len(preds)} volumes")
    parts = []
    for i, (p, t) in enumerate(zip(preds, targets)):
        p, t = _volume_labels(p, f"predicted volume {i}"), _volume_labels(t, f"ground-truth volume {i}")
        parts.append(case_metrics(p[None], t[None], num_classes, None if spacings is None else spacings[i],
                                  empty=empty))
    keys = METRICS + COUNTS + ("pred_present", "true_present")
    return _stack(parts, keys, num_classes - 1)


def volume_scores(preds, targets, num_classes: int, spacings=None, class_names: Sequence[str] | None = None,
                  empty: str = "exclude", ids: Sequence[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(summary, per-case arrays) for volumes scored in 3D, each volume one case: `summarize`'s figures plus
    `n_cases`, `case`, `hd95_unit` ("mm" with spacings, "voxels" without) and `per_volume` (the mean over classes
    of each volume's Dice, IoU, HD95, None where undefined, under `ids` or the volume's number)."""
    per_case = volume_case_metrics(preds, targets, num_classes, spacings, empty)
    summary = summarize(per_case, class_names, empty)
    ids = [str(i) for i in range(len(preds))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(preds):
        raise AhmError(f"{len(ids)} volume ids for {len(preds)} volumes")
    means = case_means(per_case)
    summary.update({"n_cases": len(preds), "case": "volume", "hd95_unit": hd95_unit(spacings),
                    "per_volume": [{"volume": v, **{k: _finite_or_none(means[k][i]) for k in METRICS}}
                                   for i, v in enumerate(ids)]})
    return summary, per_case
