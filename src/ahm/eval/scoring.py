"""Predicting label maps and scoring them: the figures `ahm evaluate`, fine-tuning's validation and the floors of
`ahm bench` share (per-case and dataset Dice, IoU, HD95 at the slice and re-stacked volume levels), and the files
a scored split leaves behind (metrics.json, per-image CSV, the report's best and worst cases).

Kept apart from `ahm.eval.evaluate` (which loads runs and reads splits) so that the 2D and 3D pipelines
(`ahm.pipeline`) can score without importing the module that asks them to.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ahm.errors import AhmError
from ahm.eval.metrics import (
    EMPTY_DESCRIPTION,
    METRICS,
    case_means,
    case_metrics,
    check_empty,
    class_names,
    summarize,
    volume_scores,
)
from ahm.eval.render import per_image_csv
from ahm.io import write_json, write_text

N_CASES = 4  # best and worst cases kept for the report

# The figures of the primary level are copied to the top of metrics.json, where `ahm bench compare` reads them.
LEVEL_KEYS = ("dice", "iou", "hd95", "dataset_dice", "dataset_iou", "per_class", "excluded_empty", "detection")


def predict_labels(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 32,
                   device: torch.device | None = None, *, roi_size: int | Sequence[int] | None = None,
                   overlap: float = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                   divisible_by: int | Sequence[int] | None = None, precision: str = "32-true") -> np.ndarray:
    """Argmax class map `[N, *spatial]` (int64) for images `[N, C, *spatial]` (2D or 3D), `batch_size` inputs at a
    time, by `ahm.eval.inference.sliding_window_predict` (window `roi_size`; None or the input's own size: one
    plain forward pass per batch) in `precision` (32-true, bf16-mixed, 16-mixed; the argmax of float32 logits)."""
    from ahm.eval.inference import sliding_window_predict

    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.asarray(images[start:start + batch_size]), dtype=torch.float32)
        logits = sliding_window_predict(model, batch, roi_size, overlap=overlap, mode=mode,
                                        sw_batch_size=sw_batch_size, divisible_by=divisible_by, device=device,
                                        output_device=device,  # the argmax where the logits are; labels come back
                                        precision=precision)
        # max().indices, not argmax(): the same labels, several times faster over the class axis on CPU
        out.append(logits.max(1).indices.to(torch.int64).cpu().numpy())
    if not out:
        return np.zeros((0,) + tuple(np.asarray(images).shape[2:]), dtype=np.int64)
    return np.concatenate(out, 0)


def predict_volume_labels(model: torch.nn.Module, volumes, roi_size: int | Sequence[int] | None, *,
                          overlap: float = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                          divisible_by: int | Sequence[int] | None = None,
                          device: torch.device | None = None, precision: str = "32-true") -> list[np.ndarray]:
    """Argmax class maps `[*spatial]` (int64), one per input `[C, *spatial]` of `volumes` (shapes may differ), each
    predicted whole or by sliding windows of `roi_size` in `precision` (see `ahm.eval.inference`)."""
    return [predict_labels(model, np.asarray(v)[None], 1, device, roi_size=roi_size, overlap=overlap, mode=mode,
                           sw_batch_size=sw_batch_size, divisible_by=divisible_by, precision=precision)[0]
            for v in volumes]


def _volume_groups(items) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for row, item in enumerate(items):
        if getattr(item, "volume", None) is not None and getattr(item, "slice", None) is not None:
            groups.setdefault(f"{item.volume}", []).append(row)
    return {k: sorted(v, key=lambda r: items[r].slice) for k, v in groups.items() if len(v) >= 2}


def _pick_cases(images, labels, preds, ids, dice_means) -> dict[str, np.ndarray]:
    """The best and worst images by mean Dice, among those with a foreground structure to find."""
    has_fg = labels.reshape(len(labels), -1).max(1) > 0
    candidates = np.flatnonzero(has_fg) if has_fg.any() else np.arange(len(labels))
    order = candidates[np.argsort(dice_means[candidates], kind="stable")]
    k = min(N_CASES, len(order) // 2) if len(order) > 1 else len(order)
    worst, best = order[:k], order[::-1][:k]
    rows = np.concatenate([best, worst]).astype(np.int64)
    kind = np.array(["best"] * len(best) + ["worst"] * len(worst))
    return {
        "images": np.asarray(images[rows], dtype=np.float32), "labels": labels[rows].astype(np.int16),
        "preds": preds[rows].astype(np.int16), "ids": np.array([ids[r] for r in rows], dtype=str),
        "dice": dice_means[rows].astype(np.float64), "kind": kind,
    }


def image_spacings(spacing: Sequence | None, n_images: int) -> list[tuple[float, float]] | None:
    """The per-image model-grid pixel sizes (mm) when every one of the `n_images` has one, else None: a set where
    any image lacks a recorded size is scored in pixels throughout, never in mixed units."""
    if spacing is None or len(spacing) != n_images or any(s is None for s in spacing):
        return None
    return [(float(s[0]), float(s[1])) for s in spacing]


def _restacked_spacing(rows: list[int], items, spacing: Sequence | None,
                       slice_mm: Sequence | None) -> tuple[float, float, float] | None:
    """Voxel size (mm) of a re-stacked volume [slices, rows, columns]: known when its slices share one in-plane
    model-grid spacing and one slice axis, their indices are evenly spaced and the source records its voxel
    size along that axis (then the step between stacked slices is that size times the index step)."""
    if spacing is None or slice_mm is None:
        return None
    planes = [spacing[r] for r in rows]
    through = [slice_mm[r] for r in rows]
    if any(p is None for p in planes) or any(t is None for t in through):
        return None
    first = np.asarray(planes[0], dtype=np.float64)
    if not all(np.allclose(np.asarray(p, dtype=np.float64), first, rtol=1e-6, atol=0) for p in planes):
        return None
    if not np.allclose(np.asarray(through, dtype=np.float64), float(through[0]), rtol=1e-6, atol=0):
        return None
    if len({getattr(items[r], "axis", None) for r in rows}) != 1:
        return None
    steps = np.diff([int(items[r].slice) for r in rows])
    if not len(steps) or steps[0] <= 0 or (steps != steps[0]).any():
        return None
    return float(through[0]) * int(steps[0]), float(first[0]), float(first[1])


def _volume_level(preds: np.ndarray, labels: np.ndarray, groups: dict[str, list[int]], num_classes: int,
                  names: list[str], empty: str, spacings: list | None = None) -> dict:
    """Re-stacked volumes scored in 3D: each volume is one case. HD95 in mm when every volume has a voxel size
    (`spacings`, one per group in sorted order, see `_restacked_spacing`), else in voxels of the re-stacked grid."""
    ordered = sorted(groups.items())
    vol, _ = volume_scores([preds[rows] for _, rows in ordered], [labels[rows] for _, rows in ordered],
                           num_classes, spacings, names, empty, ids=[name for name, _ in ordered])
    per_volume = [{"volume": row["volume"], "n_slices": len(rows), **{k: row[k] for k in METRICS}}
                  for row, (_, rows) in zip(vol.pop("per_volume"), ordered)]
    if spacings is not None:
        for row, sp in zip(per_volume, spacings):
            row["spacing_mm"] = list(sp)
    for key in ("n_cases", "case", "hd95_unit"):
        del vol[key]  # re-added below, in the order metrics.json has always had
    vol.update({"n_cases": len(groups), "n_volumes": len(groups), "case": "re-stacked volume",
                "hd95_unit": "mm" if spacings is not None else "voxels of the re-stacked model grid",
                "per_volume": per_volume})
    return vol


def leveled_scores(preds: np.ndarray, labels: np.ndarray, items: list | None, num_classes: int,
                   names: list[str] | None = None, empty: str = "exclude",
                   per_case: dict[str, np.ndarray] | None = None, spacing: Sequence | None = None,
                   slice_mm: Sequence | None = None) -> tuple[dict, dict, dict | None]:
    """(primary figures with their `level`, slice level, volume level or None): the volume level is primary when
    every image belongs to a re-stacked volume. `ahm evaluate` and the floors of `ahm bench` score this way.

    `spacing`, `slice_mm`: per image, the model-grid pixel size and the source's slice-axis voxel size in mm
    (`Arrays.spacing`, `Arrays.slice_mm`; None where unknown). HD95 is in mm at the slice level when every image
    has a pixel size (else in pixels of the model grid), and at the volume level when every re-stacked volume
    has a voxel size (else in its voxels). A `per_case` passed in must have been computed with
    `image_spacings(spacing, n)`."""
    names = list(names) if names is not None else class_names(num_classes)
    per_image = image_spacings(spacing, len(labels))
    if per_case is None:
        per_case = case_metrics(preds, labels, num_classes, spacing=per_image, empty=empty)
    slice_level = summarize(per_case, names, empty)
    slice_level.update({"n_cases": len(labels), "case": "image (2D slice)",
                        "hd95_unit": "mm" if per_image is not None else "pixels of the model grid"})
    volume_level = None
    groups = _volume_groups(items) if items is not None else {}
    if groups:
        restacked = [_restacked_spacing(rows, items, spacing, slice_mm) for _, rows in sorted(groups.items())]
        spacings = restacked if all(sp is not None for sp in restacked) else None
        volume_level = _volume_level(preds, labels, groups, num_classes, names, empty, spacings)
    level = "volume" if groups and sum(len(r) for r in groups.values()) == len(labels) else "slice"
    primary = volume_level if level == "volume" else slice_level
    return {"level": level, **{key: primary.get(key) for key in LEVEL_KEYS}}, slice_level, volume_level


def score_arrays(out_dir: Path, preds: np.ndarray, labels: np.ndarray, images: np.ndarray, ids: list[str],
                 items: list | None, num_classes: int, split: str, extra: dict | None = None,
                 empty: str = "exclude", names: list[str] | None = None, spacing: Sequence | None = None,
                 slice_mm: Sequence | None = None) -> dict:
    """Metrics, per-image CSV and report cases for predictions already made; written to `out_dir`.
    `spacing`, `slice_mm`: per image, as `leveled_scores` takes them (`Arrays.spacing`, `Arrays.slice_mm`).

    metrics.json holds `slice_level` (each image a case), `volume_level` when images are slices of volumes
    (re-stacked, each volume a case), and at its top the figures of the primary level, named by `level`: the
    volume level when every image belongs to a re-stacked volume, else the slice level."""
    check_empty(empty)
    if labels.size and int(labels.max()) >= num_classes:
        raise AhmError(f"split {split!r}: ground-truth labels go up to {int(labels.max())} but the model predicts "
                       f"{num_classes} classes (0..{num_classes - 1}); was it trained on another label set?")
    names = list(names) if names is not None else class_names(num_classes)
    per_case = case_metrics(preds, labels, num_classes, spacing=image_spacings(spacing, len(labels)), empty=empty)
    means = case_means(per_case)
    metrics, slice_level, volume_level = leveled_scores(preds, labels, items, num_classes, names, empty, per_case,
                                                        spacing, slice_mm)
    primary = volume_level if metrics["level"] == "volume" else slice_level
    metrics.update({
        "n_images": len(ids), "split": split, "class_names": names,
        "grid": f"model grid {labels.shape[-1]}x{labels.shape[-1]} (aspect kept, zero-padded)",
        "hd95_unit": primary["hd95_unit"], "empty_cases": empty, "empty_masks": EMPTY_DESCRIPTION[empty],
        "slice_level": slice_level,
    })
    if volume_level is not None:
        metrics["volume_level"] = volume_level
    if extra:
        metrics.update(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "per_image.csv", per_image_csv(ids, items, per_case, means, names))
    cases = _pick_cases(images, labels, preds, ids, np.nan_to_num(means["dice"], nan=0.0))
    buf = _io.BytesIO()
    np.savez_compressed(buf, **cases)
    from ahm.io import write_bytes

    write_bytes(out_dir / "cases.npz", buf.getvalue())
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def preprocessed(prepare, *args):
    """`prepare(*args)` (a MONAI transform chain, or what runs one) with an AhmError raised inside it given back
    as itself: MONAI wraps every exception of a transform in a RuntimeError ("applying transform ..."), which
    would hide the one-line message naming the file."""
    try:
        return prepare(*args)
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, AhmError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def volume_grid_description(data_cfg) -> str:
    """Where a 3D run's predictions are scored, in words for metrics.json and the report."""
    spacing = ("each volume's own spacing" if data_cfg.spacing is None
               else "spacing " + "x".join(f"{float(s):g}" for s in data_cfg.spacing) + " mm")
    return (f"preprocessed grid ({data_cfg.orientation}, {spacing}, zero-padded to at least the crop "
            f"{'x'.join(str(int(s)) for s in data_cfg.crop_size)}); predictions are scored there, not mapped back "
            f"to each input's own grid")


