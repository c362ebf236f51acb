"""The intensity baseline: how far the pixel intensity alone goes on a data set, with the same labelled subset.

A segmenter that cannot beat a lookup table from (normalised) intensity to class has not learned anything a
threshold could not; on a set where the tissues differ mainly by intensity (like the built-in brain set, whose
labels come from the same template as its image) it is the floor a network must clear. This is how we found
that instance norm hid the intensity level from our UNets (docs/results.md).

The table maps each intensity bin (the joint bin of all channels) to the class seen most often there in the
labelled training images; a bin never seen takes the class of the nearest seen bin (one channel) or the most
common class (several channels). Scored with the metrics of `ahm evaluate` on the model grid, HD95 in the same
unit (mm where every image's source records a pixel size, else pixels of the model grid; `hd95_unit`).

On volumes (`data.spatial_dims: 3`) the lookup is per voxel of the preprocessed grid `ahm evaluate` scores on
(resampled, normalised per modality, zero-padded to the crop); the intensities are rescaled to [0, 1] by the
range of each channel over the labelled training volumes (MRI is z-scored, so unbounded), and each volume is a
case with HD95 in mm from its spacing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ahm.errors import AhmError

MAX_TABLE = 1 << 20  # bins ** channels


def default_bins(channels: int) -> int:
    """256 levels for one channel; 32 per channel for colour (a joint table of 32**3 bins)."""
    return 256 if channels == 1 else 32


def _bin_index(images: np.ndarray, bins: int) -> np.ndarray:
    """[N, C, S, S] floats in [0, 1] -> [N, S, S] joint bin index."""
    q = np.clip((images * bins).astype(np.int64), 0, bins - 1)
    index = np.zeros(q.shape[:1] + q.shape[2:], dtype=np.int64)
    for c in range(q.shape[1]):
        index = index * bins + q[:, c]
    return index


def fit_intensity_lookup(images: np.ndarray, labels: np.ndarray, num_classes: int, bins: int = 256) -> np.ndarray:
    """Class per joint intensity bin, from `images` [N, C, S, S] (normalised to [0, 1]) and `labels` [N, S, S]."""
    if bins < 2:
        raise AhmError(f"--bins must be at least 2, got {bins}")
    channels = int(images.shape[1])
    size = bins ** channels
    if size > MAX_TABLE:
        raise AhmError(f"--bins {bins} with {channels} channels gives {size} bins (at most {MAX_TABLE}); "
                       f"use fewer bins")
    index = _bin_index(images, bins).ravel()
    counts = np.zeros((size, num_classes), dtype=np.int64)
    np.add.at(counts, (index, labels.ravel().astype(np.int64)), 1)
    seen = counts.sum(axis=1) > 0
    table = counts.argmax(axis=1)
    if not seen.any():
        raise AhmError("the labelled images are empty; nothing to fit the intensity baseline on")
    if channels == 1:
        # each bin takes the class of the closest seen bin (the lower one on a tie)
        where, levels = np.flatnonzero(seen), np.arange(size)
        pos = np.searchsorted(where, levels)
        above = where[np.minimum(pos, len(where) - 1)]
        below = where[np.maximum(pos - 1, 0)]
        table = np.where(seen, table, table[np.where(levels - below <= np.abs(above - levels), below, above)])
    else:
        table = np.where(seen, table, int(counts.sum(axis=0).argmax()))
    return table


def apply_intensity_lookup(table: np.ndarray, images: np.ndarray, bins: int = 256) -> np.ndarray:
    return table[_bin_index(images, bins)]


FIGURES = ("dice", "dataset_dice", "iou", "hd95")


def _scores(pipeline: Any, cases: Any, preds: list[np.ndarray], num_classes: int, empty: str,
            prefix: str) -> dict[str, Any]:
    """The figures of `ahm evaluate` at its primary level (re-stacked volumes when the images are their slices,
    each volume in 3D), so that a floor and a network are compared on the same cases."""
    scores = pipeline.case_scores(cases, preds, num_classes, empty)
    return ({f"{prefix}{key}": scores.get(key) for key in FIGURES}
            | {f"{prefix}level": scores["level"], f"{prefix}hd95_unit": scores["hd95_unit"]})


def _max_label(cases: Any) -> int:
    return max((int(lab.max(initial=0)) for lab in cases.labels), default=0)


def _unit_images(train: Any) -> Callable[[Any], list[np.ndarray]]:
    """Each case of a split as [1, C, V] in [0, 1]: as read where the intensities are in [0, 1] already (`unit`),
    else rescaled by the range of each channel over `train` (out-of-range values are clipped by the bins)."""
    if train.unit:
        return lambda cases: [im.reshape(1, im.shape[0], -1) for im in cases.images]
    lo = np.min([im.reshape(im.shape[0], -1).min(axis=1) for im in train.images], axis=0)
    hi = np.max([im.reshape(im.shape[0], -1).max(axis=1) for im in train.images], axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)[:, None]
    return lambda cases: [((im.reshape(im.shape[0], -1) - lo[:, None]) / scale)[None] for im in cases.images]


def _rows(pipeline: Any, index: Any, splits: dict[str, list[str]], names: list[str], split: str, cfg: Any,
          labels_fraction: float, seeds: range, bins: int | None, empty: str, log: Callable[[str], None] | None,
          labels_subjects: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any], int | None]:
    """`run_baseline`'s seed rows, the predict-nothing scores and the bins used."""
    from ahm.data import label_subset

    evaluated = {name: pipeline.baseline_cases(index, list(splits[name]), cfg) for name in names}
    num_classes = max(2, max(_max_label(cases) for cases in evaluated.values()) + 1)
    nothing: dict[str, Any] = {}
    for name, cases in evaluated.items():
        nothing.update(_scores(pipeline, cases, [np.zeros_like(lab) for lab in cases.labels], num_classes, empty,
                               "" if name == split else "val_"))
    rows = []
    for seed in seeds:
        labelled = label_subset(index, list(splits["train"]), labels_fraction, seed, subjects_count=labels_subjects)
        train = pipeline.baseline_cases(index, labelled, cfg)
        if bins is None:
            bins = default_bins(int(train.images[0].shape[0]))
        classes = max(num_classes, _max_label(train) + 1)
        unit = _unit_images(train)
        table = fit_intensity_lookup(np.concatenate(unit(train), axis=2),
                                     np.concatenate([lab.reshape(1, -1) for lab in train.labels], axis=1),
                                     classes, bins)
        row: dict[str, Any] = {"seed": seed, "labelled_images": len(train.ids),
                               "labelled_subjects": _subjects(index, labelled)}
        for name, cases in evaluated.items():
            preds = [apply_intensity_lookup(table, im, bins)[0].reshape(lab.shape)
                     for im, lab in zip(unit(cases), cases.labels)]
            row.update(_scores(pipeline, cases, preds, classes, empty, "" if name == split else "val_"))
        rows.append(row)
        if log is not None:
            log(f"seed {seed}: {len(train.ids)} labelled {pipeline.case_noun}s, {split} Dice {_fmt(row['dice'])}, "
                f"val Dice {_fmt(row['val_dice'])}")
    return rows, nothing, bins


