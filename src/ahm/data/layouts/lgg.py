"""`lgg`: the Kaggle LGG MRI segmentation download (patient folders of `<slice>.tif` + `<slice>_mask.tif`); the
patient folder is the subject."""

from __future__ import annotations

import re
from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, OneStructureLayout, Problems, register
from ahm.data.layouts.files import children, safe_id, stem_of

_LGG_MASK = re.compile(r"^(?P<base>.+)_mask$")


@register
class LggLayout(OneStructureLayout):
    name = "lgg"
    order = 30
    precedence = 60
    signs = "patient folders with *_mask.tif"
    structure = "FLAIR abnormality"

    @classmethod
    def nested_root(cls, path: Path) -> Path | None:
        # The Kaggle download nests the patient folders one level down; a folder or msd dataset that happens
        # to hold such a folder stays what it is.
        nested = path / "kaggle_3m"
        if nested.is_dir() and not (path / "images").is_dir() and not (path / "dataset.json").is_file():
            return nested
        return None

    @classmethod
    def detect(cls, root: Path) -> bool:
        for sub in children(root):
            if sub.is_dir() and any(p.name.lower().endswith("_mask.tif") for p in sub.iterdir()):
                return True
        return False

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        items = []
        for patient in children(root):
            if not patient.is_dir():
                continue  # data.csv, README.md beside the patient folders
            files = [p for p in children(patient) if p.is_file()]
            images = {
                stem_of(p): p
                for p in files
                if p.suffix.lower() in (".tif", ".tiff") and not _LGG_MASK.match(stem_of(p))
            }
            masks = {}
            for p in files:
                match = _LGG_MASK.match(stem_of(p))
                if match and p.suffix.lower() in (".tif", ".tiff"):
                    masks[match["base"]] = p
            subject = safe_id(patient.name)
            for stem, image in images.items():
                if stem not in masks:
                    problems.add(f"{image}: no mask {stem}_mask.tif beside this slice")
                    continue
                items.append(Item(id=safe_id(stem), subject=subject, image=image, mask=masks[stem]))
            for stem, mask in masks.items():
                if stem not in images:
                    problems.add(f"{mask}: mask without its image {stem}.tif")
        return items, True
