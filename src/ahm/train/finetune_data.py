"""The fine-tuning's data: the labelled subset drawn by subject, the splits, the training and validation sets
(2D arrays of slices, or 3D volume datasets)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ahm.config import FinetuneConfig
from ahm.errors import AhmError


@dataclass
class FinetuneData:
    """The labelled subset, its splits and the datasets made of them."""

    index: Any
    splits: dict[str, list[str]]
    labelled: list[str]
    train: Any  # ahm.data.Arrays; 3D: a VolumeDataset of training crops
    val: Any  # 3D: a VolumeDataset of whole preprocessed volumes
    val_source: str
    num_classes: int
    in_channels: int
    subjects: list[str] = field(default_factory=list)
    normalization: str = "auto"

    @property
    def n_train(self) -> int:
        return len(self.train.images) if hasattr(self.train, "images") else len(self.train)

    @property
    def train_ids(self) -> list[str]:
        return list(self.train.ids) if hasattr(self.train, "ids") else [item.id for item in self.train.items]

    @property
    def val_ids(self) -> list[str]:
        return list(self.val.ids) if hasattr(self.val, "ids") else [item.id for item in self.val.items]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AhmError(f"{path}: unreadable ({exc})") from exc


def prepare_data(cfg: FinetuneConfig, out: Path, resume: bool) -> FinetuneData:
    """Read the labelled dataset; a resumed run takes its splits and labelled subset from its run directory."""
    from ahm.data import open_dataset

    if not cfg.data.path:
        raise AhmError("DATA: no dataset path given")
    index = open_dataset(cfg.data.path, cfg.data)
    if not index.has_labels:
        raise AhmError(f"{cfg.data.path}: no masks found ({index.layout} layout); fine-tuning needs labelled images "
                       f"(e.g. masks/ beside images/ with the same file names)")
    splits, labelled = _splits_and_subset(cfg, index, out, resume)
    if cfg.data.spatial_dims == 3:
        return _prepare_volumes(cfg, index, splits, labelled)
    return _prepare_arrays(cfg, index, splits, labelled)


def _splits_and_subset(cfg: FinetuneConfig, index, out: Path, resume: bool) -> tuple[dict, list[str]]:
    from ahm.data import label_subset, make_splits

    if resume and (out / "splits.json").is_file() and (out / "labelled.json").is_file():
        splits = _read_json(out / "splits.json")
        labelled = list(_read_json(out / "labelled.json").get("ids", []))
        known = {item.id for item in index.items}
        lost = [i for i in labelled + list(splits.get("val", [])) if i not in known]
        if lost:
            raise AhmError(f"--resume: {cfg.data.path} no longer holds {lost[0]} (and {len(lost) - 1} more) "
                           f"listed in {out / 'labelled.json'}; the dataset changed since the run started")
    else:
        splits = make_splits(index, cfg.data)
        if not splits.get("train"):
            raise AhmError(f"{cfg.data.path}: no training subjects after splitting")
        labelled = label_subset(index, splits["train"], cfg.labels_fraction, cfg.train.seed,
                                subjects_count=cfg.labels_subjects)
    if not labelled:
        raise AhmError(f"--labels-fraction {cfg.labels_fraction}: gives no labelled training subjects")
    return splits, labelled


def _num_classes(cfg: FinetuneConfig, found: int) -> int:
    if cfg.num_classes is not None:
        if cfg.num_classes < found:
            raise AhmError(f"num_classes {cfg.num_classes} is too small: labels in {cfg.data.path} go up to {found - 1}")
        return cfg.num_classes
    return max(2, found)


# Preprocessed volumes are kept in memory up to this many bytes as stored (resampling changes it by the spacing
# ratio): small sets read and resample each volume once, large ones read them again each time.
VOLUME_CACHE_BYTES = 4 << 30


def _prepare_volumes(cfg: FinetuneConfig, index, splits: dict, labelled: list[str]) -> FinetuneData:
    from ahm.data.dataset import normalization_rule
    from ahm.data.volumes import raw_volume_bytes, read_volume_item, volume_dataset

    by_id = index.by_id()
    val_ids = list(splits.get("val", []))
    stored = sum(raw_volume_bytes(by_id[i]) for i in dict.fromkeys(labelled + val_ids))
    cache = stored <= VOLUME_CACHE_BYTES
    train = volume_dataset(index, labelled, cfg.data, labels=True, train=True, seed=cfg.train.seed, cache=cache)
    in_channels = int(train.prepared(0)["image"].shape[0])
    data_cfg = cfg.data.model_copy(update={"channels": in_channels})
    if cfg.data.channels != in_channels:  # the first volume decides the channels; the others are converted to it
        train = volume_dataset(index, labelled, data_cfg, labels=True, train=True, seed=cfg.train.seed, cache=cache)
    if val_ids:
        val_source = "val"
    else:
        val_ids, val_source = list(labelled), "train (no validation split)"
    val = volume_dataset(index, val_ids, data_cfg, labels=True, train=False, cache=cache)
    if index.label_values:
        found = max(index.label_values) + 1
    else:  # no declared label set: the largest label in the volumes as stored
        found = 1 + max(int(read_volume_item(by_id[i], index, data_cfg, labels=True)[1].max(initial=0))
                        for i in dict.fromkeys(labelled + val_ids))
    subjects = sorted({by_id[i].subject for i in labelled})
    return FinetuneData(index, splits, labelled, train, val, val_source, _num_classes(cfg, found), in_channels, subjects,
                 normalization_rule(data_cfg, index))


def _prepare_arrays(cfg: FinetuneConfig, index, splits: dict, labelled: list[str]) -> FinetuneData:
    from ahm.data import load_arrays

    train = load_arrays(index, labelled, cfg.data, labels=True)
    in_channels = int(train.images.shape[1])
    data_cfg = cfg.data.model_copy(update={"channels": in_channels})
    val_ids = list(splits.get("val", []))
    if val_ids:
        val, val_source = load_arrays(index, val_ids, data_cfg, labels=True), "val"
    else:
        # No validation subjects (a tiny dataset): the best epoch is chosen on the labelled training images.
        val, val_source = train, "train (no validation split)"
    found = max(int(train.labels.max(initial=0)), int(val.labels.max(initial=0)),
                max(index.label_values or [0])) + 1
    by_id = index.by_id()
    subjects = sorted({by_id[i].subject for i in train.ids})
    return FinetuneData(index, splits, labelled, train, val, val_source, _num_classes(cfg, found), in_channels, subjects,
                 train.normalization)
