"""Dataset layouts: find the images (and masks) in a user's folder and list them as items.

One file per layout, each a `Layout` subclass registered by name (`base.register`); every module of this package
other than `base` and `files` is imported below, so a new layout is one new file. Listing reads only names and
volume headers; pixels are read later (`load_arrays`).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import (
    DatasetIndex,
    Item,
    LabelFacts,
    Layout,
    Problems,
    get_layout,
    layouts_by_precedence,
    layouts_in_order,
    register,
)
from ahm.data.layouts.files import children, read_json, relative_inside, stem_of
from ahm.errors import AhmError

__all__ = [
    "LAYOUTS",
    "LAYOUTS_3D",
    "DatasetIndex",
    "Item",
    "LabelFacts",
    "Layout",
    "Problems",
    "detect_layout",
    "get_layout",
    "open_dataset",
    "read_splits_file",
    "register",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "files"):
        importlib.import_module(f"{__name__}.{_module.name}")

LAYOUTS = tuple(cls.name for cls in layouts_in_order())
LAYOUTS_3D = tuple(cls.name for cls in layouts_in_order() if cls.volumes)  # the layouts that can hold volumes


def detect_layout(root: Path) -> str:
    """Name of the layout of `root`, or AhmError saying what was expected."""
    for cls in layouts_by_precedence():
        if cls.detect(root):
            return cls.name
    expected = "; ".join(f"{cls.signs} [{cls.name}]" for cls in layouts_in_order())
    raise AhmError(f"{root}: no known dataset layout found. Expected one of: {expected}")


def read_splits_file(path: Path, root: Path) -> dict[str, list[str]]:
    """Read a user's `splits.json`: {"train": [...], "val": [...], "test": [...]} of stems or ids.

    Entries may be written as relative paths (`images/a.png`); their stem is used. Absolute paths and
    `..` are refused.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise AhmError(f"{path}: must hold an object with lists 'train', 'val', 'test'")
    unknown = set(data) - {"train", "val", "test"}
    if unknown:
        raise AhmError(f"{path}: unknown split name(s) {', '.join(sorted(unknown))} (use train, val, test)")
    out: dict[str, list[str]] = {}
    for name in ("train", "val", "test"):
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise AhmError(f"{path}: '{name}' must be a list of image names")
        names = []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise AhmError(f"{path}: '{name}' holds {entry!r}; expected image names")
            if "/" in entry or "\\" in entry or entry.startswith(".."):
                entry = stem_of(relative_inside(root, entry, path, f"'{name}' entry"))
            names.append(entry)
        out[name] = names
    return out


def _find_root(path: Path) -> Path:
    if not path.exists():
        raise AhmError(f"{path}: dataset folder not found")
    if not path.is_dir():
        raise AhmError(f"{path}: not a folder; point at the folder that holds the dataset")
    for cls in layouts_by_precedence():
        nested = cls.nested_root(path)
        if nested is not None:
            return nested
    return path


def _layout_for(root: Path, cfg: DataConfig) -> type[Layout]:
    name = cfg.layout.lower()
    if name == "auto":
        name = detect_layout(root)
    cls = get_layout(name)
    if cls is None:
        raise AhmError(
            f"data.layout: unknown layout {cfg.layout!r}; choose auto or one of {', '.join(LAYOUTS)}"
        )
    # stays here: whether a layout's files can be volumes is the layout's fact, and layouts sit below ahm.pipeline
    if cfg.spatial_dims == 3 and not cls.volumes:
        raise AhmError(f"data.spatial_dims 3: layout {name!r} ({root}) holds 2D images; volumes in 3D come from "
                       f"the layouts {', '.join(LAYOUTS_3D)}, or use data.spatial_dims 2")
    if cls.required and not (root / cls.required).exists():
        raise AhmError(f"{root}: layout {name!r} needs {cls.required} in this folder")
    return cls


def _unique(items: list[Item], problems: Problems) -> list[Item]:
    seen: dict[str, Item] = {}
    kept = []
    for item in items:
        if item.id in seen:
            problems.add(
                f"{item.image}: same name as {seen[item.id].image} (item id {item.id!r}); rename one of them"
            )
            continue
        seen[item.id] = item
        kept.append(item)
    return kept


def open_dataset(path: str | Path, cfg: DataConfig, *, strict_splits: bool = True) -> DatasetIndex:
    """List the items of the dataset at `path` (layout auto-detected unless `cfg.layout` is set).

    Volumes become one item per slice along `cfg.slice_axis`, or one item each with `cfg.spatial_dims` 3 (the
    layouts `LAYOUTS_3D` only; a 2D file or a volume without voxel spacing is then a problem). Problems
    (unpaired files, unsupported files, paths leaving the folder) raise AhmError naming the file, or with
    `cfg.skip_bad` are collected in `index.problems` and those files left out. `strict_splits` False: a bad
    splits.json is one more problem instead of an error (`ahm data check`, `ahm data index`).
    """
    root = _find_root(Path(path).expanduser())
    if not children(root):
        raise AhmError(f"{root}: the dataset folder is empty")
    cls = _layout_for(root, cfg)
    layout = cls()

    problems = Problems(cfg.skip_bad)
    items, has_labels = layout.list_items(root, cfg, problems)
    items = _unique(items, problems)
    if not items:
        detail = (
            f" ({len(problems.messages)} problem(s), first: {problems.messages[0]})"
            if problems.messages
            else ""
        )
        raise AhmError(f"{root}: no usable images found for layout {cls.name!r}{detail}")
    facts = layout.label_facts(root)

    splits = None
    splits_path = root / "splits.json"
    if splits_path.is_file():
        try:
            splits = read_splits_file(splits_path, root)
        except AhmError as exc:
            if strict_splits:
                raise
            problems.messages.append(str(exc))
    else:
        try:
            own = layout.own_splits(root)
        except AhmError as exc:
            if strict_splits:
                raise
            problems.messages.append(str(exc))
            own = None
        if own is not None:
            splits_path, splits = own
    return DatasetIndex(
        root=root,
        layout=cls.name,
        items=items,
        has_labels=has_labels,
        label_values=facts.label_values,
        splits_file=splits,
        splits_path=splits_path,
        problems=problems.messages,
        modality=facts.modality,
        class_names=facts.class_names,
        mask_threshold=cls.mask_threshold,
        labels_declared_by=cls.labels_declared_by,
    )
