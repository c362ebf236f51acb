"""Segment new images with a fine-tuned run: PNG masks for 2D files, NIfTI label volumes for volumes.

Preprocessing repeats what training did (`ahm.data.load_arrays`): intensities normalised by the run's modality
rule, resized to the model grid keeping the aspect ratio. Masks are mapped back to each input's own size
(`undo_resize`); a volume's mask has the input's shape and affine. Mask values are class indices (0 background).

A run fine-tuned on volumes (`spatial_dims` 3) segments each volume whole: preprocessed as in training
(`ahm.data.volumes.preprocess_volumes`), predicted by sliding windows of the training crop, and the label map
mapped back onto the input's grid (`invert_prediction`, nearest): the NIfTI mask has the input's shape, affine
and voxel order. It takes volumes only; a 2D file is refused before anything is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ahm.errors import AhmError
from ahm.eval.evaluate import check_spatial_dims, load_run

# The per-file prediction and mask writing live in `ahm.eval.predict_files` (the 2D and 3D pipelines call them);
# these names stay importable from here.
from ahm.eval.predict_files import VOLUME_SUFFIXES, Batcher, Job, looks_dicom_dir, write_nifti_mask
from ahm.pipeline import pipeline_for

__all__ = ["VOLUME_SUFFIXES", "predict", "write_nifti_mask"]


def _image_suffixes() -> tuple[str, ...]:
    """2D formats, and DICOM/NRRD/MetaImage files (an image or a volume, as their header says)."""
    from ahm.data.formats import HEADER_KIND_SUFFIXES, IMAGE_SUFFIXES

    return tuple(IMAGE_SUFFIXES) + tuple(HEADER_KIND_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES + _image_suffixes():
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _is_volume(path: Path) -> bool:
    from ahm.data.formats import is_volume_file

    if path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES):
        return True
    try:
        return path.is_file() and is_volume_file(path)  # multi-frame DICOM, 3D NRRD/MetaImage
    except AhmError:
        return False  # read as an image, which then fails with this file's one-line error


def _expand(inputs: list[Path]) -> list[Path]:
    """A folder of DICOM files is one volume; any other folder stands for the images and volumes in it."""
    out: list[Path] = []
    for path in inputs:
        path = Path(path)
        if path.is_dir() and not looks_dicom_dir(path):
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.name.lower().endswith(VOLUME_SUFFIXES + _image_suffixes()))
            out.extend(found if found else [path])  # an empty folder fails below, with its name
        else:
            out.append(path)
    return out


def _plan(inputs: list[Path], out_dir: Path, overlay: bool) -> list[Job]:
    jobs, taken = [], set()
    for path in _expand(inputs):
        stem = _stem(path)
        name, n = stem, 1
        while name in taken:  # two inputs with one name (different folders): keep both
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        volume = _is_volume(path)
        mask_out = out_dir / (f"{name}_mask.nii.gz" if volume else f"{name}_mask.png")
        jobs.append(Job(path, volume, mask_out, out_dir / f"{name}_overlay.png" if overlay else None))
    return jobs


def predict(run_dir: str | Path, inputs: list[Path], out_dir: str | Path, overlay: bool = False,
            force: bool = False, batch_size: int = 32, overlap: float = 0.5,
            spatial_dims: int | None = None, precision: str | None = "32-true",
            accelerator: str | None = None) -> dict[str, Any]:
    """Segment each input; an unreadable input is listed in `failures` and the rest still run.

    Nothing in `out_dir` is overwritten without `force`. A 3D run takes volumes only (a 2D file is refused, naming
    it, before anything is written) and predicts by sliding windows overlapping by `overlap`; `spatial_dims`,
    when given, must be the run's. `precision` and `accelerator`: see `ahm.eval.evaluate.load_run` (None: the run's
    own settings, as `ahm predict` does by default). Returns counts, outputs, failures, slices/s (3D: volumes and
    volumes/s), and the device and precision the network ran in.
    """
    run = load_run(run_dir, accelerator=accelerator, precision=precision)
    check_spatial_dims(run, spatial_dims)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AhmError(f"--out {out_dir}: exists and is not a directory")
    if not inputs:
        raise AhmError("no inputs given")
    jobs = _plan([Path(p) for p in inputs], out_dir, overlay)
    pipeline = pipeline_for(run)
    pipeline.check_inputs(run, jobs, overlap)
    existing = [p for job in jobs for p in (job.mask_out, job.overlay_out) if p is not None and p.exists()]
    if existing and not force:
        raise AhmError(f"{existing[0]}: already exists ({len(existing)} output file(s) in {out_dir} would be "
                       f"overwritten); use --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    batcher = Batcher(run, batch_size)
    volumes = 0
    for job in jobs:
        try:
            pipeline.predict_file(run, job, batcher, overlap)
            volumes += 1
        except AhmError as exc:
            job.error = str(exc)
    batcher.close()
    total_s = time.perf_counter() - t_start
    failures = [job.error for job in jobs if job.error is not None]
    outputs = [str(job.mask_out) for job in jobs if job.error is None]
    result = {
        "n_inputs": len(jobs), "n_ok": len(outputs), "n_failed": len(failures), "failures": failures,
        "outputs": outputs, "out_dir": str(out_dir), "slices": batcher.slices,
        "model_s": batcher.seconds, "total_s": total_s,
        "slices_per_s": batcher.slices / total_s if total_s > 0 else 0.0,
        "device": run.device.type, "precision": run.precision,
    }
    result.update(pipeline.prediction_fields(run, volumes, total_s, overlap))
    return result

