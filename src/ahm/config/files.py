"""Configs from and to YAML: defaults <- YAML file <- command-line options, validated, refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ahm.config.base import _Strict, constraint_phrase
from ahm.config.masking import POLICY_CONFIGS
from ahm.errors import AhmError
from ahm.io import write_text


def _location(loc: tuple) -> list[str]:
    """The option's dotted path; the policy a masking section was validated as is no part of it."""
    parts = [str(p) for p in loc if p != "__root__"]
    return [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "masking" and p in POLICY_CONFIGS)]


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    parts = _location(err.get("loc", ()))
    phrase = constraint_phrase(err)
    if err.get("type") == "union_tag_invalid":
        parts.append("policy")
        msg = (f"unknown masking policy {(err.get('ctx') or {}).get('tag')!r}; choose one of "
               f"{', '.join(POLICY_CONFIGS)}")
    else:
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    loc = ".".join(parts)
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if phrase is not None:
        return f"{source}: {loc + ' ' if loc else ''}{phrase}{more}"
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def _deep_merge(base: dict[str, Any], override: dict[str, Any], keep_none: bool = False) -> dict[str, Any]:
    """Nested update. CLI overrides use None for "not given"; in a YAML file an explicit null is a value."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, keep_none)
        elif value is not None or keep_none:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AhmError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AhmError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise AhmError(f"{path}: a config file must hold a mapping of sections (data, model, ...)")
    return data


_SECTIONS = {"PretrainConfig": "pretrain", "FinetuneConfig": "finetune"}


def _section_for(kind: type[_Strict], loaded: dict[str, Any]) -> dict[str, Any]:
    """A preset file may hold both `pretrain:` and `finetune:` sections; the one for this kind."""
    section = _SECTIONS.get(kind.__name__)
    if section and (section in loaded or set(loaded) <= set(_SECTIONS.values())):
        return loaded.get(section) or {}
    return loaded


def file_section(kind: type[_Strict], path: str | Path) -> dict[str, Any]:
    """What a YAML file says for `kind`: its `pretrain:` or `finetune:` section when it has them, else all of it."""
    loaded = _section_for(kind, read_yaml(path))
    return loaded if isinstance(loaded, dict) else {}


def build_config(kind: type[_Strict], file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "options", nulls: bool = False, base: dict[str, Any] | None = None) -> Any:
    """Defaults <- base <- YAML file <- overrides (nested dict; None means "not given" unless `nulls`), validated.
    `base` holds defaults of this call's own (e.g. what a fine-tuning takes from its pretraining run); its None
    values are values (`spacing: null`), and the file and the overrides win over it. A 3D run (data.spatial_dims 3
    from any of them) starts from the 3D defaults (`presets/3d.yaml`) instead of the 2D ones."""
    loaded = _section_for(kind, read_yaml(file)) if file is not None else None
    merged = _merged(kind().model_dump(), base, loaded, overrides, nulls)
    dims = dimension_defaults(kind, merged)
    if dims:
        merged = _merged(_deep_merge(kind().model_dump(), dims, keep_none=True), base, loaded, overrides, nulls)
    if file is not None:
        source = str(file)
    try:
        return kind.model_validate(merged)
    except ValidationError as exc:
        if file is not None and _given(overrides, tuple(_location(exc.errors()[0].get("loc", ())))):
            source = "options"  # the bad value came from the command line, not from the file
        raise AhmError(_format_validation_error(exc, source)) from exc


def _merged(start: dict[str, Any], base: dict[str, Any] | None, loaded: dict[str, Any] | None,
            overrides: dict[str, Any] | None, nulls: bool) -> dict[str, Any]:
    merged = _deep_merge(start, base, keep_none=True) if base else start
    if loaded is not None:
        merged = _deep_merge(merged, loaded, keep_none=True)
    return _deep_merge(merged, overrides, keep_none=nulls) if overrides else merged


PRESETS = Path(__file__).resolve().parent.parent / "presets"


def dimension_defaults(kind: type[_Strict], merged: dict[str, Any]) -> dict[str, Any]:
    """The 3D defaults of `kind` when `merged` asks for 3D ({} otherwise, and for kinds without a 3D preset)."""
    data = merged.get("data")
    if kind.__name__ not in _SECTIONS or not isinstance(data, dict) or data.get("spatial_dims") != 3:
        return {}
    return file_section(kind, PRESETS / "3d.yaml")


def _given(overrides: dict[str, Any] | None, loc: tuple) -> bool:
    """Whether `overrides` sets the (non-None) value at the error location `loc`."""
    node: Any = overrides or {}
    for key in loc:
        if not isinstance(node, dict) or node.get(key) is None:
            return False
        node = node[key]
    return bool(loc)


def save_config(config: _Strict, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def load_config(kind: type[_Strict], path: str | Path) -> Any:
    """The config.yaml of an existing run, its run directory brought to the current format first (`read_from`: in
    place, or in a temporary mirror where it cannot be written; `path` is read either way, meaning what its format
    means where it is silent). A run's config away from its directory may be of any format: it means what the
    oldest means where it is silent."""
    from ahm.runformat import config_defaults, read_from, run_format

    path = Path(path)
    fmt = None
    if path.name == "config.yaml":
        read_from(path.parent)
        fmt = run_format(path.parent)
    return build_config(kind, file=path, base=config_defaults(fmt))
