"""Evaluate a fine-tuned segmenter on a split of a dataset: per-class and mean Dice, IoU and HD95.

Resolution: metrics are computed on the model's grid (`image_size` x `image_size`, each image scaled with its
aspect ratio kept and zero-padded, masks resized with nearest sampling), exactly the labels the model was trained
against. The zero padding is background in both prediction and ground truth, so it changes no Dice or IoU. HD95 is
in millimetres when every evaluated image's source records a pixel size (a slice of a NIfTI/NRRD/MetaImage/DICOM
volume, a DICOM file with PixelSpacing, a 2D NRRD/MetaImage with a voxel size): each image is scored with the size
of its own model-grid pixel (`Arrays.spacing`). If any image lacks one (PNG, JPEG, TIFF, DICOM without
PixelSpacing), HD95 is in pixels of the model grid for the whole set. `ahm predict` maps masks back to the
original size. Volumes (items that are slices of one volume) are also re-stacked and scored in 3D: HD95 in mm
when each volume's slices share one model-grid pixel size and are evenly spaced (the slice step is the source's
voxel size along the slice axis times the index step), else in voxels of the re-stacked grid. Every summary
names its unit (`hd95_unit`). Empty-mask conventions: see `ahm.eval.metrics`.

A run fine-tuned on volumes (checkpoint meta `spatial_dims: 3`) is scored on whole volumes preprocessed as in
training (`ahm.data.volumes.preprocess_volumes` with the run's data settings: reoriented, resampled to
`data.spacing`, normalised, zero-padded to at least the crop), predicted by sliding windows of the training crop
(`roi_size`), each volume one case, HD95 in millimetres of that preprocessed grid. The prediction is scored on
that grid, not mapped back to each input's own grid (`ahm predict` does that); the padding is background in
both, so it changes no Dice or IoU.

Inference runs on one device in one precision (`load_run`'s `accelerator` and `precision`): 32-true, or a mixed
precision whose forward passes run under autocast and whose logits are blended and compared in float32 (see
`ahm.eval.inference`). The library's default is 32-true; `ahm evaluate` and `ahm predict` default to the run's own
`train.precision` on a GPU and to 32-true on the CPU (see `inference_precision`).
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.config import FinetuneConfig, load_config
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
from ahm.eval.render import display_slice, per_image_csv, per_volume_csv
from ahm.io import load_torch, write_json, write_text

BEST = "best.ckpt"
N_CASES = 4  # best and worst cases kept for the report

# The figures of the primary level are copied to the top of metrics.json, where `ahm bench compare` reads them.
LEVEL_KEYS = ("dice", "iou", "hd95", "dataset_dice", "dataset_iou", "per_class", "excluded_empty", "detection")


@dataclass
class LoadedRun:
    """A fine-tuned segmenter ready for inference, with what it was trained on."""

    run_dir: Path
    cfg: FinetuneConfig
    model: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device
    precision: str = "32-true"

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.meta["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def spatial_dims(self) -> int:
        """3 for a run fine-tuned on volumes; a checkpoint without the key is 2D."""
        return int(self.meta.get("spatial_dims", 2))

    @property
    def roi_size(self) -> tuple[int, ...] | None:
        """The training crop of a 3D run, the sliding window of its inference; None in 2D."""
        roi = self.meta.get("roi_size")
        return tuple(int(s) for s in roi) if roi is not None else None


ACCELERATORS = ("auto", "cpu", "cuda")


def inference_device(cfg: FinetuneConfig | None = None, accelerator: str | None = None) -> torch.device:
    """Where inference runs. `accelerator` None: the run's own, a GPU when it trained on one and one is here; "auto":
    a GPU when one is here; "cpu"; "cuda" (or "gpu", as training names it), refused when no GPU is here."""
    if accelerator is None:
        if cfg is not None and cfg.train.accelerator == "cpu":
            return torch.device("cpu")
        accelerator = "auto"
    name = "cuda" if accelerator == "gpu" else accelerator
    if name not in ACCELERATORS:
        raise AhmError(f"--accelerator {accelerator}: choose {', '.join(ACCELERATORS[:-1])} or {ACCELERATORS[-1]}")
    if name == "cuda" and not torch.cuda.is_available():
        raise AhmError(f"--accelerator {accelerator}: no CUDA GPU is available here; use --accelerator cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def inference_precision(cfg: FinetuneConfig, device: torch.device, precision: str | None = "32-true") -> str:
    """The precision inference runs in on `device`: `precision` (refused in one line where training would refuse
    it), or with None the run's own `train.precision` on a GPU (its bf16-true as bf16-mixed: the weights are loaded
    in float32) and 32-true on the CPU. A GPU run's mixed precision is no gain on a CPU: processors without bfloat16
    units emulate it (a UNet's bf16-mixed forward pass took 25 to 35 times as long as float32's on a 2-core x86
    server CPU); float16 autocast is refused there."""
    from ahm.eval.inference import check_precision

    if precision is not None:
        return check_precision(precision, device)
    if device.type == "cpu":
        return "32-true"
    return check_precision({"32": "32-true", "bf16-true": "bf16-mixed"}.get(cfg.train.precision,
                                                                            cfg.train.precision), device)


def load_run(run_dir: str | Path, checkpoint: str = BEST, *, accelerator: str | None = None,
             precision: str | None = "32-true") -> LoadedRun:
    """Rebuild the segmenter of a fine-tuning run from its config.yaml and `checkpoints/<checkpoint>`, on the device
    `inference_device(cfg, accelerator)` picks, to run in `inference_precision(cfg, device, precision)`."""
    from ahm.models import build_segmenter

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AhmError(f"{run_dir}: run directory not found")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise AhmError(f"{run_dir}: not a fine-tuning run directory (no config.yaml)")
    cfg = load_config(FinetuneConfig, cfg_path)
    # refused before the weights are read: a wrong option costs nothing
    device = inference_device(cfg, accelerator)
    precision = inference_precision(cfg, device, precision)
    path = run_dir / "checkpoints" / checkpoint
    if not path.is_file():
        raise AhmError(f"{path}: not found; the fine-tuning run has not finished an epoch yet "
                       f"(resume it with `ahm finetune ... --resume`)")
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise AhmError(f"{path}: not an ahm fine-tuning checkpoint")
    meta = dict(ckpt["meta"])
    spatial_dims = int(meta.get("spatial_dims", 2))
    if spatial_dims != cfg.data.spatial_dims:
        raise AhmError(f"{path}: the checkpoint is {spatial_dims}D but {cfg_path} says data.spatial_dims "
                       f"{cfg.data.spatial_dims}")
    if spatial_dims == 3:
        roi = meta.get("roi_size")
        if not isinstance(roi, (list, tuple)) or len(roi) != 3 or not all(int(s) >= 1 for s in roi):
            raise AhmError(f"{path}: a 3D checkpoint needs roi_size [D, H, W] in its metadata, got {roi!r}")
        roi = tuple(int(s) for s in roi)
        # A cubic crop goes in as one side, the form every backbone accepts; otherwise the tuple (UNETR per axis).
        size = roi[0] if len(set(roi)) == 1 else roi
        model = build_segmenter(meta["segmenter"], cfg.model, size, int(meta["in_channels"]),
                                int(meta["num_classes"]), spatial_dims=3)
    else:
        model = build_segmenter(meta["segmenter"], cfg.model, int(meta["image_size"]), int(meta["in_channels"]),
                                int(meta["num_classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise AhmError(f"{path}: weights do not match the model described by {cfg_path} ({first})") from exc
    model.to(device).eval()
    meta.update({"epoch": ckpt.get("epoch"), "val_dice": ckpt.get("val_dice")})
    return LoadedRun(run_dir, cfg, model, meta, device, precision)


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


def check_spatial_dims(run: LoadedRun, spatial_dims: int | None) -> None:
    """Refuse `--spatial-dims` that is not the run's own (None: take the run's)."""
    if spatial_dims is not None and int(spatial_dims) != run.spatial_dims:
        what = "volumes (3D)" if run.spatial_dims == 3 else "2D images"
        raise AhmError(f"--spatial-dims {spatial_dims}: the run in {run.run_dir} was fine-tuned on {what}; "
                       f"use --spatial-dims {run.spatial_dims} or leave the option out")


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


def check_overlap(overlap: float) -> float:
    """Refuse a sliding-window `--overlap` outside [0, 1) before any volume is read or any file written."""
    if not 0.0 <= float(overlap) < 1.0:
        raise AhmError(f"--overlap {overlap}: the share of a window shared with its neighbour must be in [0, 1)")
    return float(overlap)


def volume_grid_description(data_cfg) -> str:
    """Where a 3D run's predictions are scored, in words for metrics.json and the report."""
    spacing = ("each volume's own spacing" if data_cfg.spacing is None
               else "spacing " + "x".join(f"{float(s):g}" for s in data_cfg.spacing) + " mm")
    return (f"preprocessed grid ({data_cfg.orientation}, {spacing}, zero-padded to at least the crop "
            f"{'x'.join(str(int(s)) for s in data_cfg.crop_size)}); predictions are scored there, not mapped back "
            f"to each input's own grid")


