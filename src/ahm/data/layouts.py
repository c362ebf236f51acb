"""Dataset layouts: find the images (and masks) in a user's folder and list them as items.

Each supported layout copies the way the public dataset is distributed, so a user can point `ahm` at the
unpacked download. Listing reads only names and volume headers; pixels are read later (`load_arrays`).
Nothing is ever written into the dataset folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ahm.config import DataConfig
from ahm.data.formats import HEADER_KIND_SUFFIXES
from ahm.errors import AhmError

LAYOUTS = ("folder", "msd", "lgg", "busi", "isic", "kvasir", "img-anno")
LAYOUTS_3D = ("folder", "msd")  # the layouts that can hold volumes (data.spatial_dims 3)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii.gz", ".nii")
# DICOM files and NRRD/MetaImage: a 2D image or a volume, as their header says (frames, slices).
_SUPPORTED = ", ".join(IMAGE_SUFFIXES + VOLUME_SUFFIXES + HEADER_KIND_SUFFIXES)
_VOLUME_KINDS = "NIfTI, NRRD/MetaImage, a multi-frame DICOM file or a folder of DICOM slices"
# Files users keep beside their images; listing them as problems would only be noise.
_IGNORED_SUFFIXES = (".txt", ".md", ".csv", ".json", ".xlsx", ".xls", ".pdf", ".yaml", ".yml")
_AXIS_LETTER = "xyz"
_BUSI_CLASSES = ("benign", "malignant", "normal")
_ISIC_IMAGE = re.compile(r"^(ISIC_\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d+)_segmentation\.png$", re.IGNORECASE)
_BUSI_MASK = re.compile(r"^(?P<base>.+)_mask(?:_(?P<k>\d+))?$")
_LGG_MASK = re.compile(r"^(?P<base>.+)_mask$")


@dataclass
class Item:
    """One training example: a 2D file or one slice of a volume (spatial_dims 2), or a whole volume (3)."""

    id: str
    subject: str
    image: Path
    mask: Path | None
    axis: int | None = None
    slice: int | None = None
    volume: str | None = None
    # BUSI stores some lesions as extra masks (`_mask_1.png`, ...); they are merged with `mask` by union.
    extra_masks: tuple[Path, ...] = ()
    # A split the layout itself fixes ("test" for img-anno's Test/ folder); None: drawn by subject
    split: str | None = None
    spatial_dims: int = 2  # 3: `image` (and `mask`) are whole volumes, read by ahm.data.volumes


@dataclass
class DatasetIndex:
    """What `open_dataset` found: the layout, the items, and what is known about the labels."""

    root: Path
    layout: str
    items: list[Item]
    has_labels: bool
    label_values: list[int] | None = None
    splits_file: dict | None = None
    problems: list[str] = field(default_factory=list)
    modality: str | None = None  # from dataset.json (msd) or implied by the layout; None = unknown
    class_names: dict[int, str] | None = None  # foreground class -> name (dataset.json, labels.json, the layout)

    def by_id(self) -> dict[str, Item]:
        return {item.id: item for item in self.items}


class _Problems:
    """Per-file problems: raised at once, or collected when the user asked to skip bad files."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if not self.skip_bad:
            raise AhmError(message)
        self.messages.append(message)


# ---------------------------------------------------------------- small helpers


def _visible(path: Path) -> bool:
    # macOS resource forks (`._x.nii.gz`, `__MACOSX/` in zips), .DS_Store, other hidden files: never data.
    return not path.name.startswith(".") and path.name not in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _visible(p))
    except OSError as exc:
        raise AhmError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc


