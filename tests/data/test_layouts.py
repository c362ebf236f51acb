"""Layouts: each public dataset's structure is found and listed; bad structures fail naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures import (
    LGG_PATIENTS,
    make_busi_fixture,
    make_folder_fixture,
    make_folder_volume_fixture,
    make_isic_fixture,
    make_kvasir_fixture,
    make_lgg_fixture,
    make_msd_fixture,
    snapshot,
)
from PIL import Image

from ahm.config import DataConfig
from ahm.data import detect_layout, load_arrays, open_dataset
from ahm.errors import AhmError

CFG = DataConfig(image_size=32)


def _cfg(**kw) -> DataConfig:
    return CFG.model_copy(update=kw)


# ------------------------------------------------------------------ every layout is found


@pytest.mark.parametrize(
    "make, layout, n_items, n_subjects",
    [
        (lambda r: make_folder_fixture(r / "set"), "folder", 6, 3),
        (lambda r: make_folder_volume_fixture(r / "set"), "folder", 12, 2),
        (make_msd_fixture, "msd", 15, 3),
        (make_lgg_fixture, "lgg", 9, 3),
        (make_busi_fixture, "busi", 6, 6),
        (make_isic_fixture, "isic", 3, 3),
        (lambda r: make_isic_fixture(r, separate=False), "isic", 3, 3),
        (make_kvasir_fixture, "kvasir", 3, 3),
    ],
)
def test_each_layout_is_detected_and_listed(tmp_path: Path, make, layout: str, n_items: int, n_subjects: int):
    root = make(tmp_path)
    index = open_dataset(root, CFG)
    assert index.layout == layout
    assert len(index.items) == n_items
    assert len({i.subject for i in index.items}) == n_subjects
    ids = [i.id for i in index.items]
    assert len(set(ids)) == len(ids)
    assert all(i.id == Path(i.id).name and " " not in i.id and "(" not in i.id for i in index.items)
    assert index.has_labels
    assert all(i.mask is not None and i.mask.is_file() and i.image.exists() for i in index.items)
    assert index.problems == []


def test_folder_without_masks_is_unlabelled(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "set", masks=False)
    index = open_dataset(root, CFG)
    assert index.layout == "folder" and not index.has_labels
    assert all(i.mask is None for i in index.items)
    assert {i.subject for i in index.items} == {"p00", "p01", "p02"}


def test_folder_volumes_become_one_item_per_slice_along_the_axis(tmp_path: Path):
    root = make_folder_volume_fixture(tmp_path / "set", shape=(20, 24, 6))
    index = open_dataset(root, CFG)
    first = index.items[0]
    assert (first.id, first.subject, first.axis, first.slice, first.volume) == (
        "case0__z000",
        "case0",
        2,
        0,
        "case0",
    )
    assert [i.slice for i in index.items if i.volume == "case1"] == list(range(6))
    along_x = open_dataset(root, _cfg(slice_axis=0))
    assert len(along_x.items) == 2 * 20
    assert along_x.items[5].id == "case0__x005"


def test_msd_reads_dataset_json_and_ignores_macos_forks(tmp_path: Path):
    root = make_msd_fixture(tmp_path, cases=(3, 7))
    assert (root / "imagesTr" / "._la_003.nii.gz").exists()
    index = open_dataset(root, CFG)
    assert index.label_values == [0, 1]
    assert index.modality == "mri"
    assert {i.volume for i in index.items} == {"la_003", "la_007"}
    assert all(i.image.parent.name == "imagesTr" and i.mask.parent.name == "labelsTr" for i in index.items)
    assert all(i.mask.name == i.image.name for i in index.items)
    assert not any("imagesTs" in str(i.image) for i in index.items)


def test_lgg_subject_is_the_patient_folder_and_nested_kaggle_folder_is_found(tmp_path: Path):
    top = make_lgg_fixture(tmp_path)
    for root in (top, top / "kaggle_3m"):
        index = open_dataset(root, CFG)
        assert index.layout == "lgg"
        assert {i.subject for i in index.items} == set(LGG_PATIENTS)
        item = next(i for i in index.items if i.id == f"{LGG_PATIENTS[0]}_2")
        assert item.mask.name == f"{LGG_PATIENTS[0]}_2_mask.tif"


def test_busi_extra_masks_are_merged_by_union(tmp_path: Path):
    root = make_busi_fixture(tmp_path, size=(32, 32))
    index = open_dataset(root, CFG)
    item = next(i for i in index.items if i.id == "benign_1")
    assert item.image.name == "benign (1).png"
    assert [p.name for p in item.extra_masks] == ["benign (1)_mask_1.png"]
    arrays = load_arrays(index, [item.id], CFG, labels=True)
    first = np.array(Image.open(item.mask)) > 0
    second = np.array(Image.open(item.extra_masks[0])) > 0
    assert second[:4, :4].all() and not first[:4, :4].any()
    assert np.array_equal(arrays.labels[0], (first | second).astype(np.int64))


def test_isic_ignores_superpixels_text_files_and_macos_zip_folders(tmp_path: Path):
    root = make_isic_fixture(tmp_path)
    (root / "__MACOSX" / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    (root / "__MACOSX" / "ISIC2018_Task1-2_Training_Input" / "._ISIC_0000000.jpg").write_bytes(b"\0junk")
    (root / "__MACOSX" / "ISIC_0000009.jpg").write_bytes(b"\0junk")
    index = open_dataset(root, CFG)
    assert [i.id for i in index.items] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert all(i.mask.name == f"{i.id}_segmentation.png" for i in index.items)


def test_kvasir_jpeg_masks_are_thresholded_to_clean_labels(tmp_path: Path):
    root = make_kvasir_fixture(tmp_path, size=(32, 32))
    index = open_dataset(root, CFG)
    arrays = load_arrays(index, [i.id for i in index.items], CFG, labels=True)
    assert set(np.unique(arrays.labels).tolist()) == {0, 1}
    noisy = np.asarray(Image.open(index.items[0].mask).convert("L"))
    assert len(np.unique(noisy)) > 2  # the fixture's JPEG mask really is lossy
    assert np.array_equal(arrays.labels[0], (noisy >= 128).astype(np.int64))


def test_forced_layout_is_used_and_checked(tmp_path: Path):
    root = make_kvasir_fixture(tmp_path)
    assert open_dataset(root, _cfg(layout="folder")).layout == "folder"
    with pytest.raises(AhmError, match="layout 'msd' needs dataset.json"):
        open_dataset(root, _cfg(layout="msd"))
    with pytest.raises(AhmError, match="unknown layout 'nope'"):
        open_dataset(root, _cfg(layout="nope"))


# ------------------------------------------------------------------ bad structures


def test_missing_and_empty_and_unknown_folders(tmp_path: Path):
    with pytest.raises(AhmError, match=r"nothere: dataset folder not found"):
        open_dataset(tmp_path / "nothere", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AhmError, match=r"empty: the dataset folder is empty"):
        open_dataset(tmp_path / "empty", CFG)
    (tmp_path / "odd" / "stuff").mkdir(parents=True)
    (tmp_path / "odd" / "stuff" / "a.png").write_bytes(b"x")
    with pytest.raises(AhmError, match=r"odd: no known dataset layout found"):
        detect_layout(tmp_path / "odd")
    (tmp_path / "empty_images" / "images").mkdir(parents=True)
    with pytest.raises(AhmError, match=r"images: no images found"):
        open_dataset(tmp_path / "empty_images", CFG)


def test_unpaired_files_name_the_file(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a")
    (root / "masks" / "p00__0.png").unlink()
    with pytest.raises(AhmError, match=r"images/p00__0\.png: no mask for this image"):
        open_dataset(root, CFG)
    root = make_folder_fixture(tmp_path / "b")
    (root / "images" / "p01__1.png").unlink()
    with pytest.raises(AhmError, match=r"masks/p01__1\.png: mask without an image"):
        open_dataset(root, CFG)
    lgg = make_lgg_fixture(tmp_path / "c")
    (lgg / "kaggle_3m" / LGG_PATIENTS[1] / f"{LGG_PATIENTS[1]}_3_mask.tif").unlink()
    with pytest.raises(AhmError, match=rf"{LGG_PATIENTS[1]}_3\.tif: no mask {LGG_PATIENTS[1]}_3_mask\.tif"):
        open_dataset(lgg, CFG)


def test_skip_bad_collects_problems_and_keeps_the_rest(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a")
    (root / "masks" / "p00__0.png").unlink()
    (root / "images" / "notes.docx").write_bytes(b"x")
    index = open_dataset(root, _cfg(skip_bad=True))
    assert len(index.items) == 5
    assert len(index.problems) == 2
    assert any("p00__0.png: no mask" in p for p in index.problems)
    assert any("notes.docx: unsupported file type" in p for p in index.problems)


def test_duplicate_stems_are_refused(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a", masks=False)
    (root / "images" / "p00__0.jpg").write_bytes((root / "images" / "p00__0.png").read_bytes())
    with pytest.raises(AhmError, match=r"p00__0\.(png|jpg): same name as .*p00__0\.(png|jpg)"):
        open_dataset(root, CFG)


@pytest.mark.parametrize("bad", ["../outside/la_003.nii.gz", "/etc/passwd", "./imagesTr/../../x.nii.gz"])
def test_msd_paths_leaving_the_folder_are_refused(tmp_path: Path, bad: str):
    root = make_msd_fixture(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = bad
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(AhmError) as err:
        open_dataset(root, CFG)
    assert str(err.value).startswith(f"{root / 'dataset.json'}: training[1].image")
    assert "outside the dataset folder" in str(err.value)
    index = open_dataset(root, _cfg(skip_bad=True))
    assert len({i.volume for i in index.items}) == 2 and len(index.problems) == 1


def test_msd_listed_file_missing_is_named(tmp_path: Path):
    root = make_msd_fixture(tmp_path)
    (root / "labelsTr" / "la_004.nii.gz").unlink()
    with pytest.raises(AhmError, match=r"labelsTr/la_004\.nii\.gz: listed in .*dataset\.json but missing"):
        open_dataset(root, CFG)


def test_msd_broken_json_is_named(tmp_path: Path):
    root = make_msd_fixture(tmp_path)
    (root / "dataset.json").write_text('{"training": [')
    with pytest.raises(AhmError, match=r"dataset\.json: not valid JSON"):
        open_dataset(root, CFG)


@pytest.mark.parametrize("bad", ["../x.png", "/tmp/x.png", "images/../../x.png"])
def test_splits_json_paths_leaving_the_folder_are_refused(tmp_path: Path, bad: str):
    root = make_folder_fixture(tmp_path / "a")
    (root / "splits.json").write_text(json.dumps({"train": ["p00__0", bad], "val": [], "test": []}))
    with pytest.raises(AhmError) as err:
        open_dataset(root, CFG)
    assert str(err.value).startswith(f"{root / 'splits.json'}: ")
    assert "outside the dataset folder" in str(err.value)


def test_listing_never_writes_into_the_dataset(tmp_path: Path):
    roots = [
        make_folder_fixture(tmp_path / "f"),
        make_msd_fixture(tmp_path / "m"),
        make_lgg_fixture(tmp_path / "l"),
        make_busi_fixture(tmp_path / "b"),
        make_isic_fixture(tmp_path / "i"),
        make_kvasir_fixture(tmp_path / "k"),
    ]
    for root in roots:
        before = snapshot(root)
        index = open_dataset(root, CFG)
        load_arrays(index, [i.id for i in index.items], CFG, labels=True)
        assert snapshot(root) == before, root