def _volume_cases(shown: list[dict[str, np.ndarray]], ids: list[str], has_fg: np.ndarray,
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


def _evaluate_volumes(loaded: LoadedRun, data_path: Path, split: str, empty: str, overlap: float) -> dict[str, Any]:
    """`evaluate` for a 3D run: whole preprocessed volumes, sliding windows of the crop, HD95 in mm."""
    from ahm.data import open_dataset
    from ahm.data.volumes import preprocessed_spacing, volume_dataset

    run_dir, cfg, roi = loaded.run_dir, loaded.cfg, loaded.roi_size
    data_cfg = cfg.data.model_copy(update={"path": str(data_path), "channels": loaded.in_channels,
                                           "crop_size": roi})
    index = open_dataset(data_path, data_cfg)
    if not index.has_labels:
        raise AhmError(f"{data_path}: no masks found; evaluation needs ground-truth masks")
    ids = _split_ids(run_dir, index, cfg, split)
    if not ids:
        raise AhmError(f"{data_path}: the {split} split is empty; try --split val or --split all")
    dataset = volume_dataset(index, ids, data_cfg, labels=True, train=False)
    # the smallest integer type that holds the classes: a split's label maps are all held until scoring
    dtype = np.uint8 if loaded.num_classes <= 256 else np.int16 if loaded.num_classes < 2**15 else np.int32
    preds, labels, spacings, shapes, shown = [], [], [], [], []
    for i in range(len(dataset)):
        sample = preprocessed(dataset.__getitem__, i)
        image = sample["image"]
        label = np.rint(sample["label"].as_tensor().numpy()[0])
        if label.size and int(label.max()) >= loaded.num_classes:
            raise AhmError(f"{dataset.items[i].mask}: ground-truth labels go up to {int(label.max())} but the model "
                           f"predicts {loaded.num_classes} classes (0..{loaded.num_classes - 1}); was it trained on "
                           f"another label set?")
        label = label.astype(dtype)
        pred = predict_volume_labels(loaded.model, [image.as_tensor()], roi, overlap=overlap,
                                     device=loaded.device, precision=loaded.precision)[0].astype(dtype)
        preds.append(pred)
        labels.append(label)
        spacings.append(preprocessed_spacing(sample))
        shapes.append(tuple(int(s) for s in label.shape))
        shown.append(display_slice(image.as_tensor().numpy(), label, pred))
    names = class_names(loaded.num_classes, index.class_names)
    item_ids = [item.id for item in dataset.items]
    volume_level, per_case = volume_scores(preds, labels, loaded.num_classes, spacings, names, empty, ids=item_ids)
    for row, shape, spacing in zip(volume_level["per_volume"], shapes, spacings):
        row.update({"shape": list(shape), "spacing_mm": list(spacing)})
    means = case_means(per_case)
    metrics: dict[str, Any] = {"level": "volume", **{key: volume_level.get(key) for key in LEVEL_KEYS}}
    metrics.update({
        "n_images": len(ids), "n_volumes": len(ids), "split": split, "class_names": names, "spatial_dims": 3,
        "grid": volume_grid_description(data_cfg), "hd95_unit": volume_level["hd95_unit"],
        "empty_cases": empty, "empty_masks": EMPTY_DESCRIPTION[empty],
        "sliding_window": {"roi_size": list(roi), "overlap": float(overlap), "mode": "gaussian"},
        "inference": inference_setting(loaded), "per_case_csv": "per_volume.csv", "volume_level": volume_level,
        "data": str(data_path), "checkpoint": f"checkpoints/{BEST}", "checkpoint_epoch": loaded.meta.get("epoch"),
        "skipped_files": list(index.problems),
    })
    out_dir = run_dir / "eval" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "per_volume.csv", per_volume_csv(item_ids, [item.subject for item in dataset.items],
                                                           shapes, spacings, per_case, means, names))
    has_fg = np.array([bool((lab > 0).any()) for lab in labels], dtype=bool)
    cases = _volume_cases(shown, item_ids, has_fg, np.nan_to_num(means["dice"], nan=0.0))
    buf = _io.BytesIO()
    np.savez_compressed(buf, **cases)
    from ahm.io import write_bytes

    write_bytes(out_dir / "cases.npz", buf.getvalue())
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _split_ids(run_dir: Path, index, cfg, split: str) -> list[str]:
    """Ids of `split`: the run's own splits.json when it describes this dataset, else fresh splits of it."""
    import json

    from ahm.data import make_splits

    known = {item.id for item in index.items}
    if split == "all":
        return [item.id for item in index.items]
    saved = run_dir / "splits.json"
    splits = None
    if saved.is_file():
        try:
            candidate = json.loads(saved.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AhmError(f"{saved}: unreadable ({exc})") from exc
        listed = [i for ids in candidate.values() if isinstance(ids, list) for i in ids]
        if listed and all(i in known for i in listed):
            splits = candidate
    if splits is None:
        # Another dataset than the one trained on: split it the same way (subjects never straddle splits).
        splits = make_splits(index, cfg.data)
    if split not in splits:
        raise AhmError(f"--split {split}: unknown split; choose train, val, test or all")
    return list(splits[split])


def inference_setting(loaded: LoadedRun) -> dict[str, str]:
    """How the predictions were made, as metrics.json records it."""
    return {"device": loaded.device.type, "precision": loaded.precision}


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, split: str = "test", batch_size: int = 32,
             report: bool = True, progress: bool = False, empty: str = "exclude", overlap: float = 0.5,
             spatial_dims: int | None = None, precision: str | None = "32-true",
             accelerator: str | None = None) -> dict[str, Any]:
    """Score the run's best checkpoint on `split` of `data_dir` (default: the data it was trained on).
    `empty`: "exclude" (default) leaves cases where a class is absent from prediction and ground truth out of the
    per-case means; "one" scores them 1 (the convention of some papers; named in the output).
    A 3D run is scored on whole volumes by sliding windows of its crop overlapping by `overlap` (see the module
    doc); `spatial_dims`, when given, must be the run's. `precision` and `accelerator`: see `load_run` (None: the
    run's own settings, as `ahm evaluate` does by default).

    Writes eval/<split>/metrics.json, per_image.csv (3D: per_volume.csv) and cases.npz into the run directory,
    refreshes report.html, and returns the metrics.
    """
    from ahm.data import load_arrays, open_dataset

    check_empty(empty)
    run_dir = Path(run_dir)
    loaded = load_run(run_dir, accelerator=accelerator, precision=precision)
    check_spatial_dims(loaded, spatial_dims)
    cfg = loaded.cfg
    data_path = Path(data_dir) if data_dir is not None else (Path(cfg.data.path) if cfg.data.path else None)
    if data_path is None:
        raise AhmError("--data: no dataset given and the run's config records none")
    if loaded.spatial_dims == 3:
        metrics = _evaluate_volumes(loaded, data_path, split, empty, check_overlap(overlap))
        if report:
            from ahm.eval.report import write_report

            write_report(run_dir)
        return metrics
    data_cfg = cfg.data.model_copy(update={"path": str(data_path), "channels": loaded.in_channels,
                                           "image_size": loaded.image_size})
    index = open_dataset(data_path, data_cfg)
    if not index.has_labels:
        raise AhmError(f"{data_path}: no masks found; evaluation needs ground-truth masks")
    ids = _split_ids(run_dir, index, cfg, split)
    if not ids:
        raise AhmError(f"{data_path}: the {split} split is empty; try --split val or --split all")
    arrays = load_arrays(index, ids, data_cfg, labels=True)
    preds = predict_labels(loaded.model, arrays.images, batch_size=batch_size, device=loaded.device,
                           precision=loaded.precision)
    metrics = score_arrays(run_dir / "eval" / split, preds, arrays.labels, arrays.images, arrays.ids,
                           arrays.items, loaded.num_classes, split, empty=empty,
                           names=class_names(loaded.num_classes, index.class_names),
                           spacing=arrays.spacing, slice_mm=arrays.slice_mm,
                           extra={"data": str(data_path), "checkpoint": f"checkpoints/{BEST}",
                                  "checkpoint_epoch": loaded.meta.get("epoch"),
                                  "inference": inference_setting(loaded),
                                  "skipped_files": list(arrays.problems)})
    if report:
        from ahm.eval.report import write_report

        write_report(run_dir)
    return metrics