def _subjects(index: Any, ids: list[str]) -> list[str]:
    """The subjects of `ids`, sorted: the same list `ahm finetune` writes to labelled.json for this seed."""
    subject_of = {item.id: item.subject for item in index.items}
    return sorted({subject_of[i] for i in ids})


def _mean_std(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
    return {"mean": float(values.mean()) if values.size else None,
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}


def run_baseline(data: str | Path, labels_fraction: float, seeds: int, first_seed: int = 0, bins: int | None = None,
                 split: str = "test", image_size: int = 128, layout: str = "auto",
                 log: Callable[[str], None] | None = None, data_cfg: Any = None,
                 empty: str = "exclude", labels_subjects: int | None = None,
                 spatial_dims: int = 2) -> dict[str, Any]:
    """Fit the lookup on each seed's labelled subset (the one `ahm finetune --seed S` uses: `labels_fraction` of the
    training subjects, or exactly `labels_subjects` of them when given); score val and `split`.
    `bins` per channel, default `default_bins(channels)`.

    `data_cfg` (a DataConfig) gives the splits and the grid of a fine-tuning config; else `image_size`/`layout`/
    `spatial_dims` with the default splits. Also scores the "predict nothing" floor (`empty_prediction`), the same for every seed.
    `empty`: the empty-case convention of `ahm.eval.metrics`."""
    from ahm.config import DataConfig
    from ahm.data import make_splits, open_dataset
    from ahm.eval.metrics import check_empty
    from ahm.pipeline import pipeline_for

    check_empty(empty)
    if seeds < 1:
        raise AhmError(f"--seeds must be at least 1, got {seeds}")
    if bins is not None and bins < 2:
        raise AhmError(f"--bins must be at least 2, got {bins}")
    if spatial_dims not in (2, 3):
        raise AhmError(f"--spatial-dims {spatial_dims}: give 2 (images) or 3 (volumes)")
    cfg = (data_cfg.model_copy(update={"path": str(data)}) if data_cfg is not None
           else DataConfig(path=str(data), image_size=image_size, layout=layout, spatial_dims=spatial_dims))
    index = open_dataset(data, cfg)
    if not index.has_labels:
        raise AhmError(f"{data}: no masks found ({index.layout} layout); the baseline needs labelled images")
    splits = make_splits(index, cfg)
    names = ["val", split] if split != "val" else ["val"]
    for name in names:
        if not splits.get(name):
            raise AhmError(f"{data}: the {name} split is empty")
    pipeline = pipeline_for(cfg)
    rows, nothing, bins = _rows(pipeline, index, splits, names, split, cfg, labels_fraction,
                                range(first_seed, first_seed + seeds), bins, empty, log, labels_subjects)
    return _document(data, labels_fraction, bins, split, cfg, empty, rows, nothing, labels_subjects,
                     pipeline.baseline_fields(cfg))


def _document(data: str | Path, labels_fraction: float, bins: int | None, split: str, cfg: Any, empty: str,
              rows: list[dict[str, Any]], nothing: dict[str, Any], labels_subjects: int | None = None,
              grid_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    keys = FIGURES + tuple(f"val_{k}" for k in FIGURES)
    summary = {key: _mean_std(rows, key) for key in keys}
    doc = {"data": str(data), "labels_fraction": labels_fraction, "labels_subjects": labels_subjects,
           "bins": bins, "split": split,
           "image_size": cfg.image_size, "empty_cases": empty, "level": nothing.get("level"), "rows": rows,
           "summary": summary,
           "empty_prediction": {key: nothing.get(key) for key in keys}}
    doc["hd95_unit"] = nothing.get("hd95_unit")
    doc.update(grid_fields or {})
    return doc


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_baseline(doc: dict[str, Any]) -> str:
    s = doc["summary"]

    def ms(key: str, digits: int = 4) -> str:
        m = s.get(key) or {"mean": None}
        return "-" if m["mean"] is None else f"{m['mean']:.{digits}f} +- {m['std']:.{digits}f}"

    def one(key: str, digits: int = 4) -> str:
        v = (doc.get("empty_prediction") or {}).get(key)
        return "-" if v is None else f"{v:.{digits}f}"

    split = doc["split"]
    convention = " (OLD CONVENTION: a class absent from prediction and truth scores 1)" \
        if doc.get("empty_cases") == "one" else ""
    labelled = (f"{doc['labels_subjects']} labelled subject(s)" if doc.get("labels_subjects")
                else f"{doc['labels_fraction']:g} of the labels")
    lines = [f"Floors a segmenter should clear ({labelled}, {len(doc['rows'])} seed(s))"
             f"{convention}: an intensity lookup ({doc['bins']} bins) and predicting nothing.",
             f"| floor | n | Dice ({split}) | dataset Dice ({split}) | IoU ({split}) | HD95 ({split}) | val Dice | "
             "val dataset Dice |", "|---|---|---|---|---|---|---|---|",
             f"| intensity lookup | {len(doc['rows'])} | {ms('dice')} | {ms('dataset_dice')} | {ms('iou')} | "
             f"{ms('hd95', 2)} | {ms('val_dice')} | {ms('val_dataset_dice')} |"]
    if doc.get("empty_prediction"):
        lines.append(f"| predict nothing | 1 | {one('dice')} | {one('dataset_dice')} | {one('iou')} | {one('hd95', 2)} "
                     f"| {one('val_dice')} | {one('val_dataset_dice')} |")
    return "\n".join(lines)
