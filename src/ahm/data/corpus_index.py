"""`ahm data index`: what a pretraining corpus of several sources holds, from file headers only, written as a
manifest (`corpus.json`) that lists the sources; and reading such a manifest back (`resolve_sources`, what
`ahm pretrain` was given).

Each source is a dataset folder in any supported layout, labelled or not. Nothing but headers is read: image
sizes and channels from the 2D files' headers, shapes from the volumes' headers (NIfTI, DICOM, NRRD/MetaImage),
so an archive of thousands of scans is indexed in the time it takes to list it.

Samples are counted as the pretraining would draw them: 2D images and the slices of volumes (`spatial_dims` 2),
or whole volumes (3; a 2D file, or a volume without a slice spacing, is then a problem, as in `ahm pretrain`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ahm.config import DataConfig, SourceConfig
from ahm.errors import AhmError

MANIFEST_VERSION = 1
MANIFEST_NAMES = (".json",)
DESCRIPTIVE_KEYS = ("index",)


def _manifest_path(source: Path, manifest_dir: Path) -> str:
    """The source as the manifest should name it: relative to the manifest's folder when inside it."""
    resolved, base = source.resolve(), manifest_dir.resolve()
    if resolved.is_relative_to(base):
        rel = resolved.relative_to(base).as_posix()
        return rel or "."
    return str(resolved)


def index_source(path: str | Path, cfg: DataConfig) -> dict[str, Any]:
    """One source's counts and problems. AhmError only when there is no dataset at `path` at all."""
    from ahm.data.formats import read_image_info, read_volume_info
    from ahm.data.layouts import open_dataset
    from ahm.pipeline import for_dims

    lenient = cfg.model_copy(update={"skip_bad": True, "path": str(path)})
    index = open_dataset(path, lenient, strict_splits=False)
    problems = list(index.problems)
    sizes: Counter[str] = Counter()
    channels: Counter[int] = Counter()  # per 2D sample
    file_channels: Counter[int] = Counter()  # per file (an image, or a whole volume)
    volumes: dict[str, tuple[tuple[int, int, int], int] | None] = {}  # each volume's header (None: unreadable)
    images = slices = 0
    for item in index.items:
        pipeline = for_dims(item.spatial_dims)
        if not pipeline.from_volume(item):
            try:
                info = read_image_info(item.image, max_pixels=cfg.max_pixels)
            except AhmError as exc:
                problems.append(str(exc))
                continue
            images += 1
            sizes[f"{info.height}x{info.width}"] += 1
            channels[info.channels] += 1
            file_channels[info.channels] += 1
            continue
        key = str(item.image)
        if key not in volumes:
            try:
                volumes[key] = read_volume_info(item.image)
            except AhmError as exc:
                problems.append(str(exc))
                volumes[key] = None
            else:
                file_channels[volumes[key][1]] += 1  # type: ignore[index]
        found = volumes[key]
        if found is not None:  # a slice, or (3D) a whole volume, is one sample
            if item.slice is not None:
                slices += 1
            sizes["x".join(map(str, pipeline.sample_shape(item, found[0])))] += 1
            channels[found[1]] += 1
    if len(file_channels) > 1 and cfg.channels is None:
        problems.append(
            f"{index.root}: mixed channel counts "
            f"({', '.join(f'{n} file(s) with {c}' for c, n in sorted(file_channels.items()))}); "
            "set data.channels to unify them or index the sources apart"
        )
    good_volumes = sum(1 for v in volumes.values() if v is not None)
    samples = for_dims(cfg.spatial_dims).count_samples(images, slices, good_volumes)
    return {
        "layout": index.layout,
        "labelled": index.has_labels,
        "modality": index.modality,
        "files": images + good_volumes,
        "images": images,
        "volumes": good_volumes,
        "slices": slices,
        "samples": samples,
        "subjects": len({item.subject for item in index.items}),
        "sizes": dict(sizes.most_common()),  # "HxW" of each 2D sample (3D: "XxYxZ" of each volume) -> count
        "channels": {str(c): n for c, n in sorted(channels.items())},  # per sample
        "problems": problems,
    }


