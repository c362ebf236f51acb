"""`msd`: the Medical Segmentation Decathlon layout (dataset.json listing imagesTr/ and labelsTr/ volumes), also
what `ahm data brain-subjects --volumes` writes. dataset.json declares the labels, their names and the modality."""

from __future__ import annotations

from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, LabelFacts, Layout, Problems, register
from ahm.data.layouts.files import (
    read_class_names,
    read_json,
    relative_inside,
    safe_id,
    stem_of,
    volume_items,
)
from ahm.errors import AhmError


def _msd_meta(root: Path) -> tuple[dict, list[int] | None, str | None]:
    source = root / "dataset.json"
    meta = read_json(source)
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise AhmError(f"{source}: not a Medical Segmentation Decathlon dataset.json (no 'training' list)")
    labels = meta.get("labels")
    label_values = None
    if labels is not None:
        try:
            label_values = sorted(int(k) for k in labels)
        except (TypeError, ValueError) as exc:
            raise AhmError(f'{source}: \'labels\' keys must be integers such as "0", "1"') from exc
    modality = None
    names = meta.get("modality")
    if isinstance(names, dict) and names:
        values = {str(v).strip().lower() for v in names.values()}
        modality = "ct" if values == {"ct"} else "mri"
    return meta, label_values, modality


@register
class MsdLayout(Layout):
    name = "msd"
    order = 20
    precedence = 20
    signs = "dataset.json with imagesTr/ labelsTr/"
    volumes = True
    required = "dataset.json"
    labels_declared_by = "dataset.json"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "dataset.json").is_file()

    def label_facts(self, root: Path) -> LabelFacts:
        meta, label_values, modality = _msd_meta(root)
        class_names = None
        if meta.get("labels") is not None:
            class_names = read_class_names(root / "dataset.json", meta["labels"])
        return LabelFacts(label_values=label_values, modality=modality, class_names=class_names)

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        source = root / "dataset.json"
        meta, _, _ = _msd_meta(root)
        items: list[Item] = []
        for n, entry in enumerate(meta["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                problems.add(f"{source}: training entry {n} must have 'image' and 'label'")
                continue
            try:
                image = relative_inside(root, entry["image"], source, f"training[{n}].image")
                label = relative_inside(root, entry["label"], source, f"training[{n}].label")
            except AhmError as exc:
                problems.add(str(exc))
                continue
            missing = [p for p in (image, label) if not p.exists()]
            if missing:
                for p in missing:
                    problems.add(f"{p}: listed in {source} but missing")
                continue
            stem = stem_of(image)
            items.extend(volume_items(stem, safe_id(stem), image, label, cfg, problems))
        # The test entries are unlabelled and unused, but a path escaping the folder is still refused.
        for n, entry in enumerate(meta.get("test") or []):
            try:
                relative_inside(
                    root, entry if isinstance(entry, str) else (entry or {}).get("image"), source, f"test[{n}]"
                )
            except AhmError as exc:
                problems.add(str(exc))
        return items, True
