"""Tiny nnU-Net raw datasets written by code: 2D PNG cases with a bright disc as label 1."""

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
