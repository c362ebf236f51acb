"""`kvasir`: images/ + masks/ of JPEG files (Kvasir-SEG). Lossy JPEG masks carry compression noise around the
edges, so they are binarised at mid-grey rather than read as label values."""

from __future__ import annotations

from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, OneStructureLayout, Problems, register
from ahm.data.layouts.files import children, is_ignorable, is_image_file, safe_id, stem_of


@register
class KvasirLayout(OneStructureLayout):
    name = "kvasir"
    order = 60
    precedence = 30  # before folder, whose images/ it shares
    signs = "images/ + masks/ of .jpg"
    required = "images"
    structure = "polyp"
    mask_threshold = 128  # mid-grey splits the JPEG edge noise cleanly, whatever the suffix

    @classmethod
    def detect(cls, root: Path) -> bool:
        masks = root / "masks"
        if not (root / "images").is_dir() or not masks.is_dir():
            return False
        mask_files = [p for p in children(masks) if p.is_file() and not is_ignorable(p)]
        # JPEG masks are what makes Kvasir different: they need thresholding, not exact label values.
        return bool(mask_files) and all(p.suffix.lower() in (".jpg", ".jpeg") for p in mask_files)

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        masks = {stem_of(p): p for p in children(root / "masks") if p.is_file() and not is_ignorable(p)}
        items, used = [], set()
        for image in children(root / "images"):
            if is_ignorable(image):
                continue
            if not is_image_file(image):
                problems.add(f"{image}: unsupported file type for Kvasir (expected .jpg)")
                continue
            stem = stem_of(image)
            if stem not in masks:
                problems.add(f"{image}: no mask for this image in {root / 'masks'}")
                continue
            used.add(stem)
            items.append(Item(id=safe_id(stem), subject=safe_id(stem), image=image, mask=masks[stem]))
        for stem, mask in masks.items():
            if stem not in used:
                problems.add(f"{mask}: mask without an image in {root / 'images'}")
        return items, True
