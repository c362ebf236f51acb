"""`folder`: images/ (+ optional masks/ with the same stems), any readable 2D file or volume; the subject is the
part of a stem before `__`. Class names may come from a labels.json beside images/."""

from __future__ import annotations

from pathlib import Path

from ahm.config import DataConfig
from ahm.data.layouts.base import Item, LabelFacts, Layout, Problems, register
from ahm.data.layouts.files import (
    SUPPORTED,
    VOLUME_KINDS,
    children,
    detached_data,
    file_kind,
    is_dicom_dir,
    is_ignorable,
    labels_json_names,
    safe_id,
    stem_of,
    subject_of_stem,
    volume_items,
)
from ahm.errors import AhmError


@register
class FolderLayout(Layout):
    name = "folder"
    order = 10
    precedence = 40
    signs = "images/ (+ optional masks/)"
    volumes = True
    required = "images"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "images").is_dir()

    def label_facts(self, root: Path) -> LabelFacts:
        return LabelFacts(class_names=labels_json_names(root))

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        images_dir, masks_dir = root / "images", root / "masks"
        entries = children(images_dir)
        mask_entries = children(masks_dir) if masks_dir.is_dir() else []
        mask_entries = [m for m in mask_entries if not is_ignorable(m)]
        labelled = bool(mask_entries)

        data_files = detached_data(entries + mask_entries)
        masks_by_stem: dict[str, Path] = {}
        for mask_file in mask_entries:
            if mask_file in data_files:
                continue
            try:
                kind = file_kind(mask_file)
            except AhmError as exc:
                problems.add(str(exc))
                continue
            if kind is None and not is_dicom_dir(mask_file):
                problems.add(f"{mask_file}: unsupported mask file type (expected {SUPPORTED})")
                continue
            stem = stem_of(mask_file)
            if stem in masks_by_stem:
                problems.add(f"{mask_file}: two masks named {stem!r} (also {masks_by_stem[stem]})")
                continue
            masks_by_stem[stem] = mask_file

        items: list[Item] = []
        used_masks: set[str] = set()
        saw_image = False
        for entry in entries:
            if is_ignorable(entry) or entry in data_files:
                continue
            try:
                kind = file_kind(entry)
            except AhmError as exc:
                problems.add(str(exc))
                continue
            is_volume = kind == "volume" or is_dicom_dir(entry)
            if not is_volume and kind != "image":
                problems.add(f"{entry}: unsupported file type (expected {SUPPORTED} or a folder of DICOM files)")
                continue
            saw_image = True
            stem = stem_of(entry)
            mask: Path | None = None
            if labelled:
                for key in (stem, f"{stem}_mask"):
                    if key in masks_by_stem:
                        mask = masks_by_stem[key]
                        used_masks.add(key)
                        break
                if mask is None:
                    problems.add(
                        f"{entry}: no mask for this image in {masks_dir} (expected {stem}.<ext>); "
                        "either every image has a mask or there is no masks/ folder"
                    )
                    continue
            subject = safe_id(subject_of_stem(stem))
            if is_volume:
                items.extend(volume_items(stem, subject, entry, mask, cfg, problems))
            elif cfg.spatial_dims == 3:
                # A stack of 2D files has no slice spacing or orientation to resample by (a fact about the files
                # this layout lists, decided here: layouts sit below ahm.pipeline).
                problems.add(f"{entry}: a 2D image has no voxel spacing; data.spatial_dims 3 needs volumes "
                             f"({VOLUME_KINDS})")
            else:
                items.append(Item(id=safe_id(stem), subject=subject, image=entry, mask=mask))
        for key, unused in masks_by_stem.items():
            if key not in used_masks:
                problems.add(f"{unused}: mask without an image in {images_dir}")
        if not saw_image and not problems.messages:
            raise AhmError(f"{images_dir}: no images found")
        return items, labelled
