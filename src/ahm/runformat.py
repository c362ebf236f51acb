"""The run-directory format: a number in run.json (`format`), and the one way up from older directories.

Format 1 is every directory written before the number existed; what such a directory may lack was filled in by
readers, each on its own. `migrate` brings a directory up to `FORMAT` in place, once, before anything reads it,
so readers see one format only. Each file it rewrites is replaced atomically, its original kept (hard-linked,
so no copy of the weights) under `format-<n>-originals/`; run.json takes the new number last (and is otherwise
unchanged), so a migration cut short is simply done again.
"""

from __future__ import annotations

import json
import os
import shutil
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

    A directory newer than this code reads is refused in one line. A file that cannot be read is left as it is
    (and the format unchanged), for its reader to refuse.
    """
    run_dir = Path(run_dir)
    info = _read_info(run_dir)
    if info is None:
        return None
    fmt = _format_of(info, run_dir)
    if fmt == FORMAT:
        return fmt
    if fmt > FORMAT:
        raise AhmError(f"{run_dir}: run directory of format {fmt}; this ahm reads format {FORMAT} and older "
                       f"(upgrade ahm)")
    try:
        while fmt < FORMAT:
            if not _UPGRADES[fmt](run_dir, originals_dir(run_dir, fmt)):
                return fmt
            fmt += 1
        _write_json(run_dir / RUN_INFO, {**info, "format": FORMAT})  # its original: the same, less `format`
    except OSError as exc:
        raise AhmError(f"{run_dir}: a run directory of format {_format_of(info, run_dir)} is upgraded in place "
                       f"before it is read, and it cannot be written ({exc.strerror or exc}); copy it somewhere "
                       f"writable") from exc
    return FORMAT


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


def _replace(path: Path, originals: Path, write: Callable[[Path], None]) -> None:
    """Keep `path` under `originals` (the first original wins: a migration done again must not overwrite it),
    then write the new `path` atomically."""
    kept = originals / path.relative_to(originals.parent)
    if not kept.exists():
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


def _to_format_2(run_dir: Path, originals: Path) -> bool:
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


def _upgrade_config(run_dir: Path, originals: Path) -> dict[str, Any] | None:
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


def _upgrade_encoder(run_dir: Path, originals: Path, cfg: dict[str, Any]) -> bool:
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


def _save(path: Path, originals: Path, ckpt: dict[str, Any]) -> None:
    from ahm.io import save_torch

    _replace(path, originals, lambda p: save_torch(p, ckpt))


def _upgrade_last(run_dir: Path, originals: Path, cfg: dict[str, Any]) -> bool:
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


def _upgrade_best(run_dir: Path, originals: Path, cfg: dict[str, Any]) -> bool:
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


_UPGRADES: dict[int, Callable[[Path, Path], bool]] = {1: _to_format_2}
