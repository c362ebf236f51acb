"""The run-directory format: a number in run.json (`format`), and the one way up from older directories.

Format 1 is every directory written before the number existed; what such a directory may lack was filled in by
readers, each on its own. `migrate` brings a directory up to `FORMAT` in place, once, before anything reads it,
so readers see one format only. Each file it rewrites is replaced atomically, its original kept (hard-linked,
so no copy of the weights) under `format-<n>-originals/`; run.json takes the new number last (and is otherwise
unchanged), so a migration cut short is simply done again.

Readers that only read (evaluate, predict, `--init`, `ahm.load_encoder`) open a run through `read_from`: a directory
that cannot be written (a read-only mount, another user's run) is upgraded in a temporary mirror instead, and left
as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ahm.errors import AhmError

FORMAT = 2
RUN_INFO = "run.json"


def originals_dir(run_dir: Path, fmt: int) -> Path:
    return run_dir / f"format-{fmt}-originals"


def run_format(run_dir: str | Path) -> int | None:
    """The format of the run directory `run_dir`; None when it has no readable run.json (not a run directory:
    its readers refuse it in their own words)."""
    info = _read_info(Path(run_dir))
    return None if info is None else _format_of(info, Path(run_dir))


def migrate(run_dir: str | Path) -> int | None:
    """Bring the run directory `run_dir` up to `FORMAT` in place; returns its format (None: not a run directory).

    A directory newer than this code reads is refused in one line, and so is one that needs upgrading but cannot
    be written. A file that cannot be read is left as it is (and the format unchanged), for its reader to refuse.
    """
    run_dir = Path(run_dir)
    info, fmt = _info(run_dir)
    if fmt is None or fmt == FORMAT:
        return fmt
    try:
        return _upgrade(run_dir, info, fmt, keep_originals=True)
    except OSError as exc:
        raise AhmError(f"{run_dir}: a run directory of format {fmt} is upgraded in place before it is written to, "
                       f"and it cannot be written ({exc.strerror or exc}); copy it somewhere writable") from exc


def read_from(run_dir: str | Path) -> Path:
    """The directory to read the run `run_dir` from, at `FORMAT` where it can be brought there: `run_dir` itself,
    upgraded in place (`migrate`) when it can be written; else a temporary mirror of it (links to its files, upgraded
    copies of those the upgrade rewrites; removed at exit, reused while `run_dir` is unchanged). Files keep their
    relative paths, so readers open them here and name them by `run_dir`. A directory the upgrade cannot finish (an
    unreadable file), or not a run directory, is returned as it is; a newer format is refused as by `migrate`."""
    run_dir = Path(run_dir)
    info, fmt = _info(run_dir)
    if fmt is None or fmt == FORMAT:
        return run_dir
    if _writable(run_dir):
        try:
            _upgrade(run_dir, info, fmt, keep_originals=True)
            return run_dir
        except OSError:
            pass  # a part of it cannot be written
    return _mirror(run_dir)


def run_file(run_dir: str | Path, name: str) -> Path:
    """The file `name` (a path relative to the run directory `run_dir`) as its readers open it: from `read_from`'s
    directory, or from `run_dir` where that lacks it (a missing file is then named by its own path)."""
    found = read_from(run_dir) / name
    return found if found.exists() else Path(run_dir) / name


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)  # False on a read-only mount, even for root


def _info(run_dir: Path) -> tuple[dict[str, Any], int | None]:
    """run.json and the format it gives ({} and None: not a run directory); a newer format is refused."""
    info = _read_info(run_dir)
    if info is None:
        return {}, None
    fmt = _format_of(info, run_dir)
    if fmt > FORMAT:
        raise AhmError(f"{run_dir}: run directory of format {fmt}; this ahm reads format {FORMAT} and older "
                       f"(upgrade ahm)")
    return info, fmt


def _upgrade(run_dir: Path, info: dict[str, Any], fmt: int, keep_originals: bool) -> int:
    """Upgrade `run_dir` from format `fmt`, keeping the originals of the files rewritten (`keep_originals`); returns
    the format reached (less than FORMAT when a file cannot be read). OSError when it cannot be written."""
    try:
        while fmt < FORMAT:
            if not _UPGRADES[fmt](run_dir, originals_dir(run_dir, fmt) if keep_originals else None):
                return fmt
            fmt += 1
        _write_json(run_dir / RUN_INFO, {**info, "format": FORMAT})  # its original: the same, less `format`
    except AhmError as exc:
        # ahm.io's atomic writes report an OSError as AhmError; the upgrades' reads return False instead of raising
        if isinstance(exc.__cause__, OSError):
            raise exc.__cause__ from None
        raise
    return FORMAT


# run directory (resolved) -> (what it held when mirrored, its upgraded mirror)
_MIRRORS: dict[Path, tuple[list[tuple[str, int, int, int]], Path]] = {}


def _listing(root: Path) -> list[tuple[str, int, int, int]]:
    """(path, inode, size, mtime) of every file under `root`, linked folders followed (each folder once): what a
    mirror of it is made from. The originals an earlier upgrade kept are left out."""
    found = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not (d.startswith("format-") and d.endswith("-originals"))]
        for name in files:
            path = Path(folder, name)
            with contextlib.suppress(OSError):  # a dangling link: nothing to read
                st = path.stat()
                found.append((str(path.relative_to(root)), st.st_ino, st.st_size, st.st_mtime_ns))
    return sorted(found)


def _mirror(run_dir: Path) -> Path:
    """A temporary directory of folders and symbolic links to the files of `run_dir`, upgraded to FORMAT there (each
    rewrite replaces a link by a new file, leaving its target alone); `run_dir` itself where the upgrade cannot
    finish."""
    root = run_dir.resolve()
    listing = _listing(root)
    held = _MIRRORS.get(root)
    if held is not None and held[0] == listing and held[1].is_dir():
        return held[1]
    mirror = None
    try:
        mirror = Path(tempfile.mkdtemp(prefix="ahm-run-"))
        atexit.register(shutil.rmtree, mirror, True)
        for name, *_ in listing:
            (mirror / name).parent.mkdir(parents=True, exist_ok=True)
            (mirror / name).symlink_to(root / name)
        info = _read_info(mirror)
        done = info is not None and _upgrade(mirror, info, _format_of(info, mirror), keep_originals=False) == FORMAT
    except OSError as exc:
        if mirror is not None:
            shutil.rmtree(mirror, ignore_errors=True)
        raise AhmError(f"{run_dir}: a run directory of format {run_format(root)} cannot be written, and upgrading it "
                       f"in {tempfile.gettempdir()} failed ({exc.strerror or exc}); copy it somewhere writable") from exc
    if not done:
        shutil.rmtree(mirror, ignore_errors=True)
        return run_dir
    if held is not None:
        shutil.rmtree(held[1], ignore_errors=True)
    _MIRRORS[root] = (listing, mirror)
    return mirror


def _read_info(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return info if isinstance(info, dict) else None


def _format_of(info: dict[str, Any], run_dir: Path) -> int:
    fmt = info.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise AhmError(f"{run_dir / RUN_INFO}: format {fmt!r} is not a run-directory format (1 to {FORMAT})")
    return fmt


def _write_json(path: Path, obj: Any) -> None:
    from ahm.io import write_json

    write_json(path, obj)


def _replace(path: Path, originals: Path | None, write: Callable[[Path], None]) -> None:
    """Keep `path` under `originals` (the first original wins: a migration done again must not overwrite it; None:
    not kept), then write the new `path` atomically."""
    kept = None if originals is None else originals / path.relative_to(originals.parent)
    if kept is not None and not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, kept)  # the atomic replacement makes a new file; this name keeps the old one
        except OSError:
            shutil.copy2(path, kept)
    write(path)


# ---------------------------------------------------------------------------------------------- format 1 -> 2
# What readers of format-1 directories used to assume when a key was missing, written into the files:
# - config.yaml: no model.norm: instance norm (the only one before the option existed).
# - encoder.safetensors: no spatial_dims: 2D (before 3D existed); a unet encoder without norm / unet_network:
#   instance norm, MONAI UNet; no policy: the config's masking.policy.
# - checkpoints/last.ckpt, pretraining: no skipped_batches: none skipped; no policy_extra: nothing extra.
# - checkpoints/last.ckpt, fine-tuning: no meta.select_by: its best was kept by the old per-case figure, which the
#   current one cannot be compared with, so the best is set afresh at the next validation.
# - checkpoints/best.ckpt: no meta.slice_axis: the config's data.slice_axis.


def _to_format_2(run_dir: Path, originals: Path | None) -> bool:
    cfg = _upgrade_config(run_dir, originals)
    if cfg is None:
        return False
    steps = (_upgrade_encoder, _upgrade_last, _upgrade_best)
    return all([step(run_dir, originals, cfg) for step in steps])


# What a format-1 config.yaml means by the settings it lacks (where today's defaults differ).
FORMAT_1_CONFIG = {"model": {"norm": "instance"}}


def config_defaults(fmt: int | None) -> dict[str, Any]:
    """The settings a config of format `fmt` (None: not known, so possibly the oldest) means where it is silent,
    as sections of options; {} for the current format."""
    return FORMAT_1_CONFIG if fmt is None or fmt < 2 else {}


def _upgrade_config(run_dir: Path, originals: Path | None) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    filled = dict(cfg)
    for name, values in FORMAT_1_CONFIG.items():
        section = filled.get(name)
        if isinstance(section, dict):
            filled[name] = {**values, **section}
    if filled != cfg:
        text = yaml.safe_dump(filled, sort_keys=False)
        _replace(path, originals, lambda p: _write_text(p, text))
    return filled


def _write_text(path: Path, text: str) -> None:
    from ahm.io import write_text

    write_text(path, text)


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def _upgrade_encoder(run_dir: Path, originals: Path | None, cfg: dict[str, Any]) -> bool:
    path = run_dir / "encoder.safetensors"
    if not path.is_file():
        return True
    from ahm.io import load_safetensors, safetensors_metadata, save_safetensors

    try:
        meta = safetensors_metadata(path)
    except Exception:  # safetensors raises its own error types for damaged headers; the reader refuses them
        return False
    added = {"spatial_dims": "2", "policy": str(_section(cfg, "masking").get("policy", "random"))}
    if meta.get("backbone") == "unet":
        added.update({"norm": "instance", "unet_network": "unet"})
    added = {k: v for k, v in added.items() if k not in meta}
    if added:
        try:
            weights = load_safetensors(path)
        except AhmError:
            return False
        _replace(path, originals, lambda p: save_safetensors(p, weights, metadata={**meta, **added}))
    return True


def _load(path: Path) -> dict[str, Any] | None:
    from ahm.io import load_torch

    try:
        ckpt = load_torch(path)
    except AhmError:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def _save(path: Path, originals: Path | None, ckpt: dict[str, Any]) -> None:
    from ahm.io import save_torch

    _replace(path, originals, lambda p: save_torch(p, ckpt))


def _upgrade_last(run_dir: Path, originals: Path | None, cfg: dict[str, Any]) -> bool:
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return True
    ckpt = _load(path)
    if ckpt is None:
        return False
    changed = False
    if ckpt.get("kind") == "pretrain":
        for key, value in (("skipped_batches", 0), ("policy_extra", {})):
            if key not in ckpt:
                ckpt[key], changed = value, True
    meta, state = ckpt.get("meta"), ckpt.get("state")
    if ckpt.get("kind") == "finetune" and isinstance(meta, dict) and "select_by" not in meta:
        meta["select_by"] = cfg.get("select_by", "dataset_dice")
        if isinstance(state, dict):
            state.update({"best_val_dice": -1.0, "best_epoch": 0})
        changed = True
    if changed:
        _save(path, originals, ckpt)
    return True


def _upgrade_best(run_dir: Path, originals: Path | None, cfg: dict[str, Any]) -> bool:
    path = run_dir / "checkpoints" / "best.ckpt"
    if not path.is_file():
        return True
    ckpt = _load(path)
    if ckpt is None:
        return False
    meta = ckpt.get("meta")
    if isinstance(meta, dict) and "slice_axis" not in meta:
        meta["slice_axis"] = int(_section(cfg, "data").get("slice_axis", 2))
        _save(path, originals, ckpt)
    return True


_UPGRADES: dict[int, Callable[[Path, Path | None], bool]] = {1: _to_format_2}
