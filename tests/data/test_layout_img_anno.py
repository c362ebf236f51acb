"""Layout `img-anno` (the AHM authors' Train/img, Train/anno, Test/img, Test/anno): detection, splits, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures import IMG_ANNO_TEST, IMG_ANNO_TRAIN, make_img_anno_fixture
from PIL import Image

from ahm.config import DataConfig
from ahm.data import load_arrays, make_splits, open_dataset
from ahm.data.layouts.img_anno import subject_of_slice_name
from ahm.errors import AhmError

CFG = DataConfig(image_size=32, val_fraction=0.34)


@pytest.mark.parametrize("kind, channels", [("brain", 3), ("heart", 1)])
def test_img_anno_reads_with_test_fixed_and_val_by_subject(tmp_path: Path, kind: str, channels: int) -> None:
    root = make_img_anno_fixture(tmp_path / "set", kind=kind)
    index = open_dataset(root, CFG)
    assert index.layout == "img-anno" and index.has_labels and len(index.items) == 8
    splits = make_splits(index, CFG)
    by_id = index.by_id()
    test_images = {by_id[i].image.parent.parent.name for i in splits["test"]}
    assert test_images == {"Test"} and len(splits["test"]) == 2
    train_val = splits["train"] + splits["val"]
    assert {by_id[i].image.parent.parent.name for i in train_val} == {"Train"} and len(train_val) == 6
    val_subjects = {by_id[i].subject for i in splits["val"]}
    train_subjects = {by_id[i].subject for i in splits["train"]}
    assert len(val_subjects) == 1 and not val_subjects & train_subjects and len(train_subjects) == 2
    if kind == "brain":
        assert train_subjects | val_subjects == set(IMG_ANNO_TRAIN)
        assert {by_id[i].subject for i in splits["test"]} == set(IMG_ANNO_TEST)
    assert make_splits(index, CFG) == splits  # seeded
    arrays = load_arrays(index, splits["train"], CFG, labels=True)
    assert arrays.images.shape[1] == channels and set(np.unique(arrays.labels)) == {0, 1}


def test_subject_from_file_names() -> None:
    assert subject_of_slice_name("TCGA_CS_4941_19960909_12") == "TCGA_CS_4941_19960909"
    assert subject_of_slice_name("la_003_45") == "la_003"
    assert subject_of_slice_name("case7__slice3") == "case7"
    assert subject_of_slice_name("scan") == "scan"


def test_image_without_annotation_and_the_reverse_are_one_line(tmp_path: Path) -> None:
    root = make_img_anno_fixture(tmp_path / "a")
    orphan = root / "Train" / "anno" / f"{IMG_ANNO_TRAIN[0]}_1_mask.tif"
    orphan.unlink()
    with pytest.raises(AhmError, match=f"{IMG_ANNO_TRAIN[0]}_1.tif: no annotation") as err:
        open_dataset(root, CFG)
    assert "\n" not in str(err.value)
    root = make_img_anno_fixture(tmp_path / "b")
    (root / "Test" / "img" / f"{IMG_ANNO_TEST[0]}_2.tif").unlink()
    with pytest.raises(AhmError, match=f"{IMG_ANNO_TEST[0]}_2_mask.tif: annotation without an image"):
        open_dataset(root, CFG)


def test_size_mismatch_names_the_annotation(tmp_path: Path) -> None:
    root = make_img_anno_fixture(tmp_path / "c", kind="heart")
    bad = root / "Train" / "anno" / "la_003_1.png"
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(bad)
    index = open_dataset(root, CFG)
    with pytest.raises(AhmError, match="la_003_1.png: mask size 20x32 does not match") as err:
        load_arrays(index, make_splits(index, CFG)["train"] + make_splits(index, CFG)["val"], CFG, labels=True)
    assert "\n" not in str(err.value)


def test_unlabelled_img_anno_for_pretraining(tmp_path: Path) -> None:
    root = make_img_anno_fixture(tmp_path / "d", kind="heart")
    for anno in (root / "Train" / "anno").iterdir():
        anno.unlink()
    for anno in (root / "Test" / "anno").iterdir():
        anno.unlink()
    index = open_dataset(root, CFG)
    assert not index.has_labels and all(i.mask is None for i in index.items)
