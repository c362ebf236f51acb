"""`ahm data check`: read every file of a dataset and report what is there and everything that is wrong.

Unlike training, the check never stops at the first bad file: it lists all of them, each with its path, so a
user can fix a download in one pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ahm.config import DataConfig
from ahm.data.dataset import VolumeCache
from ahm.data.layouts import open_dataset
from ahm.errors import AhmError


@dataclass
class CheckReport:
    """What `check_dataset` found."""

    root: str
    layout: str
    items: int = 0
    readable: int = 0
    subjects: int = 0
    volumes: int = 0
    has_labels: bool = False
    sizes: dict[str, int] = field(default_factory=dict)  # "HxW" -> count, before resizing
    channels: dict[str, int] = field(default_factory=dict)  # "1"/"3" -> count
    label_values: list[int] = field(default_factory=list)  # found in the masks
    declared_labels: list[int] | None = None
    class_balance: dict[str, float] = field(default_factory=dict)  # label -> share of mask pixels
    splits: dict[str, int] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self)


def check_dataset(path: str | Path, cfg: DataConfig, progress=None) -> CheckReport:
    """Read every image and mask of the dataset at `path`; collect per-file problems instead of raising.

    Raises AhmError only when there is no dataset to check (missing or empty folder, unknown layout).
    """
    from ahm.data.splits import make_splits
    from ahm.pipeline import for_dims

    lenient = cfg.model_copy(update={"skip_bad": True})
    index = open_dataset(path, lenient, strict_splits=False)
    report = CheckReport(
        root=str(index.root),
        layout=index.layout,
        items=len(index.items),
        has_labels=index.has_labels,
        declared_labels=index.label_values,
        problems=list(index.problems),
    )
    report.subjects = len({item.subject for item in index.items})
    report.volumes = len({item.volume for item in index.items if item.volume is not None})

    sizes: Counter[str] = Counter()
    channels: Counter[str] = Counter()
    pixels: Counter[int] = Counter()
    bad_volumes: set[str] = set()
    cache = VolumeCache()
    items = sorted(index.items, key=lambda it: (str(it.image), it.slice or 0))
    for done, item in enumerate(items, start=1):
        if item.volume is not None and str(item.image) in bad_volumes:
            continue  # one message per broken volume, not one per slice
        try:
            image, mask = for_dims(item.spatial_dims).read_item(item, index, cfg, index.has_labels, cache)
        except AhmError as exc:
            report.problems.append(str(exc))
            if item.volume is not None:
                bad_volumes.add(str(item.image))
            continue
        finally:
            if progress is not None:
                progress(done, len(items))
        report.readable += 1
        sizes["x".join(str(n) for n in image.shape[1:])] += 1
        channels[str(image.shape[0])] += 1
        if mask is not None:
            values, counts = np.unique(mask, return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist()):
                pixels[int(value)] += int(count)

    report.sizes = dict(sizes.most_common())
    report.channels = dict(sorted(channels.items()))
    report.label_values = sorted(pixels)
    total = sum(pixels.values())
    report.class_balance = {str(v): pixels[v] / total for v in sorted(pixels)} if total else {}
    if len(channels) > 1 and cfg.channels is None:
        report.problems.append(
            f"{index.root}: images have different channel counts "
            f"({', '.join(f'{n} with {c}' for c, n in report.channels.items())}); "
            "set data.channels to unify them"
        )
    try:
        report.splits = {name: len(ids) for name, ids in make_splits(index, cfg).items()}
    except AhmError as exc:
        report.problems.append(str(exc))
    return report


def _human_counts(counter: dict[str, int], limit: int = 6) -> str:
    shown = [f"{key} ({n})" for key, n in list(counter.items())[:limit]]
    more = len(counter) - limit
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "") if shown else "-"


def format_report(report: CheckReport) -> str:
    """The report as plain text lines for the terminal."""
    lines = [
        f"dataset   {report.root}",
        f"layout    {report.layout}",
        f"images    {report.items} ({report.readable} readable), {report.subjects} subject(s)"
        + (f", {report.volumes} volume(s)" if report.volumes else ""),
        f"sizes     {_human_counts(report.sizes)}",
        f"channels  {_human_counts(report.channels)}",
    ]
    if report.has_labels:
        declared = f" (declared: {report.declared_labels})" if report.declared_labels is not None else ""
        lines.append(f"labels    {report.label_values}{declared}")
        balance = ", ".join(f"{k}: {v:.1%}" for k, v in report.class_balance.items())
        lines.append(f"balance   {balance or '-'}")
    else:
        lines.append("labels    none (no masks: usable for pretraining only)")
    if report.splits is not None:
        lines.append("splits    " + ", ".join(f"{k} {v}" for k, v in report.splits.items()))
    if report.problems:
        lines.append(f"problems  {len(report.problems)}")
        lines.extend(f"  - {p}" for p in report.problems)
    else:
        lines.append("problems  none")
    return "\n".join(lines)
