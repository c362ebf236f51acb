"""`busi`: the Breast Ultrasound Images download (benign/ malignant/ normal/ of `<name>.png` with
`<name>_mask.png`, further lesions as `<name>_mask_1.png`, ... merged into one mask)."""

from __future__ import annotations

import re
from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, OneStructureLayout, Problems, register
from ahm.data.layouts.files import LISTED_IMAGE_SUFFIXES, children, is_ignorable, safe_id, stem_of

_BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_MASK = re.compile(r"^(?P<base>.+)_mask(?:_(?P<k>\d+))?$")


@register
class BusiLayout(OneStructureLayout):
    name = "busi"
    order = 40
    precedence = 50
    signs = "benign/ malignant/ normal/"
    structure = "lesion"

    @classmethod
    def detect(cls, root: Path) -> bool:
        subs = {p.name.lower() for p in children(root) if p.is_dir()}
        return bool(subs & set(_BUSI_CLASSES)) and subs <= set(_BUSI_CLASSES)

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        items = []
        for class_dir in children(root):
            if not class_dir.is_dir():
                continue
            images: dict[str, Path] = {}
            masks: dict[str, list[tuple[int, Path]]] = {}
            for p in children(class_dir):
                if not p.is_file() or is_ignorable(p):
                    continue
                if p.suffix.lower() not in LISTED_IMAGE_SUFFIXES:
                    problems.add(f"{p}: unsupported file type for BUSI (expected .png)")
                    continue
                match = _BUSI_MASK.match(stem_of(p))
                if match:
                    masks.setdefault(match["base"], []).append((int(match["k"] or 0), p))
                else:
                    images[stem_of(p)] = p
            for stem, image in images.items():
                found = sorted(masks.get(stem, []))
                if not found:
                    problems.add(f"{image}: no mask {stem}_mask.png beside this image")
                    continue
                ident = safe_id(stem)
                items.append(
                    Item(
                        id=ident,
                        subject=ident,
                        image=image,
                        mask=found[0][1],
                        extra_masks=tuple(p for _, p in found[1:]),
                    )
                )
            for stem, found in masks.items():
                if stem not in images:
                    for _, p in found:
                        problems.add(f"{p}: mask without its image {stem}.png")
        return items, True