def volume_cases(shown: list[dict[str, np.ndarray]], ids: list[str], has_fg: np.ndarray,
                  dice_means: np.ndarray) -> dict[str, np.ndarray]:
    """`_pick_cases` for volumes: best and worst by mean Dice, each drawn by its `display_slice`, zero-padded
    to one shape (volumes differ in size) so they stack into cases.npz."""
    candidates = np.flatnonzero(has_fg) if has_fg.any() else np.arange(len(ids))
    order = candidates[np.argsort(dice_means[candidates], kind="stable")]
    k = min(N_CASES, len(order) // 2) if len(order) > 1 else len(order)
    rows = np.concatenate([order[::-1][:k], order[:k]]).astype(np.int64)
    kind = np.array(["best"] * k + ["worst"] * k)
    h = max((shown[r]["label"].shape[0] for r in rows), default=1)
    w = max((shown[r]["label"].shape[1] for r in rows), default=1)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h - a.shape[-2]), (0, w - a.shape[-1])])

    channels = shown[0]["image"].shape[0] if shown else 1
    return {
        "images": np.stack([pad(shown[r]["image"]) for r in rows]).astype(np.float32) if len(rows)
        else np.zeros((0, channels, h, w), np.float32),
        "labels": np.stack([pad(shown[r]["label"]) for r in rows]).astype(np.int16) if len(rows)
        else np.zeros((0, h, w), np.int16),
        "preds": np.stack([pad(shown[r]["pred"]) for r in rows]).astype(np.int16) if len(rows)
        else np.zeros((0, h, w), np.int16),
        "ids": np.array([f"{ids[r]} (axial slice {shown[r]['slice']})" for r in rows], dtype=str),
        "dice": dice_means[rows].astype(np.float64), "kind": kind,
    }




def inference_setting(loaded) -> dict[str, str]:
    """How the predictions of a loaded run (`ahm.eval.evaluate.LoadedRun`) were made, as metrics.json records it."""
    return {"device": loaded.device.type, "precision": loaded.precision}


def check_overlap(overlap: float) -> float:
    """Refuse a sliding-window `--overlap` outside [0, 1) before any volume is read or any file written."""
    if not 0.0 <= float(overlap) < 1.0:
        raise AhmError(f"--overlap {overlap}: the share of a window shared with its neighbour must be in [0, 1)")
    return float(overlap)
