"""Segmenting one input file with a loaded run and writing its mask: a 2D image (PNG mask), a volume cut into
slices for a 2D run, or a whole volume for a 3D run (NIfTI label volume on the input's grid). `ahm.eval.predict`
plans the files and the 2D or 3D pipeline (`ahm.pipeline`) picks which of these each one takes.
"""

from __future__ import annotations

import gzip
import io as _io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ahm.errors import AhmError
from ahm.eval.render import display_slice, overlay_rgb
from ahm.eval.scoring import predict_labels, predict_volume_labels, preprocessed
from ahm.io import write_bytes

if TYPE_CHECKING:
    from ahm.eval.evaluate import LoadedRun

VOLUME_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Job:
    source: Path
    volume: bool
    mask_out: Path
    overlay_out: Path | None
    error: str | None = None


def looks_dicom_dir(path: Path) -> bool:
    for child in sorted(path.iterdir()):
        if child.name.startswith(".") or not child.is_file():
            continue
        if child.suffix.lower() == ".dcm":
            return True
        try:
            with open(child, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:132] == b"DICM":
            return True
    return False


def _modality(run: LoadedRun, volume: bool, path: Path) -> tuple[str, str | None]:
    """The normalisation rule training used for this kind of input (mirrors ahm.data.load_arrays)."""
    cfg = run.cfg.data
    if cfg.modality != "auto":
        return cfg.modality, None
    if run.meta.get("index_modality"):
        return str(run.meta["index_modality"]), None
    if volume:
        return "mri", None
    from ahm.data.formats import read_image_info

    try:
        return "auto", read_image_info(path).dtype
    except AhmError:
        return "auto", None


def _check_channels(run: LoadedRun, path: Path, channels: int) -> None:
    if channels != run.in_channels:
        want = "greyscale" if run.in_channels == 1 else ("RGB" if run.in_channels == 3 else f"{run.in_channels}-channel")
        raise AhmError(f"{path}: has {channels} channel(s) but the model in {run.run_dir} was trained on "
                       f"{run.in_channels}; convert it to {want} first")


def _prepare(run: LoadedRun, image: np.ndarray, modality: str, source_dtype: str | None) -> tuple[np.ndarray, np.ndarray]:
    from ahm.data.preprocess import normalize, resize_image

    norm = normalize(image.astype(np.float32, copy=False), modality, ct_window=run.cfg.data.ct_window,
                     source_dtype=source_dtype)
    return norm, resize_image(norm, run.image_size)


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _mask_png(mask: np.ndarray, num_classes: int) -> bytes:
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return _png_bytes(np.ascontiguousarray(mask.astype(dtype)))


def _label_dtype(top: int) -> type:
    return np.uint8 if top < 256 else np.int16 if top < 2**15 else np.int32


