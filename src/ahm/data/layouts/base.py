"""What a layout is: the `Layout` interface and its registry, and the records listing produces (`Item`,
`DatasetIndex`).

Each layout copies the way a public dataset is distributed, so a user can point `ahm` at the unpacked download.
A layout class owns everything about its layout: how it is recognised, how it lists items, what it says about
the labels, whether it holds volumes, how its masks are read. Code outside the layout's own file never branches
on its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ahm.config import DataConfig
from ahm.errors import AhmError


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
    # Channels stored one file each (nnU-Net's CASE_0001...): joined after `image`'s own channels, in this order.
    channel_files: tuple[Path, ...] = ()


@dataclass
class DatasetIndex:
    """What `open_dataset` found: the layout, the items, and what is known about the labels."""

    root: Path
    layout: str
    items: list[Item]
    has_labels: bool
    label_values: list[int] | None = None
    splits_file: dict | None = None
    splits_path: Path | None = None  # where `splits_file` was read; None: splits.json in the root
    problems: list[str] = field(default_factory=list)
    modality: str | None = None  # from dataset.json (msd) or implied by the layout; None = unknown
    class_names: dict[int, str] | None = None  # foreground class -> name (dataset.json, labels.json, the layout)
    # Masks of every file type binarised at this value (lossy JPEG masks); None: read as label maps.
    mask_threshold: float | None = None
    # What declared `label_values`, for messages; None: the layout itself.
    labels_declared_by: str | None = None

    def by_id(self) -> dict[str, Item]:
        return {item.id: item for item in self.items}


@dataclass
class LabelFacts:
    """What a layout knows about its labels beyond the masks themselves."""

    label_values: list[int] | None = None
    modality: str | None = None
    class_names: dict[int, str] | None = None


class Problems:
    """Per-file problems: raised at once, or collected when the user asked to skip bad files."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if not self.skip_bad:
            raise AhmError(message)
        self.messages.append(message)


class Layout:
    """One dataset layout. Subclasses set the class attributes and implement `detect` and `list_items`."""

    name: ClassVar[str] = ""
    # Where the layout stands in lists and messages (`LAYOUTS`).
    order: ClassVar[int] = 100
    # Detection tries layouts in rising precedence; a layout whose signs include another's must come first.
    precedence: ClassVar[int] = 100
    # How a user recognises the layout, for the message when none is found.
    signs: ClassVar[str] = ""
    # Whether it can hold volumes (data.spatial_dims 3).
    volumes: ClassVar[bool] = False
    # An entry of the dataset folder the layout cannot do without, checked when the layout is named explicitly.
    required: ClassVar[str | None] = None
    mask_threshold: ClassVar[float | None] = None
    labels_declared_by: ClassVar[str | None] = None

    @classmethod
    def nested_root(cls, path: Path) -> Path | None:
        """The folder inside `path` that holds the dataset when a download nests it one level down, else None."""
        return None

    @classmethod
    def detect(cls, root: Path) -> bool:
        """Whether `root` looks like this layout (auto-detection); cheap, names and headers only."""
        raise NotImplementedError

    def list_items(self, root: Path, cfg: DataConfig, problems: Problems) -> tuple[list[Item], bool]:
        """The items of the dataset at `root` and whether it is labelled; per-file problems go to `problems`."""
        raise NotImplementedError

    def label_facts(self, root: Path) -> LabelFacts:
        return LabelFacts()

    def own_splits(self, root: Path) -> tuple[Path, dict[str, list[str]]] | None:
        """A split the dataset's own format fixes (file, {"train": ids, "val": ids, "test": ids}), used when there
        is no splits.json; None: drawn by subject."""
        return None


class OneStructureLayout(Layout):
    """The public single-structure sets: binary masks of `structure` by the dataset's own definition, stored
    as 8-bit files whatever the scanner."""

    structure: ClassVar[str] = ""

    def label_facts(self, root: Path) -> LabelFacts:
        return LabelFacts(label_values=[0, 1], modality="photo", class_names={1: self.structure})


_LAYOUTS: dict[str, type[Layout]] = {}


def register(cls: type[Layout]) -> type[Layout]:
    """Class decorator: make the layout known by its `name`."""
    if not cls.name or cls.name in _LAYOUTS:
        raise ValueError(f"layout {cls.__name__}: needs a name of its own, got {cls.name!r}")
    _LAYOUTS[cls.name] = cls
    return cls


def layouts_in_order() -> list[type[Layout]]:
    return sorted(_LAYOUTS.values(), key=lambda cls: (cls.order, cls.name))


def layouts_by_precedence() -> list[type[Layout]]:
    return sorted(_LAYOUTS.values(), key=lambda cls: (cls.precedence, cls.name))


def get_layout(name: str) -> type[Layout] | None:
    return _LAYOUTS.get(name)
