"""The nnunet dataset layout and the plans reading that needs no nnU-Net install."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ahm.config import DataConfig
from ahm.data.dataset import read_item
from ahm.data.layouts import detect_layout, open_dataset
from ahm.data.splits import make_splits
from ahm.errors import AhmError
from tests.nnunet.make_raw import make_raw_2d


def test_detected_before_msd_with_labels_and_names(tmp_path: Path) -> None:
    root = make_raw_2d(tmp_path, cases=4)
    assert detect_layout(root) == "nnunet"
    index = open_dataset(root, DataConfig())
    assert index.layout == "nnunet" and len(index.items) == 4 and index.label_values == [0, 1]
    assert index.class_names == {0: "background", 1: "disc"}


def test_region_labels_refused_naming_dataset_json(tmp_path: Path) -> None:
    root = make_raw_2d(tmp_path, cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2]}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(AhmError, match=r"dataset.json: label 'whole' is region-based"):
        open_dataset(root, DataConfig())


def test_channels_joined_and_splits_final_honoured(tmp_path: Path) -> None:
    root = make_raw_2d(tmp_path, cases=4)
    for n in range(4):
        first = np.asarray(Image.open(root / "imagesTr" / f"case{n:03d}_0000.png"))
        Image.fromarray(255 - first).save(root / "imagesTr" / f"case{n:03d}_0001.png")
    (root / "splits_final.json").write_text(json.dumps([{"train": ["case000", "case001"], "val": ["case002"]}]))
    index = open_dataset(root, DataConfig())
    image, mask = read_item(index.items[0], index, DataConfig(), labels=True)
    assert image.shape == (2, 64, 64) and mask is not None
    np.testing.assert_array_equal(image[1], 255 - image[0])
    splits = make_splits(index, DataConfig())
    assert splits == {"train": ["case000", "case001"], "val": ["case002"], "test": []}


def test_plans_geometry_in_ahm_axis_order() -> None:
    from ahm.nnunet import geometry

    arch = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}
    plans = {"transpose_forward": [2, 0, 1], "configurations": {
        "3d_fullres": {"patch_size": [40, 80, 96], "spacing": [0.7, 3.0, 0.8], "architecture": arch,
                       "normalization_schemes": ["CTNormalization"]}},
        "foreground_intensity_properties_per_channel": {"0": {"percentile_00_5": -90.0, "percentile_99_5": 300.0}}}
    geo = geometry(plans, "3d_fullres")
    # network axis i is stored axis forward[i]; stored (z, y, x) is ahm's (x, y, z) reversed
    assert geo.to_network == (0, 2, 1)
    assert geo.patch_size == (40, 96, 80) and geo.spacing == (0.7, 0.8, 3.0)
    assert geo.ct_window == (-90.0, 300.0)


def test_export_refuses_a_run_without_encoder(tmp_path: Path) -> None:
    from ahm.export import export_run
    from ahm.nnunet import first_difference

    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == "a.b[1]"
    with pytest.raises(AhmError, match="encoder.safetensors: not found"):
        export_run(tmp_path, "nnunet", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
