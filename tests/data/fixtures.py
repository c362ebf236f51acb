"""Tiny generated datasets, one per supported layout, each copying the real download's structure.

Plain functions `make_<layout>_fixture(root, ...) -> Path` returning the folder to give `open_dataset`.
Images hold a bright disc (the lesion, label 1) on a textured background, so segmentation is learnable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def disc_pair(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image [h, w] with a bright disc and its bool mask."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(h // 4, 3 * h // 4 + 1), rng.integers(w // 4, 3 * w // 4 + 1)
    r = max(2, int(rng.integers(min(h, w) // 8, min(h, w) // 4 + 1)))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = 30 + 40 * rng.random((h, w))
    img[disc] = 170 + 60 * rng.random(int(disc.sum()))
    return img.astype(np.uint8), disc


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")


def _jpg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="JPEG", quality=90)


def _tif(path: Path, arr: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.ascontiguousarray(arr))


def _nii(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.25, 1.25, 2.5, 1.0])), str(path))


def ball_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    classes: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """float32 MRI-like volume and uint8 labels: a ball (1) with, for classes 3, a core (2)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([s / 2 + rng.uniform(-1, 1) for s in shape])[:, None, None, None]
    dist = np.sqrt((((grid - centre) / np.array(shape)[:, None, None, None]) ** 2).sum(0))
    labels = (dist < 0.3).astype(np.uint8)
    if classes >= 3:
        labels[dist < 0.15] = 2
    data = (200 + 50 * rng.random(shape) + 400 * labels.astype(np.float32)).astype(np.float32)
    return data, labels


def make_folder_fixture(
    root: Path,
    masks: bool = True,
    subjects: int = 3,
    per_subject: int = 2,
    size: tuple[int, int] = (40, 48),
    rgb: bool = False,
    seed: int = 0,
) -> Path:
    """`images/<subject>__<k>.png` (+ `masks/` with the same names, labels 0/1)."""
    rng = np.random.default_rng(seed)
    for s in range(subjects):
        for k in range(per_subject):
            stem = f"p{s:02d}__{k}"
            img, disc = disc_pair(rng, *size)
            _png(root / "images" / f"{stem}.png", np.stack([img] * 3, -1) if rgb else img)
            if masks:
                _png(root / "masks" / f"{stem}.png", disc.astype(np.uint8))
    return root


def make_folder_volume_fixture(
    root: Path, volumes: int = 2, shape: tuple[int, int, int] = (20, 24, 6), masks: bool = True, seed: int = 0
) -> Path:
    """`images/case<k>.nii.gz` float volumes (+ `masks/case<k>.nii.gz` labels 0/1/2)."""
    rng = np.random.default_rng(seed)
    for k in range(volumes):
        data, labels = ball_volume(rng, shape, classes=3)
        _nii(root / "images" / f"case{k}.nii.gz", data)
        if masks:
            _nii(root / "masks" / f"case{k}.nii.gz", labels)
    return root


def make_msd_fixture(
    root: Path,
    cases: tuple[int, ...] = (3, 4, 5),
    test_cases: tuple[int, ...] = (15,),
    shape: tuple[int, int, int] = (24, 20, 5),
    seed: int = 0,
) -> Path:
    """A Task02_Heart-like folder: dataset.json, imagesTr/, labelsTr/, imagesTs/ with `la_NNN.nii.gz`,
    plus the macOS `._la_NNN.nii.gz` resource forks the real archive contains."""
    rng = np.random.default_rng(seed)
    task = root / "Task02_Heart"
    training = []
    for n in cases:
        data, labels = ball_volume(rng, shape)
        _nii(task / "imagesTr" / f"la_{n:03d}.nii.gz", data)
        _nii(task / "labelsTr" / f"la_{n:03d}.nii.gz", labels)
        (task / "imagesTr" / f"._la_{n:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07macOS junk")
        (task / "labelsTr" / f"._la_{n:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07macOS junk")
        training.append({"image": f"./imagesTr/la_{n:03d}.nii.gz", "label": f"./labelsTr/la_{n:03d}.nii.gz"})
    for n in test_cases:
        _nii(task / "imagesTs" / f"la_{n:03d}.nii.gz", ball_volume(rng, shape)[0])
    meta = {
        "name": "LeftAtrium",
        "description": "Left atrium segmentation",
        "reference": "King's College London",
        "licence": "CC-BY-SA 4.0",
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "numTraining": len(cases),
        "numTest": len(test_cases),
        "training": training,
        "test": [f"./imagesTs/la_{n:03d}.nii.gz" for n in test_cases],
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=4))
    return task


