"""Simulated brain MRI subjects, each with its own anatomy and scan, from the MNI152 2009 template in nilearn.

No real multi-subject labelled brain set can be installed offline, so this is the nearest honest substitute:
**every subject is simulated** from one template. Subject k gets, from its own random stream (seed, k):

- anatomy: a random affine (rotation, per-axis scale, shift) and a smooth, large-scale nonlinear 3D
  deformation (a coarse grid of random displacements, interpolated by cubic splines); the T1 image and the
  grey/white/CSF probability maps are warped by the same field, so labels stay aligned with the image;
- contrast: a random smooth monotone remapping of the template's T1 intensities, or (for a share of
  subjects) a SynthSeg-style contrast: per tissue class (CSF, grey, white matter) a Gaussian intensity drawn
  from random means and spreads, so grey may be brighter than white matter as in other MR sequences;
- scan: a smooth multiplicative bias field, an in-plane blur (resolution), and Rician-like noise.

Labels: 0 background, 1 grey matter, 2 white matter (the larger warped probability, when >= 0.5), decided on
the written pixel grid. Each subject contributes `slices_per_axis` slices along each of the three axes, written
in the `folder` layout (`images/`, `masks/`, `splits.json`, `labels.json`); the stem `subNNNNN__<axis><j>` makes the subject
the split unit: the first test subjects go to test, the next val ones to val, the rest to train. Subjects are
independent draws, so taking them in order is a random split, and a larger set keeps the same val, test and
first training subjects (the corpus-size axis of `ahm bench curve` depends on that).

Generation is lazy and per subject: `BrainSimulator.subject(k)` builds subject k alone, in well under a second,
and is what a full run writes for it; only the needed slice planes are sampled. `BrainSimulator.volume(k)`
samples the whole grid instead (the same warp field and contrast functions on every voxel, in chunks), and
`prepare_brain_subject_volumes` writes whole NIfTI volumes in the Decathlon layout for `data.spatial_dims: 3`:
the same subjects, ids and split sides as the slice set of the same seed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ahm.datasets.brain_demo import (
    LABELS,
    save_png,
    swap_into_place,
)
from ahm.datasets.brain_simulator import (  # the simulator's names, importable from here as before
    AXIS_LETTERS,
    BrainSimulator,
    SimulationSettings,
    check_grid,
)
from ahm.errors import AhmError

MARKER = "brain_subjects.json"
KIND = "ahm-brain-subjects"
MONTAGE = "montage.png"


def subject_sides(n: int, val: int | None = None, test: int | None = None) -> list[str]:
    """Split of subjects 0..n-1: the first `test` to test, the next `val` to val, the rest to train
    (defaults: 15% each, at least one when there are three subjects or more)."""
    def share(count: int | None) -> int:
        if count is not None:
            return count
        return max(1, round(0.15 * n)) if n >= 3 else 0

    n_test, n_val = share(test), share(val)
    if n_test < 0 or n_val < 0 or n_test + n_val > n - 1:
        raise AhmError(f"--val-subjects {n_val} and --test-subjects {n_test} leave no training subject "
                       f"out of --subjects {n}")
    return ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)


def _is_previous(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


_COLOURS = np.array([[0, 0, 0], [230, 120, 40], [60, 160, 230]], dtype=np.uint8)


def montage(subjects: list[dict[str, Any]], n_per_axis: int) -> np.ndarray:
    """RGB rows of the middle slice of each axis per subject, then its labels beside (orange grey, blue white
    matter), so a person can see the subjects differ in anatomy and in scan."""
    rows = []
    middle = n_per_axis // 2
    for sub in subjects:
        tiles = []
        for letter in AXIS_LETTERS:
            image, _ = sub["slices"][f"{sub['id']}__{letter}{middle:02d}"]
            tiles.append(np.repeat(image[..., None], 3, axis=2))
        for letter in AXIS_LETTERS:
            _, label = sub["slices"][f"{sub['id']}__{letter}{middle:02d}"]
            tiles.append(_COLOURS[label])
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


SOURCE = ("simulated subjects from the nilearn MNI152 2009 template, 1 mm (T1 image, grey/white matter probability "
          "maps): random affine + smooth nonlinear deformation, random contrast, bias field, blur and noise per subject")


@contextlib.contextmanager
def _partial(out: Path):
    """A folder beside `out` to write a set into; renamed into place when the block ends, removed if it fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_brain_subjects(out: Path, subjects: int = 60, seed: int = 0, image_size: int = 128,
                           slices_per_axis: int = 8, val_subjects: int | None = None,
                           test_subjects: int | None = None, settings: SimulationSettings | None = None,
                           montage_subjects: int = 6, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write `subjects` simulated subjects to `out` (folder layout, splits.json by subject, montage.png).

    Refuses a non-empty `out` unless it is an earlier brain-subjects set (then replaced); written beside `out`
    and renamed into place, so `out` is never left half written. Memory stays that of one subject."""
    from PIL import Image

    out, sides, sim = _start_set(out, subjects, val_subjects, test_subjects, seed, image_size, slices_per_axis,
                                 settings)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    contrasts = {"t1-remap": 0, "gmm": 0}
    shown: list[dict[str, Any]] = []
    with _partial(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for k, side in enumerate(sides):
            sub = sim.subject(k)
            contrasts[sub["contrast"]] += 1
            for stem, (image, label) in sub["slices"].items():
                save_png(tmp / "images" / f"{stem}.png", image)
                save_png(tmp / "masks" / f"{stem}.png", label)
                splits[side].append(stem)
            if len(shown) < montage_subjects:
                shown.append(sub)
            if progress is not None:
                progress(k + 1, subjects)
        if shown:
            Image.fromarray(montage(shown, slices_per_axis), mode="RGB").save(tmp / MONTAGE, format="PNG")
        counts = {side: sides.count(side) for side in ("train", "val", "test")}
        info = {
            "kind": KIND,
            "format": 1,
            "simulated": True,
            "source": SOURCE,
            "labels": LABELS,
            "subjects": subjects,
            "seed": seed,
            "image_size": image_size,
            "slices_per_axis": slices_per_axis,
            "split_subjects": counts,
            "contrasts": contrasts,
            "settings": sim.settings.to_dict(),
        }
        (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        (tmp / "labels.json").write_text(json.dumps(LABELS, indent=1) + "\n")  # class names, read by the layout
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return {"out": str(out), "subjects": subjects, "images": subjects * 3 * slices_per_axis,
            "split_subjects": counts, "contrasts": contrasts, "image_size": image_size,
            "montage": str(out / MONTAGE) if shown else None}


def _start_set(out: Path, subjects: int, val_subjects: int | None, test_subjects: int | None, seed: int,
               image_size: int, slices_per_axis: int,
               settings: SimulationSettings | None) -> tuple[Path, list[str], BrainSimulator]:
    """What both writers check and build before writing: the folder (refused unless new, empty or an earlier
    set; its parent made), each subject's split side, and the simulator."""
    out = Path(out).expanduser()
    if subjects < 1:
        raise AhmError(f"--subjects must be at least 1, got {subjects}")
    sides = subject_sides(subjects, val_subjects, test_subjects)
    _check_out(out)
    sim = BrainSimulator(seed=seed, image_size=image_size, slices_per_axis=slices_per_axis, settings=settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, sides, sim


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise AhmError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not _is_previous(out):
            raise AhmError(f"{out}: folder is not empty and is not an earlier brain-subjects set; "
                           "choose a new or empty folder (nothing was written)")


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner coordinates, as the MSD volumes have
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def prepare_brain_subject_volumes(out: Path, subjects: int = 60, seed: int = 0, volume_size: int = 128,
                                  spacing_mm: float = 1.5, image_size: int = 128, slices_per_axis: int = 8,
                                  val_subjects: int | None = None, test_subjects: int | None = None,
                                  settings: SimulationSettings | None = None, montage_subjects: int = 6,
                                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Write `subjects` simulated subjects to `out` as whole NIfTI volumes in the Medical Segmentation Decathlon
    layout (dataset.json, imagesTr/, labelsTr/), read by `data.spatial_dims: 3`, with splits.json by subject
    and montage.png.

    Subject k is subject k of the slice set written by `prepare_brain_subjects` with the same seed, settings,
    `image_size` and `slices_per_axis` (see `BrainSimulator.volume`), under the same id `subNNNNN` and on the
    same split side. Written beside `out` and renamed into place, like the slice set; memory stays that of
    one volume."""
    from PIL import Image

    check_grid(volume_size, spacing_mm)  # before anything is written
    out, sides, sim = _start_set(out, subjects, val_subjects, test_subjects, seed, image_size, slices_per_axis,
                                 settings)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    contrasts = {"t1-remap": 0, "gmm": 0}
    shown: list[dict[str, Any]] = []
    training: list[dict[str, str]] = []
    with _partial(out) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for k, side in enumerate(sides):
            vol = sim.volume(k, volume_size, spacing_mm)
            sid = vol["id"]
            contrasts[vol["contrast"]] += 1
            _save_nifti(tmp / "imagesTr" / f"{sid}.nii.gz", vol["image"], vol["affine"])
            _save_nifti(tmp / "labelsTr" / f"{sid}.nii.gz", vol["label"], vol["affine"])
            training.append({"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"})
            splits[side].append(sid)
            if len(shown) < montage_subjects:
                middle = volume_size // 2
                planes = {"x": (vol["image"][middle], vol["label"][middle]),
                          "y": (vol["image"][:, middle], vol["label"][:, middle]),
                          "z": (vol["image"][:, :, middle], vol["label"][:, :, middle])}
                # Shown as the slice set shows its slices: superior (anterior on axial planes) up.
                shown.append({"id": sid, "slices": {f"{sid}__{a}00": (np.ascontiguousarray(i[:, ::-1].T),
                                                                      np.ascontiguousarray(lab[:, ::-1].T))
                                                    for a, (i, lab) in planes.items()}})
            if progress is not None:
                progress(k + 1, subjects)
        if shown:
            Image.fromarray(montage(shown, 1), mode="RGB").save(tmp / MONTAGE, format="PNG")
        counts = {side: sides.count(side) for side in ("train", "val", "test")}
        dataset = {
            "name": "BrainSubjects",
            "description": "SIMULATED brain MRI subjects (not scanned): the nilearn MNI152 2009 template under a "
                           "random affine and smooth nonlinear deformation per subject, with its own contrast, "
                           "bias field, blur and noise; labels from the warped tissue probabilities",
            "reference": "ahm data prepare brain-subjects --volumes",
            "licence": "see nilearn's MNI152 template",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": LABELS,
            "numTraining": subjects,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        info = {
            "kind": KIND,
            "format": 1,
            "simulated": True,
            "volumes": True,
            "source": SOURCE,
            "labels": LABELS,
            "subjects": subjects,
            "seed": seed,
            "volume_size": volume_size,
            "spacing_mm": spacing_mm,
            "image_size": image_size,
            "slices_per_axis": slices_per_axis,
            "split_subjects": counts,
            "contrasts": contrasts,
            "settings": sim.settings.to_dict(),
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=1) + "\n")
        (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return {"out": str(out), "subjects": subjects, "volumes": subjects, "volume_size": volume_size,
            "spacing_mm": spacing_mm, "split_subjects": counts, "contrasts": contrasts,
            "montage": str(out / MONTAGE) if shown else None}


def prepare_brain_subject_set(out: Path, volumes: bool = False, *, subjects: int = 60, seed: int = 0,
                              image_size: int = 128, slices_per_axis: int = 8, volume_size: int = 128,
                              spacing_mm: float = 1.5, val_subjects: int | None = None,
                              test_subjects: int | None = None, settings: SimulationSettings | None = None,
                              progress: Callable[[int, int], None] | None = None) -> tuple[dict, str]:
    """`ahm data prepare brain-subjects`: the slice set (`prepare_brain_subjects`), or with `volumes` the
    volume set of the same subjects (`prepare_brain_subject_volumes`, `volume_size` voxels of `spacing_mm` per
    side); returns the summary and what was written, in words."""
    common: dict[str, Any] = {"subjects": subjects, "seed": seed, "image_size": image_size,
                              "slices_per_axis": slices_per_axis, "val_subjects": val_subjects,
                              "test_subjects": test_subjects, "settings": settings, "progress": progress}
    if volumes:
        summary = prepare_brain_subject_volumes(out, volume_size=volume_size, spacing_mm=spacing_mm, **common)
        return summary, _describe_volume_set(summary)
    summary = prepare_brain_subjects(out, **common)
    return summary, _describe_slice_set(summary)


def _describe_slice_set(summary: dict) -> str:
    sides = ", ".join(f"{k} {v}" for k, v in summary["split_subjects"].items())
    size = summary["image_size"]
    return (f"wrote {summary['subjects']} simulated subjects ({summary['images']} slices of {size}x{size} px) to "
            f"{summary['out']}\n"
            f"  images/ and masks/ (0 background, 1 grey matter, 2 white matter); splits.json by subject: {sides}; "
            f"montage: {summary['montage']}")


def _describe_volume_set(summary: dict) -> str:
    sides = ", ".join(f"{k} {v}" for k, v in summary["split_subjects"].items())
    size, spacing = summary["volume_size"], summary["spacing_mm"]
    return (f"wrote {summary['subjects']} simulated subjects as 3D volumes ({size}^3 voxels of {spacing:g} mm, "
            f"{size * spacing:g} mm per side) to {summary['out']}\n"
            f"  Decathlon layout: dataset.json, imagesTr/ and labelsTr/ (0 background, 1 grey matter, 2 white "
            f"matter), for data.spatial_dims 3; splits.json by subject: {sides}; montage: {summary['montage']}")
