"""Splits move whole subjects, follow the seed, honour splits.json; the labelled subset is by subject."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import make_folder_fixture, make_folder_volume_fixture
from hypothesis import given
from hypothesis import strategies as st

from ahm.config import DataConfig
from ahm.data import DatasetIndex, Item, label_subset, make_splits, open_dataset
from ahm.errors import AhmError


def _index(sizes: list[int]) -> DatasetIndex:
    items = [
        Item(id=f"s{s}__{k}", subject=f"s{s}", image=Path(f"/d/s{s}__{k}.png"), mask=None)
        for s, n in enumerate(sizes)
        for k in range(n)
    ]
    return DatasetIndex(root=Path("/d"), layout="folder", items=items, has_labels=False)


def _side_of_subject(index: DatasetIndex, splits: dict[str, list[str]]) -> dict[str, set[str]]:
    subject = {i.id: i.subject for i in index.items}
    sides: dict[str, set[str]] = {}
    for side, ids in splits.items():
        for ident in ids:
            sides.setdefault(subject[ident], set()).add(side)
    return sides


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=30),
    seed=st.integers(0, 2**31),
    val=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
    test=st.sampled_from([0.0, 0.15, 0.3, 0.5]),
)
def test_splits_partition_items_by_subject(sizes, seed, val, test):
    index = _index(sizes)
    cfg = DataConfig(split_seed=seed, val_fraction=val, test_fraction=test)
    splits = make_splits(index, cfg)
    all_ids = [i for ids in splits.values() for i in ids]
    assert sorted(all_ids) == sorted(i.id for i in index.items)  # every item once
    assert all(len(sides) == 1 for sides in _side_of_subject(index, splits).values())
    assert splits["train"]
    if len(sizes) >= 3 and test > 0:
        assert splits["test"]
    assert make_splits(index, cfg) == splits


def test_seed_changes_the_split_and_fractions_are_respected():
    index = _index([2] * 20)
    a = make_splits(index, DataConfig(split_seed=0))
    b = make_splits(index, DataConfig(split_seed=1))
    assert a != b
    assert len(a["test"]) == len(a["val"]) == 6  # 3 of 20 subjects each, 2 items per subject


def test_slices_of_one_volume_stay_together(tmp_path: Path):
    root = make_folder_volume_fixture(tmp_path / "v", volumes=4, shape=(12, 12, 5))
    index = open_dataset(root, DataConfig(val_fraction=0.25, test_fraction=0.25))
    splits = make_splits(index, DataConfig(val_fraction=0.25, test_fraction=0.25))
    volume = {i.id: i.volume for i in index.items}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [10, 5, 5]
    for ids in splits.values():
        assert len({volume[i] for i in ids}) <= 2
    assert all(len(s) == 1 for s in _side_of_subject(index, splits).values())


def test_splits_json_is_honoured(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a", subjects=3, per_subject=2)
    (root / "splits.json").write_text(
        json.dumps(
            {"train": ["p00__0", "images/p00__1.png", "p01__0"], "val": ["p01__1"], "test": ["p02__0"]}
        )
    )
    index = open_dataset(root, DataConfig())
    splits = make_splits(index, DataConfig(split_seed=5))
    assert splits == {"train": ["p00__0", "p00__1", "p01__0"], "val": ["p01__1"], "test": ["p02__0"]}


def test_splits_json_may_name_whole_volumes(tmp_path: Path):
    root = make_folder_volume_fixture(tmp_path / "v", volumes=2, shape=(8, 8, 3))
    (root / "splits.json").write_text(json.dumps({"train": ["case1"], "val": [], "test": ["case0__z001"]}))
    splits = make_splits(open_dataset(root, DataConfig()), DataConfig())
    assert splits == {
        "train": ["case1__z000", "case1__z001", "case1__z002"],
        "val": [],
        "test": ["case0__z001"],
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": ["p00__0", "ghost"]}, r"'train' lists 'ghost', which is not an image of this dataset"),
        ({"train": ["p00__0"], "test": ["p00__0"]}, r"'p00__0' is in both 'train' and 'test'"),
        ({"train": []}, r"'train' is empty"),
    ],
)
def test_bad_splits_json_is_named(tmp_path: Path, content, message):
    root = make_folder_fixture(tmp_path / "a")
    (root / "splits.json").write_text(json.dumps(content))
    index = open_dataset(root, DataConfig())
    with pytest.raises(AhmError, match=rf"splits\.json: {message}"):
        make_splits(index, DataConfig())


@pytest.mark.parametrize(
    "content, message",
    [
        ({"training": []}, r"unknown split name\(s\) training"),
        ({"train": "p00__0"}, r"'train' must be a list"),
        ([1, 2], r"must hold an object"),
    ],
)
def test_malformed_splits_json_is_refused_when_opening(tmp_path: Path, content, message):
    root = make_folder_fixture(tmp_path / "a")
    (root / "splits.json").write_text(json.dumps(content))
    with pytest.raises(AhmError, match=rf"splits\.json: {message}"):
        open_dataset(root, DataConfig())


def test_label_subset_takes_whole_training_subjects():
    index = _index([3] * 10)
    train = [i.id for i in index.items]
    subset = label_subset(index, train, 0.3, seed=0)
    subjects = {i.split("__")[0] for i in subset}
    assert len(subjects) == 3 and len(subset) == 9
    assert subset == [i for i in train if i in subset]  # keeps the training order
    assert label_subset(index, train, 0.3, seed=0) == subset
    assert label_subset(index, train, 0.3, seed=1) != subset
    assert label_subset(index, train, 1.0, seed=0) == train


def test_label_subset_by_subject_count_is_exact_and_nested():
    index = _index([3] * 10)
    train = [i.id for i in index.items]
    drawn = {}
    for n in (1, 2, 5, 10):
        subset = label_subset(index, train, 1.0, seed=7, subjects_count=n)
        drawn[n] = {i.split("__")[0] for i in subset}
        assert len(drawn[n]) == n and len(subset) == 3 * n
    assert drawn[1] < drawn[2] < drawn[5] < drawn[10]  # one seed: a larger budget keeps the smaller one's subjects
    assert label_subset(index, train, 1.0, seed=8, subjects_count=2) != label_subset(index, train, 1.0, seed=7,
                                                                                      subjects_count=2)
    for bad in (0, 11):
        with pytest.raises(AhmError, match=rf"--labels-subjects {bad}: the training split has 10 subjects"):
            label_subset(index, train, 1.0, seed=0, subjects_count=bad)


def test_label_subset_refuses_to_keep_nothing():
    index = _index([2] * 4)
    with pytest.raises(AhmError, match=r"--labels-fraction 0\.1: keeps no subject out of the 4"):
        label_subset(index, [i.id for i in index.items], 0.1, seed=0)