def _nifti_reference(reference):
    """(header or None, affine, spatial shape or None) of what a mask is written for."""
    import nibabel as nib

    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.name.lower().endswith(VOLUME_SUFFIXES):
            raise AhmError(f"{path}: a mask's reference must be a NIfTI file (.nii, .nii.gz); for another format "
                           f"pass the affine that ahm.data.formats.read_volume returns")
        try:
            reference = nib.load(str(path))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on a damaged header
            raise AhmError(f"{path}: not a readable NIfTI file ({str(exc)[:120]})") from exc
    if isinstance(reference, nib.Nifti1Image):  # Nifti2Image is one too
        shape = tuple(int(n) for n in reference.shape[:3])
        return reference.header.copy(), np.asarray(reference.affine, dtype=np.float64), shape + (1,) * (3 - len(shape))
    affine = np.asarray(reference, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise AhmError(f"mask reference: expected a NIfTI path or image, or a finite 4x4 affine; got {affine.shape}")
    return None, affine, None


def write_nifti_mask(mask: np.ndarray, reference, out: str | Path) -> Path:
    """Write the label map `mask` [X, Y, Z] (class indices) as NIfTI at `out` (gzip for .nii.gz), atomically.

    reference: the input volume as a NIfTI path or nibabel image, whose header is kept (affine, qform and sform
    with their codes, units, voxel order) so the mask overlays it in any viewer; its shape must be the
    reference's spatial shape. For inputs read from another format (DICOM, NRRD) pass their 4x4 voxel-to-RAS
    affine. Data are stored unscaled as uint8 (int16, int32 for more classes), intent "label".
    """
    import nibabel as nib

    header, affine, shape = _nifti_reference(reference)
    labels = np.asarray(mask)
    if labels.dtype.kind not in "iub":
        raise AhmError(f"{out}: a mask must hold integer class indices, got {labels.dtype}")
    if shape is not None and tuple(labels.shape) != shape:
        raise AhmError(f"{out}: mask shape {tuple(labels.shape)} does not match its reference volume {shape}")
    if labels.ndim != 3:
        raise AhmError(f"{out}: a volume mask must be [X, Y, Z], got shape {tuple(labels.shape)}")
    top = int(labels.max(initial=0))
    if labels.size and int(labels.min()) < 0:
        raise AhmError(f"{out}: mask has negative values; labels must be 0, 1, 2, ...")
    dtype = _label_dtype(top)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(np.ascontiguousarray(labels.astype(dtype)), affine, header)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(None, None)  # a scaled reference (scl_slope) must not rescale class indices
    img.header.set_intent("label")
    img.header["cal_min"], img.header["cal_max"] = 0, top
    if header is None:
        img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    out = Path(out)
    return write_bytes(out, gzip.compress(data, compresslevel=6) if out.name.lower().endswith(".gz") else data)


class Batcher:
    """Collects 2D model inputs across files so the network always sees full batches.

    Finished 2D masks are written by a small thread pool: encoding and the fsync of each atomic write overlap
    with the next batch's compute instead of adding to it.
    """

    def __init__(self, run: LoadedRun, batch_size: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.run, self.batch_size = run, batch_size
        self.pending: list[tuple[np.ndarray, Callable[[np.ndarray], None]]] = []
        self.slices = 0
        self.seconds = 0.0
        self.writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ahm-predict-write")

    def close(self) -> None:
        self.flush()
        self.writer.shutdown(wait=True)

    def add(self, x: np.ndarray, done: Callable[[np.ndarray], None]) -> None:
        self.pending.append((x, done))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        t0 = time.perf_counter()
        preds = predict_labels(self.run.model, np.stack([x for x, _ in batch]), batch_size=self.batch_size,
                               device=self.run.device, precision=self.run.precision)
        self.seconds += time.perf_counter() - t0
        self.slices += len(batch)
        for pred, (_, done) in zip(preds, batch):
            done(pred)


def predict_image(run: LoadedRun, job: Job, batcher: Batcher) -> None:
    from ahm.data.formats import read_image
    from ahm.data.preprocess import undo_resize

    image = read_image(job.source, max_pixels=run.cfg.data.max_pixels)
    _check_channels(run, job.source, image.shape[0])
    modality, source_dtype = _modality(run, False, job.source)
    norm, x = _prepare(run, image, modality, source_dtype)
    hw = (int(image.shape[1]), int(image.shape[2]))

    def write(pred: np.ndarray) -> None:
        try:
            mask = undo_resize(pred, hw)
            write_bytes(job.mask_out, _mask_png(mask, run.num_classes))
            if job.overlay_out is not None:
                write_bytes(job.overlay_out, _png_bytes(overlay_rgb(norm, mask)))
        except Exception as exc:  # noqa: BLE001  (reported as this input's failure, never lost in the thread)
            job.error = str(exc) if isinstance(exc, AhmError) else f"{job.mask_out}: could not write ({exc})"

    # Runs when the batch holding this image is predicted, possibly while another input is being read.
    batcher.add(x, lambda pred: batcher.writer.submit(write, pred))


def predict_slices(run: LoadedRun, job: Job, batcher: Batcher) -> None:
    from ahm.data.formats import read_volume
    from ahm.data.preprocess import undo_resize, volume_slice

    if job.source.is_dir() and not looks_dicom_dir(job.source):
        raise AhmError(f"{job.source}: no images, volumes or DICOM files in this folder")
    vol = read_volume(job.source)
    data = vol.data
    channels = 1 if data.ndim == 3 else int(data.shape[3])
    _check_channels(run, job.source, channels)
    axis = int(run.meta["slice_axis"])
    modality, _ = _modality(run, True, job.source)
    # Slices of one volume go through the model together; pending 2D inputs go first so order is kept.
    batcher.flush()
    planes, norms, hw = [], [], None
    for i in range(data.shape[axis]):
        norm, x = _prepare(run, volume_slice(data, axis, i), modality, None)
        hw = (int(norm.shape[1]), int(norm.shape[2]))
        planes.append(x)
        if job.overlay_out is not None:
            norms.append(norm)
    preds: list[np.ndarray] = []
    for x in planes:
        batcher.add(x, preds.append)
    batcher.flush()
    labels = np.stack([undo_resize(p, hw) for p in preds], axis=axis)
    if labels.shape != data.shape[:3]:
        raise AhmError(f"{job.source}: internal error: predicted shape {labels.shape} != volume {data.shape[:3]}")
    # A NIfTI input lends its own header (qform/sform codes, units); other formats only their affine.
    nifti = job.source.is_file() and job.source.name.lower().endswith(VOLUME_SUFFIXES)
    write_nifti_mask(labels, job.source if nifti else vol.affine, job.mask_out)
    if job.overlay_out is not None:
        fg = [(int((np.take(labels, i, axis=axis) > 0).sum()), i) for i in range(labels.shape[axis])]
        best = max(fg)[1] if fg else 0
        write_bytes(job.overlay_out, _png_bytes(overlay_rgb(norms[best], np.take(labels, best, axis=axis))))


def predict_volume(run: LoadedRun, job: Job, overlap: float) -> float:
    """One volume through a 3D run: preprocess as in training, sliding windows of the crop, labels mapped back
    onto the input's grid and written with its affine. Returns the seconds the network took."""
    import torch

    from ahm.data.volumes import IMAGE, input_grid, invert_prediction, preprocess_volumes

    if job.source.is_dir() and not looks_dicom_dir(job.source):
        raise AhmError(f"{job.source}: no volumes or DICOM files in this folder")
    modality, _ = _modality(run, True, job.source)
    data_cfg = run.cfg.data.model_copy(update={"channels": run.in_channels, "crop_size": run.roi_size})
    preprocess = preprocess_volumes(data_cfg, modality)
    sample = preprocessed(preprocess, {IMAGE: job.source})
    image = sample[IMAGE]
    t0 = time.perf_counter()
    pred = predict_volume_labels(run.model, [image.as_tensor()], run.roi_size, overlap=overlap,
                                 device=run.device, precision=run.precision)[0]
    seconds = time.perf_counter() - t0
    back = invert_prediction(torch.from_numpy(pred)[None].float(), sample, preprocess, nearest=True)
    labels = np.rint(back.as_tensor().numpy()[0]).astype(np.int64)
    affine, shape = input_grid(sample)
    if tuple(labels.shape) != shape:
        raise AhmError(f"{job.source}: internal error: mapped-back mask {labels.shape} != volume {shape}")
    # A NIfTI input lends its own header (qform/sform codes, units); other formats only their affine.
    nifti = job.source.is_file() and job.source.name.lower().endswith(VOLUME_SUFFIXES)
    write_nifti_mask(labels, job.source if nifti else affine, job.mask_out)
    if job.overlay_out is not None:
        shown = display_slice(image.as_tensor().numpy(), pred, pred)
        write_bytes(job.overlay_out, _png_bytes(overlay_rgb(shown["image"], shown["pred"])))
    return seconds

