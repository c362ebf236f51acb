"""A small labelled brain MRI set built offline from the MNI152 template that ships inside nilearn.

Labels: 0 background, 1 grey matter, 2 white matter (the larger tissue probability, when it is >= 0.5),
decided on the model grid: the probability maps are area-averaged to the slice's size like the T1 image, so a
label says what most of its pixel's area is, instead of what one 1 mm voxel inside it happens to be.
2D slices along all three axes are written in the `folder` layout. Neighbouring slices of one axis are
nearly identical, so slices are grouped into slabs (the "subjects" of this set), whole slabs go to one
split, and a gap of slices between slabs is dropped: adjacent slices never sit on two sides of a split.
Slices of different axes do intersect; the set is for demonstrating and testing the pipeline, not for
reporting accuracy.

With `shift=True` every slice also gets its own simulated acquisition (`acquisition_shift`): a random gamma,
a smooth multiplicative bias field, a global gain and noise, as if each slice came from a different scanner
and visit. The labels do not change. On the plain set a lookup table from intensity to tissue nearly
solves the task (`ahm bench baseline`); on the shifted set it does not, so a network has to use context.

With `lesions=True` the task is a small structure instead: simulated lesions (small spheres of 3-7 mm radius,
T1-hypointense, at random white-matter positions drawn from the seed) are planted in the template until about a
third of the kept slices of each axis cut one, and the only label is 1 = lesion. Most slices hold no lesion: the
set on which a metric that scores "absent from both" as a success rewards predicting nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ahm.errors import AhmError

MARKER = "brain_demo.json"
KIND = "ahm-brain-demo"
LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
SLAB_SIZE = 4
GAP = 2
MIN_BRAIN_FRACTION = 0.05
FRACTIONS = {"val": 0.15, "test": 0.15}
# The simulated acquisition of `shift=True`, per slice: gamma log-uniform in "gamma", bias field
# exp(c . [x, y, xy, x^2, y^2]) with c ~ N(0, "bias_sd") on a [-1, 1] grid, gain uniform in "gain", Gaussian
# noise of "noise_sd" (of full scale) inside non-zero pixels; then rescaled so the brightest pixel is 255.
SHIFT = {"gamma": (0.6, 1.6), "bias_sd": 0.15, "gain": (0.7, 1.3), "noise_sd": 0.02}
LESION_LABELS = {"0": "background", "1": "lesion"}
# The simulated lesions of `lesions=True`: radius (mm, uniform), T1 contrast (intensity x (1 - contrast) at the
# centre, a 1 mm linear edge), the share of kept slices per axis they should cut, and where they may sit.
LESIONS = {"radius_mm": (3.0, 7.0), "contrast": 0.45, "slice_share": 1 / 3, "min_wm": 0.9, "max_lesions": 40}


_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}


def read_bundled() -> dict[str, np.ndarray] | None:
    """The 1 mm template files inside the nilearn wheel, read with nibabel.

    Importing `nilearn.datasets` costs several seconds (it pulls in scikit-learn); the files are all we need.
    None when this nilearn keeps them elsewhere.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not all((folder / f).is_file() for f in _FILES.values()):
        return None
    return {
        name: np.asarray(nib.load(str(folder / f)).dataobj, dtype=np.float32)  # type: ignore[attr-defined]
        for name, f in _FILES.items()
    }


def read_with_loaders() -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        loaders = {
            "t1": datasets.load_mni152_template,
            "gm": datasets.load_mni152_gm_template,
            "wm": datasets.load_mni152_wm_template,
        }
        return {
            name: np.asarray(load(resolution=1).get_fdata(), dtype=np.float32)
            for name, load in loaders.items()
        }


def _halve(volume: np.ndarray) -> np.ndarray:
    # 2x2x2 block mean: the 2 mm grid, without the seconds of nilearn's resampling.
    x, y, z = (s - s % 2 for s in volume.shape)
    v = volume[:x, :y, :z]
    return v.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 image, grey/white matter probabilities `[2, X, Y, Z]` (0..1) and the 1 mm label volume (0/1/2),
    from nilearn's bundled MNI152 2009 files (no network)."""
    try:
        volumes = read_bundled() or read_with_loaders()
    except ImportError as exc:
        raise AhmError("brain demo: needs nilearn (pip install 'ahm[demo]' or pip install nilearn)") from exc
    except Exception as exc:  # a broken nilearn install: say so in one line
        raise AhmError(
            f"brain demo: could not load nilearn's MNI152 template ({type(exc).__name__}: {exc})"
        ) from exc
    # Native 1 mm grid: about three times the slices of the 2 mm grid, so that 10% of the training slabs
    # spans several slabs (and usually all three axes) instead of two.
    t1, gm, wm = (volumes[name] for name in ("t1", "gm", "wm"))
    if not (t1.shape == gm.shape == wm.shape):
        raise AhmError(f"brain demo: nilearn template shapes differ ({t1.shape}, {gm.shape}, {wm.shape})")
    # The files store probabilities as 0..255; nilearn's loaders divide by the maximum, and so do we.
    gm, wm = gm / max(float(gm.max()), 1e-6), wm / max(float(wm.max()), 1e-6)
    probs = np.stack([gm, wm])
    return t1, probs, tissue_labels(probs)


