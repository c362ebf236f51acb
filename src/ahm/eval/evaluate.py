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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ahm.config import FinetuneConfig, load_config
from ahm.errors import AhmError
from ahm.eval.metrics import check_empty

# Scoring and label prediction live in `ahm.eval.scoring` (the 2D and 3D pipelines score through it); these names
# stay importable from here, where callers have always found them.
from ahm.eval.scoring import (
    LEVEL_KEYS,
    N_CASES,
    check_overlap,
    image_spacings,
    inference_setting,
    leveled_scores,
    predict_labels,
    predict_volume_labels,
    preprocessed,
    score_arrays,
    volume_grid_description,
)
from ahm.io import load_torch
from ahm.runformat import run_file

__all__ = ["BEST", "LEVEL_KEYS", "N_CASES", "LoadedRun", "check_overlap", "check_spatial_dims", "evaluate",
           "image_spacings", "inference_device", "inference_precision", "inference_setting", "leveled_scores",
           "load_run", "predict_labels", "predict_volume_labels", "preprocessed", "score_arrays",
           "volume_grid_description"]

BEST = "best.ckpt"


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
    from ahm.pipeline import for_dims

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
    ckpt = load_torch(run_file(run_dir, f"checkpoints/{checkpoint}"))
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise AhmError(f"{path}: not an ahm fine-tuning checkpoint")
    meta = dict(ckpt["meta"])
    spatial_dims = int(meta.get("spatial_dims", 2))
    if spatial_dims != cfg.data.spatial_dims:
        raise AhmError(f"{path}: the checkpoint is {spatial_dims}D but {cfg_path} says data.spatial_dims "
                       f"{cfg.data.spatial_dims}")
    from ahm.models import backbone_of_segmenter

    model = for_dims(spatial_dims).build_segmenter(meta, cfg.model, path)
    backbone_of_segmenter(meta["segmenter"]).check_segmenter_record(cfg.model, spatial_dims, meta, path)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise AhmError(f"{path}: weights do not match the model described by {cfg_path} ({first})") from exc
    model.to(device).eval()
    meta.update({"epoch": ckpt.get("epoch"), "val_dice": ckpt.get("val_dice")})
    return LoadedRun(run_dir, cfg, model, meta, device, precision)


def check_spatial_dims(run: LoadedRun, spatial_dims: int | None) -> None:
    """Refuse `--spatial-dims` that is not the run's own (None: take the run's)."""
    from ahm.pipeline import pipeline_for

    if spatial_dims is not None and int(spatial_dims) != run.spatial_dims:
        raise AhmError(f"--spatial-dims {spatial_dims}: the run in {run.run_dir} was fine-tuned on "
                       f"{pipeline_for(run).trained_on}; use --spatial-dims {run.spatial_dims} or leave the "
                       f"option out")


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


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, split: str = "test", batch_size: int = 32,
             report: bool = True, progress: bool = False, empty: str = "exclude", overlap: float = 0.5,
             spatial_dims: int | None = None, precision: str | None = "32-true",
             accelerator: str | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Score the run's best checkpoint on `split` of `data_dir` (default: the data it was trained on).
    `empty`: "exclude" (default) leaves cases where a class is absent from prediction and ground truth out of the
    per-case means; "one" scores them 1 (the convention of some papers; named in the output).
    A 3D run is scored on whole volumes by sliding windows of its crop overlapping by `overlap` (see the module
    doc); `spatial_dims`, when given, must be the run's. `precision` and `accelerator`: see `load_run` (None: the
    run's own settings, as `ahm evaluate` does by default).

    Writes eval/<split>/metrics.json, per_image.csv (3D: per_volume.csv) and cases.npz into the run directory,
    refreshes report.html, and returns the metrics. With `out`, those files go into the folder `out` instead and
    report.html is left alone; the run directory may then be read-only (an old one is read through an upgraded
    temporary copy; a writable one of an older format is upgraded in place, as every command does).
    """
    from ahm.data import open_dataset
    from ahm.pipeline import pipeline_for

    check_empty(empty)
    run_dir = Path(run_dir)
    if out is not None:  # before any inference: a folder that cannot be made is refused first
        if Path(out).exists() and not Path(out).is_dir():
            raise AhmError(f"--out {out}: exists and is not a folder")
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AhmError(f"--out {out}: cannot be made ({exc.strerror or exc})") from exc
    loaded = load_run(run_dir, accelerator=accelerator, precision=precision)
    check_spatial_dims(loaded, spatial_dims)
    pipeline = pipeline_for(loaded)
    cfg = loaded.cfg
    data_path = Path(data_dir) if data_dir is not None else (Path(cfg.data.path) if cfg.data.path else None)
    if data_path is None:
        raise AhmError("--data: no dataset given and the run's config records none")
    overlap = pipeline.check_overlap(overlap)
    data_cfg = pipeline.evaluation_config(loaded, data_path)
    index = open_dataset(data_path, data_cfg)
    if not index.has_labels:
        raise AhmError(f"{data_path}: no masks found; evaluation needs ground-truth masks")
    ids = _split_ids(run_dir, index, cfg, split)
    if not ids:
        raise AhmError(f"{data_path}: the {split} split is empty; try --split val or --split all")
    out_dir = run_dir / "eval" / split if out is None else Path(out)
    metrics = pipeline.score_split(loaded, index, ids, data_cfg, out_dir, split, empty, overlap,
                                   batch_size, {"data": str(data_path), "checkpoint": f"checkpoints/{BEST}",
                                                "checkpoint_epoch": loaded.meta.get("epoch")})
    if report and out is None:
        from ahm.eval.report import write_report

        write_report(run_dir)
    return metrics
