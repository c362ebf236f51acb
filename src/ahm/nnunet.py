"""nnU-Net v2 plans as ahm sees them: the network a plans file builds, the data settings it implies, and the
checkpoint `nnUNetv2_train ... -pretrained_weights FILE` loads.

Only `build_network` and `export_run` import nnunetv2 (the optional extra `ahm[nnunet]`); reading plans is plain
JSON, so configs validate without it.

Axes: nnU-Net's arrays of a NIfTI volume are (z, y, x) as stored, then permuted by the plans' `transpose_forward`;
ahm's volumes are (x, y, z) after reorientation to `data.orientation`. The 3D patch size and spacing are
rewritten in ahm's order, and the network is fed its input permuted back to nnU-Net's, so every kernel sees the
axis it sees in nnU-Net. (This assumes volumes stored near the orientation ahm reorients to, up to flips.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ahm.errors import AhmError

INSTALL_HINT = "pip install 'ahm[nnunet]'"
SEG_KEY = ".seg_layers."  # what nnU-Net's load_pretrained_weights leaves out: the layers that output classes


def import_nnunet():
    """The `nnunetv2` package, or one line saying how to install it."""
    try:
        import nnunetv2
        from nnunetv2.utilities.plans_handling import plans_handler  # noqa: F401
    except ImportError as exc:
        raise AhmError(f"the nnunet backbone needs nnU-Net v2 ({exc.name or exc}): {INSTALL_HINT}") from exc
    return nnunetv2


def read_plans(path: str | Path) -> dict[str, Any]:
    source = Path(path).expanduser()
    try:
        plans = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AhmError(f"{source}: nnU-Net plans file not found (model.plans, --plans)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AhmError(f"{source}: not a readable nnU-Net plans JSON ({str(exc).splitlines()[0]})") from exc
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise AhmError(f"{source}: not an nnU-Net plans file (no 'configurations')")
    return plans


def resolve_configuration(plans: dict[str, Any], name: str, source: str | Path = "plans") -> dict[str, Any]:
    """Configuration `name` with its `inherits_from` chain merged in, as nnU-Net's PlansManager does."""
    configs = plans["configurations"]
    if name not in configs:
        raise AhmError(f"{source}: no configuration {name!r} (model.configuration, --configuration); the plans "
                       f"have {', '.join(configs)}")
    seen: list[str] = []
    chain = name
    merged: dict[str, Any] = {}
    while chain is not None:
        if chain in seen or chain not in configs:
            raise AhmError(f"{source}: configuration {name!r} inherits from {chain!r}, which is "
                           f"{'circular' if chain in seen else 'missing'}")
        seen.append(chain)
        merged = {**configs[chain], **merged}
        chain = configs[chain].get("inherits_from")
    merged.pop("inherits_from", None)
    for key in ("patch_size", "spacing", "architecture"):
        if key not in merged:
            raise AhmError(f"{source}: configuration {name!r} has no {key!r}; not nnU-Net v2 plans")
    return merged


@dataclass(frozen=True)
class Geometry:
    """What a configuration fixes about the input, in ahm's axis order."""

    spatial_dims: int
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    # network axis i is ahm's axis `to_network[i]` (identity in 2D)
    to_network: tuple[int, ...]
    ct_window: tuple[float, float] | None  # the clipping window of nnU-Net's CT normalisation, channel 0

    def to_network_dims(self) -> tuple[int, ...]:
        """`Tensor.permute` dims taking a [B, C, *spatial] batch in ahm's axis order to the network's."""
        return (0, 1, *(2 + a for a in self.to_network))

    def from_network_dims(self) -> tuple[int, ...]:
        """`Tensor.permute` dims taking the network's output back to ahm's axis order."""
        back = [0] * len(self.to_network)
        for i, a in enumerate(self.to_network):
            back[a] = i
        return (0, 1, *(2 + a for a in back))

    @property
    def permutes(self) -> bool:
        return self.to_network != tuple(range(len(self.to_network)))


