"""`img-anno`: the layout of the AHM authors' loaders: Train/img + Train/anno (train and validation, drawn by
subject) and Test/img + Test/anno (the test split), 8-bit PNG/TIFF slices."""

from __future__ import annotations

import re
from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, LabelFacts, Layout, Problems, register
from ahm.data.layouts.files import (
    LISTED_IMAGE_SUFFIXES,
    child_dir,
    children,
    is_ignorable,
    is_image_file,
    labels_json_names,
    safe_id,
    stem_of,
    subject_of_stem,
)
from ahm.errors import AhmError

_TRAILING_NUMBER = re.compile(r"^(?P<subject>.+?)[ _-]+\d+$")


def subject_of_slice_name(stem: str) -> str:
    """The subject of a slice file: the part before `__` if there is one (as in the folder layout), else the stem
    without its trailing slice number (`TCGA_CS_4941_19960909_12` -> `TCGA_CS_4941_19960909`, the Kaggle LGG
    patient scan; `la_003_45` -> `la_003`); a stem without a trailing number is its own subject."""
    if "__" in stem:
        return subject_of_stem(stem)
    match = _TRAILING_NUMBER.match(stem)
    return match["subject"] if match else stem


def _split_dirs(root: Path) -> dict[str, Path]:
    """{"Train": path, "Test": path} of the split folders that hold an img/ folder (any letter case)."""
    found = {}
    for sub in children(root):
        name = sub.name.lower()
        if sub.is_dir() and name in ("train", "test") and child_dir(sub, "img") is not None:
            found[name.title()] = sub
    return found


@register
class ImgAnnoLayout(Layout):
    name = "img-anno"
    order = 70
    precedence = 10
    signs = "Train/img, Train/anno, Test/img, Test/anno"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return "Train" in _split_dirs(root)

    def label_facts(self, root: Path) -> LabelFacts:
        # The authors' 8-bit PNG/TIFF slices, read as value / 255.
        return LabelFacts(modality="photo", class_names=labels_json_names(root))

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        """An annotation is paired with its image by name: the same stem, or the stem plus `_mask` (the Kaggle
        LGG naming), any image suffix."""
        splits = _split_dirs(root)
        if "Train" not in splits:
            raise AhmError(f"{root}: layout 'img-anno' needs Train/img in this folder")
        listed: list[tuple[str, Path, Path | None]] = []  # (split, image dir, anno dir)
        for name in ("Train", "Test"):
            if name in splits:
                img_dir = child_dir(splits[name], "img")
                assert img_dir is not None
                listed.append((name, img_dir, child_dir(splits[name], "anno")))
        labelled = any(anno is not None and any(not is_ignorable(p) for p in children(anno))
                       for _, _, anno in listed)
        items: list[Item] = []
        for name, img_dir, anno_dir in listed:
            annos: dict[str, Path] = {}
            for anno in children(anno_dir) if anno_dir is not None else []:
                if is_ignorable(anno):
                    continue
                if not is_image_file(anno):
                    problems.add(f"{anno}: unsupported annotation file type (expected "
                                 f"{', '.join(LISTED_IMAGE_SUFFIXES)})")
                    continue
                stem = stem_of(anno)
                if stem in annos:
                    problems.add(f"{anno}: two annotations named {stem!r} (also {annos[stem]})")
                    continue
                annos[stem] = anno
            used: set[str] = set()
            for image in children(img_dir):
                if is_ignorable(image):
                    continue
                if not is_image_file(image):
                    problems.add(f"{image}: unsupported file type (expected {', '.join(LISTED_IMAGE_SUFFIXES)})")
                    continue
                stem = stem_of(image)
                mask = None
                if labelled:
                    key = next((k for k in (stem, f"{stem}_mask") if k in annos), None)
                    if key is None:
                        where = anno_dir if anno_dir is not None else img_dir.parent / "anno"
                        problems.add(f"{image}: no annotation for this image in {where} (expected {stem}.<ext> or "
                                     f"{stem}_mask.<ext>)")
                        continue
                    used.add(key)
                    mask = annos[key]
                items.append(Item(id=safe_id(stem), subject=safe_id(subject_of_slice_name(stem)), image=image,
                                  mask=mask, split="test" if name == "Test" else None))
            for key, anno in annos.items():
                if key not in used:
                    problems.add(f"{anno}: annotation without an image in {img_dir}")
        return items, labelled
