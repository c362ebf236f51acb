"""`isic`: the ISIC skin-lesion challenge downloads (`ISIC_<n>.jpg` + `ISIC_<n>_segmentation.png`, in the folder
or one level down)."""

from __future__ import annotations

import re
from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, OneStructureLayout, Problems, register
from ahm.data.layouts.files import children

_ISIC_IMAGE = re.compile(r"^(ISIC_\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d+)_segmentation\.png$", re.IGNORECASE)


def _isic_files(root: Path) -> list[Path]:
    found = []
    for top in children(root):
        if top.is_file():
            found.append(top)
        elif top.is_dir():
            found.extend(p for p in children(top) if p.is_file())
    return [p for p in found if _ISIC_IMAGE.match(p.name) or _ISIC_MASK.match(p.name)]


@register
class IsicLayout(OneStructureLayout):
    name = "isic"
    order = 50
    precedence = 70
    signs = "ISIC_*.jpg + ISIC_*_segmentation.png"
    structure = "lesion"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return bool(_isic_files(root))

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for p in _isic_files(root):
            image_match, mask_match = _ISIC_IMAGE.match(p.name), _ISIC_MASK.match(p.name)
            target, key = (images, image_match[1]) if image_match else (masks, mask_match[1])  # type: ignore[index]
            if key in target:
                problems.add(f"{p}: {key} appears twice (also {target[key]})")
                continue
            target[key] = p
        items = []
        for key, image in sorted(images.items()):
            if key not in masks:
                problems.add(f"{image}: no mask {key}_segmentation.png found under {root}")
                continue
            items.append(Item(id=key, subject=key, image=image, mask=masks[key]))
        for key, mask in sorted(masks.items()):
            if key not in images:
                problems.add(f"{mask}: mask without its image {key}.jpg")
        return items, True