def geometry(plans: dict[str, Any], name: str, source: str | Path = "plans") -> Geometry:
    config = resolve_configuration(plans, name, source)
    patch = [int(v) for v in config["patch_size"]]
    spacing = [float(v) for v in config["spacing"]]
    dims = len(patch)
    if dims not in (2, 3):
        raise AhmError(f"{source}: configuration {name!r} has a {dims}D patch size; ahm handles 2D and 3D")
    window = None
    schemes = config.get("normalization_schemes") or []
    props = (plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
    if schemes[:1] == ["CTNormalization"] and isinstance(props, dict):
        window = (float(props["percentile_00_5"]), float(props["percentile_99_5"]))
    if dims == 2:
        return Geometry(2, tuple(patch), tuple(spacing), (0, 1), window)
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    # nnU-Net axis i is stored axis forward[i]; stored (z, y, x) is ahm's (x, y, z) reversed
    to_network = tuple(2 - a for a in forward)
    ours_patch = [0, 0, 0]
    ours_spacing = [0.0, 0.0, 0.0]
    for i, axis in enumerate(to_network):
        ours_patch[axis] = patch[i]
        ours_spacing[axis] = spacing[i]
    return Geometry(3, tuple(ours_patch), tuple(ours_spacing), to_network, window)


def data_update(plans_path: str | Path, name: str, data_cfg: Any) -> dict[str, Any]:
    """The data settings a configuration implies (only those the user left unset); ValueError on a conflict."""
    geo = geometry(read_plans(plans_path), name, plans_path)
    # configs are built over a dump of the defaults, so a value at its default counts as not given
    fields = type(data_cfg).model_fields
    given = {k for k in data_cfg.model_fields_set if _plain(getattr(data_cfg, k)) != _plain(fields[k].default)}
    want: dict[str, Any] = {"spatial_dims": geo.spatial_dims}
    # stays here: nnU-Net's own 2d/3d_fullres configurations, read below ahm.config and so below ahm.pipeline
    if geo.spatial_dims == 2:
        if len(set(geo.patch_size)) != 1:
            raise ValueError(f"{plans_path}: configuration {name!r} has patch size "
                             f"{'x'.join(map(str, geo.patch_size))}; ahm's 2D images are square, so the nnunet "
                             "backbone needs a square 2D patch size")
        want["image_size"] = geo.patch_size[0]
    else:
        want["crop_size"] = geo.patch_size
        want["spacing"] = geo.spacing
    if geo.ct_window is not None:
        want["ct_window"] = geo.ct_window
    update: dict[str, Any] = {}
    for key, value in want.items():
        have = getattr(data_cfg, key)
        if key in given and _plain(have) != _plain(value):
            if key == "ct_window":
                continue  # the user's own window wins: it only changes the clipping
            raise ValueError(f"data.{key} {_plain(have)} differs from {_plain(value)}, what {Path(plans_path).name} "
                             f"configuration {name!r} sets; leave data.{key} unset with the nnunet backbone")
        if key not in given:
            update[key] = value
    return update


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def configuration_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key where `a` and `b` first differ, None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return path
            found = first_difference(a[key], b[key], path)
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return prefix or "(top)"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{prefix}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "(top)")


def build_network(plans: dict[str, Any], name: str, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The network nnU-Net's own code builds for configuration `name`, deep supervision off."""
    import_nnunet()
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolve_configuration(plans, name)  # the one-line errors, before nnU-Net's own
    config = PlansManager(plans).get_configuration(name)
    return get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                  config.network_arch_init_kwargs_req_import, in_channels, out_channels,
                                  allow_init=True, deep_supervision=False)


def body_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor nnU-Net's loader requires: all but the segmentation layers."""
    return {k: v for k, v in state.items() if SEG_KEY not in k}
