"""The fine-tuning's data: the labelled subset drawn by subject, the splits, and the training and validation sets
the run's pipeline (`ahm.pipeline`: 2D arrays of slices, or 3D volume datasets) prepares from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ahm.config import FinetuneConfig
from ahm.errors import AhmError
from ahm.pipeline import pipeline_for


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
    prepared = pipeline_for(cfg).prepare_labelled(cfg, index, splits, labelled)
    return FinetuneData(index, splits, labelled, prepared.train, prepared.val, prepared.val_source,
                        _num_classes(cfg, prepared.found_classes), prepared.in_channels, prepared.subjects,
                        prepared.normalization)


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