def stem_of(path: Path) -> str:
    """File name without its image/volume suffix (`a.nii.gz` -> `a`)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES + HEADER_KIND_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def safe_id(text: str) -> str:
    """A filesystem-safe id: letters, digits, `.`, `_`, `-` (BUSI's `benign (12)` -> `benign_12`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return cleaned or "item"


def subject_of_stem(stem: str) -> str:
    """Folder layout: the subject is the part of the stem before the first `__` (or the whole stem)."""
    head = stem.split("__", 1)[0]
    return head or stem


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _file_kind(path: Path) -> str | None:
    """Whether `path` is read as a "volume" or an "image", or None when it is no file we read.

    DICOM and NRRD/MetaImage files are asked their header, so an unreadable one raises AhmError naming it.
    """
    from ahm.data.formats import is_volume_file

    if not path.is_file():
        return None
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(HEADER_KIND_SUFFIXES):
        return "volume" if is_volume_file(path) else "image"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else None


def _detached_data(entries: list[Path]) -> set[Path]:
    """Data files of `.nhdr`/`.mhd` headers among `entries`: part of their header's image, not items."""
    from ahm.data.formats import detached_data_files

    found: set[Path] = set()
    for entry in entries:
        if entry.is_file() and entry.suffix.lower() in (".nhdr", ".mhd"):
            try:
                found.update(detached_data_files(entry))
            except AhmError:
                continue  # reported when the header itself is listed
    return found


def _is_dicom_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    files = [p for p in _children(path) if p.is_file()]
    if not files:
        return False
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    # DICOM files often have no suffix; the preamble is followed by the magic word "DICM".
    try:
        with open(files[0], "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_ignorable(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in _IGNORED_SUFFIXES


def _slice_items(
    stem: str,
    subject: str,
    image: Path,
    mask: Path | None,
    axis: int,
    problems: _Problems,
    extra: tuple[Path, ...] = (),
) -> list[Item]:
    from ahm.data.formats import count_slices

    try:
        count = int(count_slices(image, axis))
    except AhmError as exc:
        problems.add(str(exc))
        return []
    if count < 1:
        problems.add(f"{image}: volume has no slices along axis {axis}")
        return []
    letter = _AXIS_LETTER[axis]
    base = safe_id(stem)
    return [
        Item(
            id=f"{base}__{letter}{k:03d}",
            subject=subject,
            image=image,
            mask=mask,
            axis=axis,
            slice=k,
            volume=base,
            extra_masks=extra,
        )
        for k in range(count)
    ]


def _volume_items(
    stem: str, subject: str, image: Path, mask: Path | None, cfg: DataConfig, problems: _Problems
) -> list[Item]:
    """A volume as one item (spatial_dims 3) or as its slices (2)."""
    if cfg.spatial_dims == 2:
        return _slice_items(stem, subject, image, mask, cfg.slice_axis, problems)
    from ahm.data.formats import volume_spacing_problem

    problem = volume_spacing_problem(image)
    if problem is not None:
        problems.add(problem)
        return []
    base = safe_id(stem)
    return [Item(id=base, subject=subject, image=image, mask=mask, volume=base, spatial_dims=3)]


def _check_unique(items: list[Item], problems: _Problems) -> list[Item]:
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


def _relative_inside(root: Path, entry: Any, source: Path, what: str) -> Path:
    """Resolve a path written in a dataset's json file; refuse absolute paths and ones leaving the root."""
    if not isinstance(entry, str) or not entry.strip():
        raise AhmError(f"{source}: {what} must be a relative path string, got {entry!r}")
    pure = PurePosixPath(entry.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", entry) or ".." in pure.parts:
        raise AhmError(
            f"{source}: {what} {entry!r} points outside the dataset folder "
            "(absolute paths and '..' are not allowed)"
        )
    resolved = (root / Path(*[p for p in pure.parts if p not in (".", "")])).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise AhmError(f"{source}: {what} {entry!r} points outside the dataset folder (through a link)")
    return root / Path(*[p for p in pure.parts if p not in (".", "")])


# ---------------------------------------------------------------- detection


def _looks_lgg(root: Path) -> bool:
    for sub in _children(root):
        if sub.is_dir() and any(p.name.lower().endswith("_mask.tif") for p in sub.iterdir()):
            return True
    return False


def _looks_busi(root: Path) -> bool:
    subs = {p.name.lower() for p in _children(root) if p.is_dir()}
    return bool(subs & set(_BUSI_CLASSES)) and subs <= set(_BUSI_CLASSES)


def _isic_files(root: Path) -> list[Path]:
    found = []
    for top in _children(root):
        if top.is_file():
            found.append(top)
        elif top.is_dir():
            found.extend(p for p in _children(top) if p.is_file())
    return [p for p in found if _ISIC_IMAGE.match(p.name) or _ISIC_MASK.match(p.name)]


def _looks_kvasir(root: Path) -> bool:
    masks = root / "masks"
    if not (root / "images").is_dir() or not masks.is_dir():
        return False
    mask_files = [p for p in _children(masks) if p.is_file() and not _is_ignorable(p)]
    # JPEG masks are what makes Kvasir different: they need thresholding, not exact label values.
    return bool(mask_files) and all(p.suffix.lower() in (".jpg", ".jpeg") for p in mask_files)


def _split_dirs(root: Path) -> dict[str, Path]:
    """img-anno: {"Train": path, "Test": path} of the split folders that hold an img/ folder (any letter case)."""
    found = {}
    for sub in _children(root):
        name = sub.name.lower()
        if sub.is_dir() and name in ("train", "test") and _child_dir(sub, "img") is not None:
            found[name.title()] = sub
    return found


def _child_dir(folder: Path, name: str) -> Path | None:
    for sub in _children(folder):
        if sub.is_dir() and sub.name.lower() == name:
            return sub
    return None


def detect_layout(root: Path) -> str:
    """Name of the layout of `root`, or AhmError saying what was expected."""
    if "Train" in _split_dirs(root):
        return "img-anno"
    if (root / "dataset.json").is_file():
        return "msd"
    if (root / "images").is_dir():
        return "kvasir" if _looks_kvasir(root) else "folder"
    if _looks_busi(root):
        return "busi"
    if _looks_lgg(root):
        return "lgg"
    if _isic_files(root):
        return "isic"
    raise AhmError(
        f"{root}: no known dataset layout found. Expected one of: images/ (+ optional masks/) [folder]; "
        "dataset.json with imagesTr/ labelsTr/ [msd]; patient folders with *_mask.tif [lgg]; "
        "benign/ malignant/ normal/ [busi]; ISIC_*.jpg + ISIC_*_segmentation.png [isic]; "
        "images/ + masks/ of .jpg [kvasir]; Train/img, Train/anno, Test/img, Test/anno [img-anno]"
    )


# ---------------------------------------------------------------- layouts


def _list_folder(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
    images_dir, masks_dir = root / "images", root / "masks"
    entries = _children(images_dir)
    mask_entries = _children(masks_dir) if masks_dir.is_dir() else []
    mask_entries = [m for m in mask_entries if not _is_ignorable(m)]
    labelled = bool(mask_entries)

    data_files = _detached_data(entries + mask_entries)
    masks_by_stem: dict[str, Path] = {}
    for mask_file in mask_entries:
        if mask_file in data_files:
            continue
        try:
            kind = _file_kind(mask_file)
        except AhmError as exc:
            problems.add(str(exc))
            continue
        if kind is None and not _is_dicom_dir(mask_file):
            problems.add(f"{mask_file}: unsupported mask file type (expected {_SUPPORTED})")
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
        if _is_ignorable(entry) or entry in data_files:
            continue
        try:
            kind = _file_kind(entry)
        except AhmError as exc:
            problems.add(str(exc))
            continue
        is_volume = kind == "volume" or _is_dicom_dir(entry)
        if not is_volume and kind != "image":
            problems.add(f"{entry}: unsupported file type (expected {_SUPPORTED} or a folder of DICOM files)")
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
            items.extend(_volume_items(stem, subject, entry, mask, cfg, problems))
        elif cfg.spatial_dims == 3:
            # A stack of 2D files has no slice spacing or orientation to resample by.
            problems.add(f"{entry}: a 2D image has no voxel spacing; data.spatial_dims 3 needs volumes "
                         f"({_VOLUME_KINDS})")
        else:
            items.append(Item(id=safe_id(stem), subject=subject, image=entry, mask=mask))
    for key, unused in masks_by_stem.items():
        if key not in used_masks:
            problems.add(f"{unused}: mask without an image in {images_dir}")
    if not saw_image and not problems.messages:
        raise AhmError(f"{images_dir}: no images found")
    return items, labelled


def _list_kvasir(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
    masks = {stem_of(p): p for p in _children(root / "masks") if p.is_file() and not _is_ignorable(p)}
    items, used = [], set()
    for image in _children(root / "images"):
        if _is_ignorable(image):
            continue
        if not _is_image_file(image):
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


def _list_lgg(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
    items = []
    for patient in _children(root):
        if not patient.is_dir():
            continue  # data.csv, README.md beside the patient folders
        files = [p for p in _children(patient) if p.is_file()]
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


def _list_busi(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
    items = []
    for class_dir in _children(root):
        if not class_dir.is_dir():
            continue
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for p in _children(class_dir):
            if not p.is_file() or _is_ignorable(p):
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
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


def _list_isic(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AhmError(f"{path}: not a UTF-8 text file") from exc
    except json.JSONDecodeError as exc:
        raise AhmError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except OSError as exc:
        raise AhmError(f"{path}: cannot read ({exc.strerror or exc})") from exc


# What the single-structure public layouts segment, by their datasets' own definitions.
_LAYOUT_CLASS = {"lgg": "FLAIR abnormality", "busi": "lesion", "isic": "lesion", "kvasir": "polyp"}


def read_class_names(source: Path, labels: Any) -> dict[int, str]:
    """Class names from a {"0": "background", "1": "tumour", ...} mapping (dataset.json's `labels`, or a
    labels.json beside a folder dataset); one line naming `source` if it is not such a mapping."""
    if not isinstance(labels, dict):
        raise AhmError(f'{source}: class names must be a mapping such as {{"0": "background", "1": "tumour"}}')
    names: dict[int, str] = {}
    for key, value in labels.items():
        try:
            value_int = int(key)
        except (TypeError, ValueError) as exc:
            raise AhmError(f'{source}: label keys must be integers such as "0", "1"; got {key!r}') from exc
        if not isinstance(value, str) or not value.strip():
            raise AhmError(f"{source}: the name of label {key} must be a non-empty string")
        names[value_int] = value.strip()
    return names


def _folder_class_names(root: Path) -> dict[int, str] | None:
    source = root / "labels.json"
    return read_class_names(source, _read_json(source)) if source.is_file() else None


def _msd_meta(root: Path) -> tuple[dict, list[int] | None, str | None]:
    source = root / "dataset.json"
    meta = _read_json(source)
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


def _list_msd(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
    source = root / "dataset.json"
    meta, _, _ = _msd_meta(root)
    items: list[Item] = []
    for n, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.add(f"{source}: training entry {n} must have 'image' and 'label'")
            continue
        try:
            image = _relative_inside(root, entry["image"], source, f"training[{n}].image")
            label = _relative_inside(root, entry["label"], source, f"training[{n}].label")
        except AhmError as exc:
            problems.add(str(exc))
            continue
        missing = [p for p in (image, label) if not p.exists()]
        if missing:
            for p in missing:
                problems.add(f"{p}: listed in {source} but missing")
            continue
        stem = stem_of(image)
        items.extend(_volume_items(stem, safe_id(stem), image, label, cfg, problems))
    # The test entries are unlabelled and unused, but a path escaping the folder is still refused.
    for n, entry in enumerate(meta.get("test") or []):
        try:
            _relative_inside(
                root, entry if isinstance(entry, str) else (entry or {}).get("image"), source, f"test[{n}]"
            )
        except AhmError as exc:
            problems.add(str(exc))
    return items, True


_TRAILING_NUMBER = re.compile(r"^(?P<subject>.+?)[ _-]+\d+$")


def subject_of_slice_name(stem: str) -> str:
    """img-anno: the subject of a slice file: the part before `__` if there is one (as in the folder layout),
    else the stem without its trailing slice number (`TCGA_CS_4941_19960909_12` -> `TCGA_CS_4941_19960909`, the
    Kaggle LGG patient scan; `la_003_45` -> `la_003`); a stem without a trailing number is its own subject."""
    if "__" in stem:
        return subject_of_stem(stem)
    match = _TRAILING_NUMBER.match(stem)
    return match["subject"] if match else stem


def _list_img_anno(root: Path, cfg: DataConfig, problems: _Problems) -> tuple[list[Item], bool]:
    """The layout of the AHM authors' loaders: Train/img + Train/anno (train and validation, drawn by subject)
    and Test/img + Test/anno (the test split). An annotation is paired with its image by name: the same stem, or
    the stem plus `_mask` (the Kaggle LGG naming), any image suffix."""
    splits = _split_dirs(root)
    if "Train" not in splits:
        raise AhmError(f"{root}: layout 'img-anno' needs Train/img in this folder")
    listed: list[tuple[str, Path, Path | None]] = []  # (split, image dir, anno dir)
    for name in ("Train", "Test"):
        if name in splits:
            img_dir = _child_dir(splits[name], "img")
            assert img_dir is not None
            listed.append((name, img_dir, _child_dir(splits[name], "anno")))
    labelled = any(anno is not None and any(not _is_ignorable(p) for p in _children(anno)) for _, _, anno in listed)
    items: list[Item] = []
    for name, img_dir, anno_dir in listed:
        annos: dict[str, Path] = {}
        for anno in _children(anno_dir) if anno_dir is not None else []:
            if _is_ignorable(anno):
                continue
            if not _is_image_file(anno):
                problems.add(f"{anno}: unsupported annotation file type (expected {', '.join(IMAGE_SUFFIXES)})")
                continue
            stem = stem_of(anno)
            if stem in annos:
                problems.add(f"{anno}: two annotations named {stem!r} (also {annos[stem]})")
                continue
            annos[stem] = anno
        used: set[str] = set()
        for image in _children(img_dir):
            if _is_ignorable(image):
                continue
            if not _is_image_file(image):
                problems.add(f"{image}: unsupported file type (expected {', '.join(IMAGE_SUFFIXES)})")
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


_LISTERS: dict[str, Callable[[Path, DataConfig, _Problems], tuple[list[Item], bool]]] = {
    "folder": _list_folder,
    "msd": _list_msd,
    "lgg": _list_lgg,
    "busi": _list_busi,
    "isic": _list_isic,
    "kvasir": _list_kvasir,
    "img-anno": _list_img_anno,
}


# ---------------------------------------------------------------- splits.json


def read_splits_file(path: Path, root: Path) -> dict[str, list[str]]:
    """Read a user's `splits.json`: {"train": [...], "val": [...], "test": [...]} of stems or ids.

    Entries may be written as relative paths (`images/a.png`); their stem is used. Absolute paths and
    `..` are refused.
    """
    data = _read_json(path)
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
                entry = stem_of(_relative_inside(root, entry, path, f"'{name}' entry"))
            names.append(entry)
        out[name] = names
    return out


# ---------------------------------------------------------------- entry point


def _find_root(path: Path) -> Path:
    if not path.exists():
        raise AhmError(f"{path}: dataset folder not found")
    if not path.is_dir():
        raise AhmError(f"{path}: not a folder; point at the folder that holds the dataset")
    # The Kaggle LGG download nests the patient folders one level down.
    nested = path / "kaggle_3m"
    if nested.is_dir() and not (path / "images").is_dir() and not (path / "dataset.json").is_file():
        return nested
    return path


def _open_dataset(path: str | Path, cfg: DataConfig, strict_splits: bool = True) -> DatasetIndex:
    root = _find_root(Path(path).expanduser())
    if not _children(root):
        raise AhmError(f"{root}: the dataset folder is empty")
    layout = cfg.layout.lower()
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise AhmError(
            f"data.layout: unknown layout {cfg.layout!r}; choose auto or one of {', '.join(LAYOUTS)}"
        )
    if cfg.spatial_dims == 3 and layout not in LAYOUTS_3D:
        raise AhmError(f"data.spatial_dims 3: layout {layout!r} ({root}) holds 2D images; volumes in 3D come from "
                       f"the layouts {', '.join(LAYOUTS_3D)}, or use data.spatial_dims 2")
    required = {"folder": "images", "kvasir": "images", "msd": "dataset.json"}.get(layout)
    if required and not (root / required).exists():
        raise AhmError(f"{root}: layout {layout!r} needs {required} in this folder")

    problems = _Problems(cfg.skip_bad)
    items, has_labels = _LISTERS[layout](root, cfg, problems)
    items = _check_unique(items, problems)
    if not items:
        detail = (
            f" ({len(problems.messages)} problem(s), first: {problems.messages[0]})"
            if problems.messages
            else ""
        )
        raise AhmError(f"{root}: no usable images found for layout {layout!r}{detail}")

    label_values: list[int] | None = None
    modality: str | None = None
    class_names: dict[int, str] | None = None
    if layout == "msd":
        meta, label_values, modality = _msd_meta(root)
        if meta.get("labels") is not None:
            class_names = read_class_names(root / "dataset.json", meta["labels"])
    elif layout in _LAYOUT_CLASS:
        label_values = [0, 1]  # binary lesion masks by the dataset's definition
        modality = "photo"  # 8-bit files, whatever the scanner
        class_names = {1: _LAYOUT_CLASS[layout]}
    elif layout == "folder":
        class_names = _folder_class_names(root)
    elif layout == "img-anno":
        modality = "photo"  # the authors' 8-bit PNG/TIFF slices, read as value / 255
        class_names = _folder_class_names(root)

    splits = None
    splits_path = root / "splits.json"
    if splits_path.is_file():
        try:
            splits = read_splits_file(splits_path, root)
        except AhmError as exc:
            if strict_splits:
                raise
            problems.messages.append(str(exc))
    return DatasetIndex(
        root=root,
        layout=layout,
        items=items,
        has_labels=has_labels,
        label_values=label_values,
        splits_file=splits,
        problems=problems.messages,
        modality=modality,
        class_names=class_names,
    )


def open_dataset(path: str | Path, cfg: DataConfig) -> DatasetIndex:
    """List the items of the dataset at `path` (layout auto-detected unless `cfg.layout` is set).

    Volumes become one item per slice along `cfg.slice_axis`, or one item each with `cfg.spatial_dims` 3 (the
    layouts `LAYOUTS_3D` only; a 2D file or a volume without voxel spacing is then a problem). Problems (unpaired files, unsupported files,
    paths leaving the folder) raise AhmError naming the file, or with `cfg.skip_bad` are collected in
    `index.problems` and those files left out.
    """
    return _open_dataset(path, cfg, strict_splits=True)
