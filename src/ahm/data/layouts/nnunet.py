"""`nnunet`: nnU-Net v2's raw dataset layout (`DatasetNNN_Name/`: dataset.json, imagesTr/CASE_XXXX.ext, one file
per channel XXXX, labelsTr/CASE.ext, optional imagesTs/). dataset.json declares the channels, the labels (name ->
value) and the file ending. nnU-Net's cross-validation split (`splits_final.json`) is honoured when it lies beside
dataset.json: fold 0's train and val cases, every other labelled case nowhere (nnU-Net's test cases are imagesTs,
unlabelled)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, LabelFacts, Layout, Problems, register
from ahm.data.layouts.files import children, read_json, safe_id, volume_items
from ahm.errors import AhmError

_VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SPLITS_FILE = "splits_final.json"


def _meta(root: Path) -> dict:
    source = root / "dataset.json"
    meta = read_json(source)
    if not isinstance(meta, dict):
        raise AhmError(f"{source}: not an nnU-Net dataset.json (an object with channel_names, labels, file_ending)")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise AhmError(f"{source}: nnU-Net dataset.json needs {key!r}")
    if not isinstance(meta["channel_names"], dict) or not meta["channel_names"]:
        raise AhmError(f"{source}: 'channel_names' must map channel indices to names, e.g. {{\"0\": \"CT\"}}")
    if not isinstance(meta["labels"], dict) or not meta["labels"]:
        raise AhmError(f"{source}: 'labels' must map names to values, e.g. {{\"background\": 0, \"tumour\": 1}}")
    for name, value in meta["labels"].items():
        if isinstance(value, (list, tuple)):
            raise AhmError(f"{source}: label {name!r} is region-based ({value}); ahm reads plain label maps only")
        if isinstance(value, bool) or not isinstance(value, int):
            raise AhmError(f"{source}: label {name!r} must have an integer value, got {value!r}")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise AhmError(f"{source}: 'file_ending' must be a file ending such as \".nii.gz\" or \".png\"")
    if "dataset" in meta:
        raise AhmError(f"{source}: a 'dataset' list of file locations is not supported; use imagesTr/ and labelsTr/")
    return meta


def _modality(meta: dict) -> str:
    names = {str(v).strip().lower() for v in meta["channel_names"].values()}
    if names == {"ct"}:
        return "ct"
    return "mri" if meta["file_ending"].lower() in _VOLUME_ENDINGS else "photo"


def case_channels(images_dir: Path, ending: str, problems: Problems) -> dict[str, list[Path]]:
    """{case: its channel files, channel 0 first} of an nnU-Net images folder."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    for path in children(images_dir):
        match = pattern.match(path.name)
        if match is None:
            if path.name.endswith(ending):
                problems.add(f"{path}: not named CASE_XXXX{ending} (XXXX the channel index)")
            continue
        found.setdefault(match.group(1), {})[int(match.group(2))] = path
    cases: dict[str, list[Path]] = {}
    for case, files in sorted(found.items()):
        if sorted(files) != list(range(len(files))):
            problems.add(f"{images_dir}: case {case} has channels {sorted(files)}; nnU-Net numbers them 0000, 0001, ...")
            continue
        cases[case] = [files[k] for k in range(len(files))]
    return cases


def read_nnunet_splits(path: Path, fold: int = 0) -> dict[str, list[str]]:
    """Fold `fold`'s {"train": cases, "val": cases, "test": []} of nnU-Net's splits_final.json."""
    data = read_json(path)
    if not isinstance(data, list) or len(data) <= fold or not isinstance(data[fold], dict):
        raise AhmError(f"{path}: not an nnU-Net splits_final.json (a list of {{'train': [...], 'val': [...]}} per fold)")
    split = data[fold]
    out: dict[str, list[str]] = {"test": []}
    for name in ("train", "val"):
        cases = split.get(name)
        if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
            raise AhmError(f"{path}: fold {fold} needs a list of case names under {name!r}")
        out[name] = [safe_id(c) for c in cases]
    return out


@register
class NnunetLayout(Layout):
    name = "nnunet"
    order = 25
    # before msd: both keep a dataset.json beside imagesTr/
    precedence = 15
    signs = "dataset.json with channel_names and file_ending, imagesTr/CASE_0000.ext, labelsTr/"
    volumes = True
    required = "dataset.json"
    labels_declared_by = "dataset.json"

    @classmethod
    def detect(cls, root: Path) -> bool:
        source = root / "dataset.json"
        if not source.is_file() or not (root / "imagesTr").is_dir():
            return False
        try:
            meta = read_json(source)
        except AhmError:
            return False
        return isinstance(meta, dict) and "channel_names" in meta and "file_ending" in meta

    def label_facts(self, root: Path) -> LabelFacts:
        meta = _meta(root)
        labels = meta["labels"]
        return LabelFacts(label_values=sorted(set(labels.values())), modality=_modality(meta),
                          class_names={value: str(name) for name, value in labels.items()})

    def own_splits(self, root: Path) -> tuple[Path, dict[str, list[str]]] | None:
        """Fold 0 of splits_final.json beside dataset.json, else in $nnUNet_preprocessed/<this folder's name>/
        (where nnU-Net's training writes it)."""
        places = [root / SPLITS_FILE]
        preprocessed = os.environ.get("nnUNet_preprocessed")  # noqa: SIM112 - nnU-Net's own name
        if preprocessed:
            places.append(Path(preprocessed) / root.name / SPLITS_FILE)
        for path in places:
            if path.is_file():
                return path, read_nnunet_splits(path)
        return None

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        meta = _meta(root)
        ending = meta["file_ending"]
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        if not images_dir.is_dir():
            raise AhmError(f"{root}: nnU-Net dataset without imagesTr/")
        volumes = ending.lower() in _VOLUME_ENDINGS
        items: list[Item] = []
        for case, files in case_channels(images_dir, ending, problems).items():
            label = labels_dir / f"{case}{ending}"
            if not label.is_file():
                problems.add(f"{files[0]}: no label {label.name} in {labels_dir}")
                continue
            extra = tuple(files[1:])
            if volumes:
                found = volume_items(case, safe_id(case), files[0], label, cfg, problems)
            else:
                found = [Item(id=safe_id(case), subject=safe_id(case), image=files[0], mask=label)]
            items.extend(_with_channels(item, extra) for item in found)
        return items, True


def _with_channels(item: Item, extra: tuple[Path, ...]) -> Item:
    item.channel_files = extra
    return item
