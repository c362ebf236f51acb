"""Train/val/test splits by subject, and the labelled subset for few-label fine-tuning.

Slices of one volume and images of one patient look alike; putting them on two sides of a split would
measure memory, not segmentation. Every split here therefore moves whole subjects.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ahm.config import DataConfig
from ahm.data.layouts import DatasetIndex, Item
from ahm.errors import AhmError

SPLIT_NAMES = ("train", "val", "test")


def _subjects(items: list[Item]) -> OrderedDict[str, list[str]]:
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for item in items:
        groups.setdefault(item.subject, []).append(item.id)
    return groups


def _from_file(index: DatasetIndex) -> dict[str, list[str]]:
    source = index.splits_path or index.root / "splits.json"
    assert index.splits_file is not None
    by_id: dict[str, list[str]] = {item.id: [item.id] for item in index.items}
    by_volume: dict[str, list[str]] = {}
    for item in index.items:
        if item.volume is not None:
            by_volume.setdefault(item.volume, []).append(item.id)
    owner: dict[str, str] = {}
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for name in SPLIT_NAMES:
        for entry in index.splits_file.get(name, []):
            ids = by_id.get(entry) or by_volume.get(entry)
            if ids is None:
                from ahm.data.layouts.files import safe_id

                ids = by_id.get(safe_id(entry)) or by_volume.get(safe_id(entry))
            if ids is None:
                raise AhmError(f"{source}: '{name}' lists {entry!r}, which is not an image of this dataset")
            for ident in ids:
                if ident in owner and owner[ident] != name:
                    raise AhmError(f"{source}: {entry!r} is in both '{owner[ident]}' and '{name}'")
                if ident not in owner:
                    owner[ident] = name
                    out[name].append(ident)
    if not out["train"]:
        raise AhmError(f"{source}: 'train' is empty; at least one training image is needed")
    return out


def make_splits(index: DatasetIndex, cfg: DataConfig) -> dict[str, list[str]]:
    """Item ids for train/val/test, whole subjects per side, seeded by `cfg.split_seed`.

    A `splits.json` in the dataset folder wins (items it does not list are left out). A layout's own test split
    (img-anno's Test/ folder) is kept, validation drawn from the rest by subject. Otherwise
    `cfg.val_fraction` and `cfg.test_fraction` of the subjects go to val and test (at least one subject
    each when the fraction is positive and there are three subjects or more); train always keeps one.
    """
    if index.splits_file is not None:
        return _from_file(index)
    fixed = [item for item in index.items if item.split is not None]
    if fixed:
        return _with_fixed_splits(index, cfg)
    groups = _subjects(index.items)
    subjects = sorted(groups)
    n = len(subjects)
    order = [subjects[k] for k in np.random.default_rng(cfg.split_seed).permutation(n)]

    def share(fraction: float) -> int:
        count = round(fraction * n)
        return max(count, 1) if fraction > 0 and n >= 3 else count

    n_test, n_val = share(cfg.test_fraction), share(cfg.val_fraction)
    while n > 0 and n_test + n_val > n - 1:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    chosen = {
        "test": set(order[:n_test]),
        "val": set(order[n_test : n_test + n_val]),
    }
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for item in index.items:  # dataset order inside each split: stable and easy to read
        side = (
            "test" if item.subject in chosen["test"] else "val" if item.subject in chosen["val"] else "train"
        )
        out[side].append(item.id)
    return out


def _with_fixed_splits(index: DatasetIndex, cfg: DataConfig) -> dict[str, list[str]]:
    """A layout that fixes the test split (img-anno's Test/): those items are the test split; validation is
    `cfg.val_fraction` of the other items' subjects (seeded, at least one when positive and there are two or more)."""
    rest = [item for item in index.items if item.split is None]
    subjects = sorted({item.subject for item in rest})
    n = len(subjects)
    order = [subjects[k] for k in np.random.default_rng(cfg.split_seed).permutation(n)]
    n_val = round(cfg.val_fraction * n)
    if cfg.val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    val = set(order[:n_val])
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for item in index.items:
        side = item.split if item.split is not None else ("val" if item.subject in val else "train")
        out[side].append(item.id)
    if not out["train"]:
        raise AhmError(f"{index.root}: no training images (Train/img is empty)")
    return out


def label_subset(index: DatasetIndex, train_ids: list[str], fraction: float, seed: int,
                 subjects_count: int | None = None) -> list[str]:
    """The training ids whose labels fine-tuning may use: `fraction` of the training subjects, or exactly
    `subjects_count` of them when given, drawn with `seed`.

    The draw is a seeded permutation of the sorted subjects, cut after the first n: for one seed, the subjects
    labelled at n are among those labelled at any larger n (a label-efficiency curve is nested)."""
    if subjects_count is None and not 0.0 < fraction <= 1.0:
        raise AhmError(f"--labels-fraction must be in (0, 1], got {fraction}")
    subject_of = {item.id: item.subject for item in index.items}
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for ident in train_ids:
        if ident not in subject_of:
            raise AhmError(f"{index.root}: unknown item id {ident!r} in the training split")
        groups.setdefault(subject_of[ident], []).append(ident)
    subjects = sorted(groups)
    if subjects_count is not None:
        if not 1 <= subjects_count <= len(subjects):
            raise AhmError(f"--labels-subjects {subjects_count}: the training split has {len(subjects)} subjects; "
                           f"use 1 to {len(subjects)}")
        keep_n = subjects_count
    else:
        keep_n = len(subjects) if fraction >= 1.0 else round(fraction * len(subjects))
    if keep_n == 0:
        raise AhmError(
            f"--labels-fraction {fraction}: keeps no subject out of the {len(subjects)} "
            "in the training split; "
            f"use at least {1.0 / max(len(subjects), 1):.3g}"
        )
    rng = np.random.default_rng(seed)
    keep = {subjects[k] for k in rng.permutation(len(subjects))[:keep_n]}
    return [ident for ident in train_ids if subject_of[ident] in keep]
