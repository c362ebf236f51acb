"""Finding files in a dataset folder, shared by the layouts: names, ids and subjects, what kind of file an entry
is, items for a volume, and paths written in a dataset's json files. Listing reads only names and headers;
nothing is ever written into the dataset folder."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from ahm.config import DataConfig
from ahm.data.formats import HEADER_KIND_SUFFIXES
from ahm.data.layouts.base import Item, Problems
from ahm.errors import AhmError

# The 2D files layouts list (GIF and WebP are readable but belong to no dataset we list).
LISTED_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii.gz", ".nii")
# DICOM files and NRRD/MetaImage: a 2D image or a volume, as their header says (frames, slices).
SUPPORTED = ", ".join(LISTED_IMAGE_SUFFIXES + VOLUME_SUFFIXES + HEADER_KIND_SUFFIXES)
VOLUME_KINDS = "NIfTI, NRRD/MetaImage, a multi-frame DICOM file or a folder of DICOM slices"
# Files users keep beside their images; listing them as problems would only be noise.
_IGNORED_SUFFIXES = (".txt", ".md", ".csv", ".json", ".xlsx", ".xls", ".pdf", ".yaml", ".yml")
_AXIS_LETTER = "xyz"


def _visible(path: Path) -> bool:
    # macOS resource forks (`._x.nii.gz`, `__MACOSX/` in zips), .DS_Store, other hidden files: never data.
    return not path.name.startswith(".") and path.name not in ("Thumbs.db", "desktop.ini", "__MACOSX")


def children(folder: Path) -> list[Path]:
    """The visible entries of `folder`, sorted."""
    try:
        return sorted(p for p in folder.iterdir() if _visible(p))
    except OSError as exc:
        raise AhmError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc


def child_dir(folder: Path, name: str) -> Path | None:
    """The sub-folder of `folder` called `name` in any letter case."""
    for sub in children(folder):
        if sub.is_dir() and sub.name.lower() == name:
            return sub
    return None


def stem_of(path: Path) -> str:
    """File name without its image/volume suffix (`a.nii.gz` -> `a`)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES + LISTED_IMAGE_SUFFIXES + HEADER_KIND_SUFFIXES:
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


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in LISTED_IMAGE_SUFFIXES


def is_ignorable(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in _IGNORED_SUFFIXES


def file_kind(path: Path) -> str | None:
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
    return "image" if path.suffix.lower() in LISTED_IMAGE_SUFFIXES else None


def detached_data(entries: list[Path]) -> set[Path]:
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


def is_dicom_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    files = [p for p in children(path) if p.is_file()]
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


def _slice_items(
    stem: str,
    subject: str,
    image: Path,
    mask: Path | None,
    axis: int,
    problems: Problems,
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


def volume_items(
    stem: str, subject: str, image: Path, mask: Path | None, cfg: DataConfig, problems: Problems
) -> list[Item]:
    """A volume as one item (spatial_dims 3) or as its slices (2)."""
    # stays here: what a volume file is listed as is the layouts' fact (they sit below ahm.pipeline)
    if cfg.spatial_dims == 2:
        return _slice_items(stem, subject, image, mask, cfg.slice_axis, problems)
    from ahm.data.formats import volume_spacing_problem

    problem = volume_spacing_problem(image)
    if problem is not None:
        problems.add(problem)
        return []
    base = safe_id(stem)
    return [Item(id=base, subject=subject, image=image, mask=mask, volume=base, spatial_dims=3)]


def relative_inside(root: Path, entry: Any, source: Path, what: str) -> Path:
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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AhmError(f"{path}: not a UTF-8 text file") from exc
    except json.JSONDecodeError as exc:
        raise AhmError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except OSError as exc:
        raise AhmError(f"{path}: cannot read ({exc.strerror or exc})") from exc


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


def labels_json_names(root: Path) -> dict[int, str] | None:
    """Class names from a labels.json in the dataset folder, None without one."""
    source = root / "labels.json"
    return read_class_names(source, read_json(source)) if source.is_file() else None