def index_corpus(
    sources: list[str | Path],
    cfg: DataConfig,
    manifest: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The manifest for `sources`: `{"version", "sources": [{"path", "modality", "index": {...}}], "totals"}`.

    Paths are written relative to the manifest's folder when they are inside it. Raises AhmError (one line)
    for a missing source, one given twice, or a corpus with nothing usable in it.
    """
    if not sources:
        raise AhmError("SRC: give at least one dataset folder")
    manifest_dir = Path(manifest).expanduser().absolute().parent
    seen: dict[Path, str] = {}
    entries = []
    for done, source in enumerate(sources, start=1):
        source = Path(source).expanduser()
        resolved = source.resolve()
        if resolved in seen:
            raise AhmError(f"{source}: given twice (also as {seen[resolved]})")
        seen[resolved] = str(source)
        stats = index_source(source, cfg)
        entries.append({"path": _manifest_path(source, manifest_dir), "modality": stats["modality"], "index": stats})
        if progress is not None:
            progress(done, len(sources))
    totals = {key: sum(e["index"][key] for e in entries) for key in ("files", "images", "volumes", "slices",
                                                                   "samples")}
    totals["sources"] = len(entries)
    totals["problems"] = sum(len(e["index"]["problems"]) for e in entries)
    modalities = Counter(e["modality"] or "unknown" for e in entries for _ in range(e["index"]["samples"]))
    totals["modalities"] = dict(modalities.most_common())
    if totals["samples"] == 0:
        first = next((p for e in entries for p in e["index"]["problems"]), None)
        from ahm.pipeline import for_dims

        what = for_dims(cfg.spatial_dims).samples_word()
        raise AhmError(f"{sources[0]}: the corpus holds no readable {what}" + (f" (first problem: {first})" if first else ""))
    # spatial_dims: what a sample is in these counts (2: a 2D image or a slice; 3: a whole volume)
    return {"version": MANIFEST_VERSION, "spatial_dims": cfg.spatial_dims, "sources": entries, "totals": totals}


def format_corpus(manifest: dict[str, Any], where: str | os.PathLike) -> str:
    """A few lines for the terminal: one per source, the totals, then every problem."""
    from ahm.pipeline import for_dims

    lines = []
    pipeline = for_dims(manifest.get("spatial_dims", 2))  # a manifest from before spatial_dims was recorded: 2D
    for entry in manifest["sources"]:
        s = entry["index"]
        lines.append(f"{entry['path']}: {s['layout']}, {'labelled' if s['labelled'] else 'unlabelled'}, "
                     f"{entry['modality'] or 'modality unknown'}; {pipeline.describe_source_counts(s)}; "
                     f"{len(s['problems'])} problem(s)")
    t = manifest["totals"]
    lines.append(f"corpus: {t['sources']} source(s), {t['files']} file(s), {pipeline.describe_corpus_counts(t)}; "
                 f"written to {where}")
    for entry in manifest["sources"]:
        lines.extend(f"  - {p}" for p in entry["index"]["problems"])
    return "\n".join(lines)


def read_manifest(path: Path) -> list[SourceConfig]:
    """Sources of a corpus.json: `{"sources": [{"path": ..., "modality": ..., "weight": ...}, ...]}` or the bare
    list. Relative paths resolve against the manifest's folder and may not leave it."""
    from pydantic import ValidationError

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AhmError(f"{path}: cannot read the corpus manifest ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise AhmError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    entries = doc.get("sources") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise AhmError(f'{path}: a corpus manifest lists its sources: {{"sources": [{{"path": "..."}}, ...]}}')
    root = path.parent.resolve()
    sources = []
    for n, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise AhmError(f"{path}: source {n} must be an object with a 'path'")
        # What `ahm data index` records about a source (its "index" counts) describes it; it is not a setting.
        entry = {k: v for k, v in entry.items() if k not in DESCRIPTIVE_KEYS}
        where = Path(entry["path"]).expanduser()
        if not where.is_absolute():
            where = (root / where).resolve()
            if where != root and root not in where.parents:
                raise AhmError(f"{path}: source {n} ({entry['path']}) leaves the manifest's folder {root}")
        try:
            sources.append(SourceConfig(**{**entry, "path": str(where)}))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err.get("loc", ())) or "entry"
            raise AhmError(f"{path}: source {n}: {field}: {err.get('msg')}") from exc
    return sources


def resolve_sources(paths: list[str | Path]) -> list[SourceConfig]:
    """What `ahm pretrain SRC [SRC ...]` was given: dataset folders and corpus manifests, in order."""
    sources: list[SourceConfig] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_file() and path.suffix.lower() in MANIFEST_NAMES:
            sources.extend(read_manifest(path))
        elif path.is_dir():
            sources.append(SourceConfig(path=str(path)))
        elif path.exists():
            raise AhmError(f"{path}: a pretraining source is a dataset folder or a corpus .json manifest")
        else:
            raise AhmError(f"{path}: dataset folder not found")
    return sources