def tissue_labels(probs: np.ndarray) -> np.ndarray:
    """0 background, 1 grey matter, 2 white matter from probabilities `[2, ...]`: the larger one when >= 0.5."""
    return np.where(probs.max(axis=0) >= 0.5, probs.argmax(axis=0) + 1, 0).astype(np.uint8)


def plan_slabs(kept: list[int], slab_size: int = SLAB_SIZE, gap: int = GAP) -> list[list[int]]:
    """Group sorted slice indices into slabs of `slab_size` index positions with `gap` positions dropped
    between slabs, so slices of two slabs are always more than `gap` indices apart."""
    slabs: list[list[int]] = []
    if not kept:
        return slabs
    start = kept[0]
    last = kept[-1]
    while start <= last:
        slab = [k for k in kept if start <= k < start + slab_size]
        if slab:
            slabs.append(slab)
        start += slab_size + gap
    return slabs


def acquisition_shift(image: np.ndarray, name: str) -> np.ndarray:
    """`image` (uint8, 2D) as if acquired differently: random gamma, smooth bias field, gain and noise (`SHIFT`).

    The draw depends only on `name` (the slice's file stem), so a slice gets the same shift on every build and
    on every machine, whatever the order of the work.
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    h, w = image.shape
    grid = np.mgrid[:h, :w].astype(np.float64)
    yy, xx = grid[0] / max(h - 1, 1) * 2 - 1, grid[1] / max(w - 1, 1) * 2 - 1
    img = image.astype(np.float64) / 255.0
    low, high = SHIFT["gamma"]
    gamma = np.exp(rng.uniform(np.log(low), np.log(high)))
    c = rng.normal(0.0, SHIFT["bias_sd"], size=5)
    bias = np.exp(c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx**2 + c[4] * yy**2)
    shifted = (img**gamma) * bias * rng.uniform(*SHIFT["gain"])
    shifted = shifted + rng.normal(0.0, SHIFT["noise_sd"], size=shifted.shape) * (img > 0)
    shifted = np.clip(shifted / max(float(shifted.max()), 1e-6), 0.0, 1.0)
    return (shifted * 255.0).round().astype(np.uint8)


def plant_lesions(t1: np.ndarray, wm: np.ndarray, kept: list[list[int]], rng: np.random.Generator,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """T1 with lesions planted and the lesion probability volume (0..1), 1 mm grid.

    Spheres are added at random white-matter voxels until, on average over the three axes, `LESIONS["slice_share"]`
    of the kept slices (`kept[axis]`) cut at least one lesion."""
    centres = np.argwhere(wm >= LESIONS["min_wm"])
    if not len(centres):
        raise AhmError("brain demo: no white matter found in the template to plant lesions in")
    grid = np.ogrid[tuple(slice(0, n) for n in t1.shape)]
    lesion = np.zeros(t1.shape, dtype=np.float32)
    covered = [set() for _ in range(3)]
    for _ in range(LESIONS["max_lesions"]):
        share = np.mean([len(covered[a] & set(kept[a])) / max(len(kept[a]), 1) for a in range(3)])
        if share >= LESIONS["slice_share"]:
            break
        centre = centres[rng.integers(len(centres))]
        radius = rng.uniform(*LESIONS["radius_mm"])
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        lesion = np.maximum(lesion, np.clip(radius + 0.5 - dist, 0.0, 1.0).astype(np.float32))
        for a in range(3):
            covered[a].update(range(int(np.floor(centre[a] - radius)), int(np.ceil(centre[a] + radius)) + 1))
    return t1 * (1.0 - LESIONS["contrast"] * lesion), lesion


def _assign(n_slabs: int, rng: np.random.Generator) -> list[str]:
    sides = ["train"] * n_slabs
    order = rng.permutation(n_slabs)
    n_test = max(1, round(FRACTIONS["test"] * n_slabs)) if n_slabs >= 3 else 0
    n_val = max(1, round(FRACTIONS["val"] * n_slabs)) if n_slabs >= 3 else 0
    for k in order[:n_test]:
        sides[k] = "test"
    for k in order[n_test : n_test + n_val]:
        sides[k] = "val"
    return sides


def _is_previous_demo(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="L").save(path, format="PNG")


def prepare_brain_demo(
    out: Path,
    image_size: int = 128,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    shift: bool = False,
    lesions: bool = False,
) -> dict:
    """Write the brain demo set to `out` (folder layout + splits.json + labels.json) and return a summary.

    `shift`: give every slice its own simulated acquisition (`acquisition_shift`); masks and splits are the same.
    `lesions`: plant simulated lesions (`plant_lesions`) and label only them (the small-structure variant).

    Refuses a non-empty `out` unless it is a previous brain demo (then replaced). The set is written to a
    temporary folder beside `out` and renamed into place, so `out` is never left half written.
    """
    from ahm.data.preprocess import resize_image

    out = Path(out).expanduser()
    if not 16 <= image_size <= 1024:
        raise AhmError(f"--image-size must be between 16 and 1024, got {image_size}")
    if out.exists():
        if not out.is_dir():
            raise AhmError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not _is_previous_demo(out):
            raise AhmError(
                f"{out}: folder is not empty and is not a previous brain demo; "
                "choose a new or empty folder (nothing was written)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)

    t1, probs, labels = _load_template()
    scale = float(np.percentile(t1[labels > 0], 99.5)) or 1.0
    rng = np.random.default_rng(seed)
    kept_by_axis = [[k for k in range(labels.shape[axis])
                     if (np.take(labels, k, axis=axis) > 0).mean() >= MIN_BRAIN_FRACTION] for axis in range(3)]
    if lesions:
        t1, lesion = plant_lesions(t1, probs[1], kept_by_axis, np.random.default_rng([seed, 1]))
        probs = lesion[None]
    t1_8bit = np.clip(np.round(t1 / scale * 255.0), 0, 255).astype(np.uint8)
    names = LESION_LABELS if lesions else LABELS

    work: list[tuple[str, str, int, int]] = []  # (stem, side, axis, index)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    slab_counts = {"train": 0, "val": 0, "test": 0}
    for axis in range(3):
        slabs = plan_slabs(kept_by_axis[axis])
        for slab_no, (slab, side) in enumerate(zip(slabs, _assign(len(slabs), rng))):
            slab_counts[side] += 1
            for k in slab:
                stem = f"ax{axis}s{slab_no:02d}__{k:03d}"
                splits[side].append(stem)
                work.append((stem, side, axis, k))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for done, (stem, _, axis, k) in enumerate(work, start=1):
            # rot90 puts the superior (or anterior) direction up, the way the slices are usually viewed.
            image = np.rot90(np.take(t1_8bit, k, axis=axis)).astype(np.float32)
            image = resize_image(image[None], image_size)[0]
            # Labels from probabilities resized like the image (area-averaged), not nearest-sampled 1 mm labels:
            # on a grid ~1.7x coarser, nearest sampling keeps one voxel in three and frays the thin grey ribbon.
            tissue = np.rot90(np.take(probs, k, axis=axis + 1), axes=(1, 2)).astype(np.float32)
            resized = resize_image(tissue, image_size)
            label = (resized[0] >= 0.5).astype(np.uint8) if lesions else tissue_labels(resized)
            pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
            if shift:
                pixels = acquisition_shift(pixels, stem)
            save_png(tmp / "images" / f"{stem}.png", pixels)
            save_png(tmp / "masks" / f"{stem}.png", label)
            if progress is not None:
                progress(done, len(work))
        counts = {side: len(ids) for side, ids in splits.items()}
        info = {
            "kind": KIND,
            "format": 2,  # 2: labels decided on the model grid from area-averaged probabilities
            "source": "nilearn MNI152 2009 template, 1 mm (T1 image, grey/white matter probability maps)",
            "labels": names,
            "lesions": LESIONS if lesions else None,
            "image_size": image_size,
            "slab_size": SLAB_SIZE,
            "gap": GAP,
            "min_brain_fraction": MIN_BRAIN_FRACTION,
            "seed": seed,
            "shift": SHIFT if shift else None,
            "images": len(work),
            "splits": counts,
            "slabs": slab_counts,
        }
        (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        (tmp / "labels.json").write_text(json.dumps(names, indent=1) + "\n")
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "images": len(work),
        "splits": counts,
        "slabs": slab_counts,
        "image_size": image_size,
        "shift": shift,
        "lesions": lesions,
        "labels": names,
        "paths": {name: str(out / name) for name in ("images", "masks", "splits.json", MARKER)},
    }


def swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None:  # put the previous demo back rather than leave nothing
            os.replace(old / "previous", out)
        raise AhmError(
            f"{out}: could not move the new brain demo into place ({exc.strerror or exc})"
        ) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