def oblique_affine(spacing: tuple[float, float, float] = (1.2, 0.8, 3.0),
                   origin: tuple[float, float, float] = (10.0, -20.0, 30.0)) -> np.ndarray:
    """A voxel -> RAS affine that is not RAS: voxel axis i runs to -y (posterior), j to +x, k to -z (inferior),
    with anisotropic spacing."""
    affine = np.zeros((4, 4))
    affine[1, 0], affine[0, 1], affine[2, 2] = -spacing[0], spacing[1], -spacing[2]
    affine[:3, 3], affine[3, 3] = origin, 1.0
    return affine


def make_msd_volume_fixture(
    root: Path,
    cases: tuple[int, ...] = (1, 2, 3, 4, 5),
    shape: tuple[int, int, int] = (24, 30, 10),
    spacing: tuple[float, float, float] = (1.2, 0.8, 3.0),
    radius_mm: float = 3.5,
    seed: int = 0,
) -> Path:
    """A Decathlon-like 3D task (`dataset.json`, imagesTr/, labelsTr/) of small MRI-like volumes on an oblique,
    anisotropic grid (`oblique_affine`): a body (an ellipsoid of tissue on zero background) holding a small ball
    of foreground (label 1, `radius_mm` in millimetres) at a random place. Case k is k % 3 voxels longer along
    the first axis, so volumes differ in shape."""
    rng = np.random.default_rng(seed)
    task = root / "Task09_Balls"
    affine = oblique_affine(spacing)
    training = []
    for n in cases:
        size = (shape[0] + n % 3, shape[1], shape[2])
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij")).astype(np.float64)
        mm = idx * np.array(spacing)[:, None, None, None]  # voxel centres in millimetres along each voxel axis
        extent = (np.array(size) - 1) * np.array(spacing)
        body = ((((mm - extent[:, None, None, None] / 2) / (extent[:, None, None, None] / 2 + 1e-9)) ** 2).sum(0)
                <= 1.0)
        centre = np.array([rng.uniform(0.3, 0.7) * e for e in extent])[:, None, None, None]
        labels = (np.sqrt(((mm - centre) ** 2).sum(0)) <= radius_mm).astype(np.uint8)
        data = np.where(body, 100 + 20 * rng.random(size), 0.0) + 200 * labels
        for name, arr in (("imagesTr", data.astype(np.float32)), ("labelsTr", labels)):
            path = task / name / f"ball_{n:03d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            import nibabel as nib

            nib.save(nib.Nifti1Image(arr, affine), str(path))
        training.append({"image": f"./imagesTr/ball_{n:03d}.nii.gz", "label": f"./labelsTr/ball_{n:03d}.nii.gz"})
    meta = {"name": "Balls", "tensorImageSize": "3D", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "ball"}, "numTraining": len(cases), "numTest": 0,
            "training": training, "test": []}
    (task / "dataset.json").write_text(json.dumps(meta, indent=4))
    return task


LGG_PATIENTS = ("TCGA_CS_4941_19960909", "TCGA_DU_7014_19860618", "TCGA_HT_7473_19970826")


