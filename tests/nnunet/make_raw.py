"""Tiny nnU-Net raw datasets written by code: 2D PNG cases with a bright disc as label 1, NIfTI volumes with a
bright ball."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_raw_2d(raw: Path, dataset_id: int = 501, cases: int = 8, size: int = 64, seed: int = 0) -> Path:
    """`raw/DatasetNNN_Discs/` in nnU-Net's raw layout; returns that folder."""
    rng = np.random.default_rng(seed)
    root = raw / f"Dataset{dataset_id:03d}_Discs"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for n in range(cases):
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        radius = rng.integers(size // 8, size // 4)
        label = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint8)
        image = np.clip(60 + 120 * label + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "imagesTr" / f"case{n:03d}_0000.png")
        Image.fromarray(label).save(root / "labelsTr" / f"case{n:03d}.png")
    meta = {"channel_names": {"0": "brightness"}, "labels": {"background": 0, "disc": 1},
            "numTraining": cases, "file_ending": ".png", "name": "Discs"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def make_raw_3d(raw: Path, dataset_id: int = 502, cases: int = 5, shape: tuple[int, int, int] = (32, 32, 24),
                spacing: tuple[float, float, float] = (1.0, 1.0, 2.0), seed: int = 0) -> Path:
    """`raw/DatasetNNN_Balls/`: NIfTI volumes (x, y, z) = `shape`, stored in RAS with an anisotropic `spacing`
    (the coarse axis last, as in most CT and MR series), a bright ball as label 1."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    root = raw / f"Dataset{dataset_id:03d}_Balls"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*spacing, 1.0])
    mm = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    extent = np.array(shape) * np.array(spacing)
    for n in range(cases):
        centre = rng.uniform(extent / 3, 2 * extent / 3)
        radius = rng.uniform(extent.min() / 6, extent.min() / 4)
        ball = ((mm - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
        image = (100 + 300 * ball + rng.normal(0, 30, shape)).astype(np.float32)
        label = ball.astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case{n:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case{n:03d}.nii.gz")
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "ball": 1},
            "numTraining": cases, "file_ending": ".nii.gz", "name": "Balls"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