def make_lgg_fixture(
    root: Path, patients: tuple[str, ...] = LGG_PATIENTS, slices: int = 3, size: int = 32, seed: int = 0
) -> Path:
    """The Kaggle LGG download: `lgg-mri-segmentation/kaggle_3m/<patient>/<patient>_<n>.tif` (3-channel
    uint8) + `<patient>_<n>_mask.tif` (0/255), with data.csv and README.md. Returns the top folder."""
    rng = np.random.default_rng(seed)
    top = root / "lgg-mri-segmentation"
    base = top / "kaggle_3m"
    for patient in patients:
        for n in range(1, slices + 1):
            img, disc = disc_pair(rng, size, size)
            rgb = np.stack([img, np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8), img // 2], -1)
            _tif(base / patient / f"{patient}_{n}.tif", rgb)
            _tif(base / patient / f"{patient}_{n}_mask.tif", (disc * 255).astype(np.uint8))
    (base / "data.csv").write_text(
        "Patient,RNASeqCluster,MethylationCluster\n" + "".join(f"{p[:12]},1,2\n" for p in patients)
    )
    (base / "README.md").write_text("LGG segmentation dataset\n")
    return top


def make_busi_fixture(
    root: Path, per_class: int = 2, size: tuple[int, int] = (30, 40), seed: int = 0
) -> Path:
    """`Dataset_BUSI_with_GT/<class>/<class> (k).png` (grey stored as RGB) + `<class> (k)_mask.png` (0/255);
    `benign (1)` also has `_mask_1.png` (a second lesion). Normal images have empty masks."""
    rng = np.random.default_rng(seed)
    top = root / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        for k in range(1, per_class + 1):
            img, disc = disc_pair(rng, *size)
            if cls == "normal":
                disc = np.zeros_like(disc)
            _png(top / cls / f"{cls} ({k}).png", np.stack([img] * 3, -1))
            _png(top / cls / f"{cls} ({k})_mask.png", (disc * 255).astype(np.uint8))
            if cls == "benign" and k == 1:
                second = np.zeros_like(disc)
                second[:4, :4] = True
                _png(top / cls / f"{cls} ({k})_mask_1.png", (second * 255).astype(np.uint8))
    return top


def make_isic_fixture(
    root: Path, n: int = 3, separate: bool = True, size: tuple[int, int] = (36, 48), seed: int = 0
) -> Path:
    """ISIC 2018 task 1: `ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg` and
    `ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png` (0/255), with the archive's
    LICENSE/ATTRIBUTION text files and a 2017-style `_superpixels.png` to ignore.
    `separate=False`: everything in one folder."""
    rng = np.random.default_rng(seed)
    top = root / "isic"
    data = top / ("ISIC2018_Task1-2_Training_Input" if separate else "ISIC2018_Task1_Training")
    truth = top / "ISIC2018_Task1_Training_GroundTruth" if separate else data
    for k in range(n):
        ident = f"ISIC_{k:07d}"
        img, disc = disc_pair(rng, *size)
        _jpg(data / f"{ident}.jpg", np.stack([img, img // 2 + 60, img // 3 + 40], -1))
        _png(truth / f"{ident}_segmentation.png", (disc * 255).astype(np.uint8))
    _png(data / "ISIC_0000000_superpixels.png", np.zeros((*size, 3), np.uint8))
    for folder in {data, truth}:
        (folder / "LICENSE.txt").write_text("CC-BY-NC\n")
        (folder / "ATTRIBUTION.txt").write_text("ISIC archive\n")
    return top


KVASIR_NAMES = ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0roawvklrq0799vmjorwfv")


def make_kvasir_fixture(
    root: Path, names: tuple[str, ...] = KVASIR_NAMES, size: tuple[int, int] = (40, 44), seed: int = 0
) -> Path:
    """`Kvasir-SEG/images/<name>.jpg` (RGB) + `Kvasir-SEG/masks/<name>.jpg` (RGB JPEG, so noisy 0/255),
    and `kavsir_bboxes.json` (sic) beside them."""
    rng = np.random.default_rng(seed)
    top = root / "Kvasir-SEG"
    boxes = {}
    for name in names:
        img, disc = disc_pair(rng, *size)
        _jpg(top / "images" / f"{name}.jpg", np.stack([img, img // 2 + 50, img // 2], -1))
        _jpg(top / "masks" / f"{name}.jpg", np.stack([(disc * 255).astype(np.uint8)] * 3, -1))
        boxes[name] = {"height": size[0], "width": size[1], "bbox": []}
    (top / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return top


ALL_FIXTURES = {
    "folder": make_folder_fixture,
    "msd": make_msd_fixture,
    "lgg": make_lgg_fixture,
    "busi": make_busi_fixture,
    "isic": make_isic_fixture,
    "kvasir": make_kvasir_fixture,
}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: compare before/after to prove nothing is written."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    } | {".": (0, folder.stat().st_mtime_ns)}


IMG_ANNO_TRAIN = ("TCGA_CS_4941_19960909", "TCGA_DU_7014_19860618", "TCGA_HT_7473_19970826")
IMG_ANNO_TEST = ("TCGA_FG_5962_20000626",)


def make_img_anno_fixture(root: Path, kind: str = "brain", slices: int = 2, size: int = 32, seed: int = 0) -> Path:
    """The folder the AHM authors' loaders read: `Train/img`, `Train/anno`, `Test/img`, `Test/anno`.

    kind "brain": Kaggle LGG slices, 3-channel uint8 TIFF `<patient>_<n>.tif` with annotation `<patient>_<n>_mask.tif`
    (0/255); kind "heart": grey PNG `la_<case>_<n>.png` (the 2D PNG version of MSD Task02_Heart) with annotations of
    the same name. Three training subjects and one test subject, `slices` slices each."""
    rng = np.random.default_rng(seed)
    subjects = {"Train": IMG_ANNO_TRAIN, "Test": IMG_ANNO_TEST}
    if kind == "heart":
        subjects = {"Train": ("la_003", "la_004", "la_005"), "Test": ("la_007",)}
    for split, names in subjects.items():
        for subject in names:
            for n in range(1, slices + 1):
                img, disc = disc_pair(rng, size, size)
                if kind == "heart":
                    _png(root / split / "img" / f"{subject}_{n}.png", img)
                    _png(root / split / "anno" / f"{subject}_{n}.png", (disc * 255).astype(np.uint8))
                else:
                    rgb = np.stack([img, img, np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8)], -1)
                    _tif(root / split / "img" / f"{subject}_{n}.tif", rgb)
                    _tif(root / split / "anno" / f"{subject}_{n}_mask.tif", (disc * 255).astype(np.uint8))
    return root
