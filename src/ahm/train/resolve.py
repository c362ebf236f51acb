"""The configs `ahm pretrain` and `ahm finetune` run, resolved from command-line options, a YAML file and the
defaults (the 3D ones for a 3D run); a fine-tuning also takes what its pretraining run used, so that the encoder sees
images as it was pretrained on them. The commands and the Python API (`ahm.pretrain`, `ahm.finetune`) call these,
so both do the same."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ahm.config import FinetuneConfig, PretrainConfig
from ahm.config.runs import is_scratch_init
from ahm.errors import AhmError
from ahm.train.pretrained import load_init

# What a fine-tuning takes from its pretraining run unless told otherwise (an option, or the file): the model grid
# in 2D; in 3D the dimension, the voxel spacing, the orientation and the crop (the network's input) as well.
INHERITED_2D = ("image_size",)
INHERITED_3D = ("image_size", "spatial_dims", "spacing", "orientation", "crop_size")


def pretrain_data_defaults(init: str | Path) -> dict[str, Any]:
    """The pretraining run's data settings listed above ({} if its config is unreadable); explicit nulls kept."""
    from ahm.config import read_yaml

    try:
        data = read_yaml(Path(init) / "config.yaml").get("data", {})
    except AhmError:
        return {}
    if not isinstance(data, dict):
        return {}
    keys = INHERITED_3D if data.get("spatial_dims") == 3 else INHERITED_2D
    return {k: data[k] for k in keys if k in data}


def resolve_finetune_config(options: Mapping[str, Any] | None = None, init: str | Path | None = None, *,
                            file: str | Path | None = None, resume: bool = False,
                            segmenter_option: str = "--segmenter") -> FinetuneConfig:
    """The config of a fine-tuning from pretraining run `init`, as `ahm finetune` resolves it.

    Defaults <- the pretraining run's data settings (`INHERITED_2D`, `INHERITED_3D`) <- the YAML `file` <-
    `options` (nested, as `build_config` takes them; None means not given). The run is `init`, else
    `options["init"]`, else the file's; 'none' trains from scratch. Without one, AhmError, unless `resume`: a
    resumed run keeps its own. `train.steps` in `options` makes the run count steps; a resume given neither
    `train.epochs` nor `train.steps` keeps the run's own length. `segmenter_option` names the segmenter in
    messages (the option the user typed).
    """
    from ahm.config import build_config

    options = dict(options or {})
    chosen = _chosen_init(options, init, file, resume)
    inherited: dict[str, Any] = {}
    if chosen is not None and not is_scratch_init(chosen) and not resume:
        enc = load_init(chosen)
        segmenter = options.get("segmenter")
        if segmenter is not None and segmenter != enc.segmenter:
            from ahm.models.backbones import segmenter_of_backbone

            pairs = ", ".join(f"{b} -> {s}" for b, s in segmenter_of_backbone().items())
            raise AhmError(f"{segmenter_option} {segmenter} does not match {enc.path}: a {enc.metadata.get('backbone')} "
                           f"encoder is fine-tuned as {enc.segmenter} ({pairs})")
        inherited = pretrain_data_defaults(chosen)
    # the pretraining run's settings are defaults: the file and the options win over them
    cfg = build_config(FinetuneConfig, file=file, overrides={**options, "init": chosen}, base={"data": inherited})
    train = options.get("train") or {}
    if train.get("steps") is not None:
        cfg.train.epochs = None  # the run counts steps
    if resume and train.get("epochs") is None and train.get("steps") is None:
        cfg.train.epochs = None  # keep the run's own length, not the default's (only train.epochs changes it)
    return cfg


def _chosen_init(options: Mapping[str, Any], init: str | Path | None, file: str | Path | None,
                 resume: bool) -> str | None:
    chosen = init if init is not None else options.get("init")
    if chosen is None and not resume:
        from ahm.config import file_section

        chosen = file_section(FinetuneConfig, file).get("init") if file is not None else None
        if chosen is None:
            raise AhmError("--init: give a pretraining run directory (from `ahm pretrain`), or 'none' to "
                           "train from scratch")
    return None if chosen is None else str(chosen)


def resolve_pretrain_config(options: Mapping[str, Any] | None = None, *, file: str | Path | None = None,
                            resume: bool = False) -> PretrainConfig:
    """The config of a pretraining, as `ahm pretrain` resolves it: defaults (3D ones for a 3D run) <- the YAML
    `file` <- `options` (nested; None means not given). `train.epochs` without `train.steps` makes the run count
    epochs; a resume given no `train.steps` keeps the run's own length."""
    from ahm.config import build_config

    options = dict(options or {})
    cfg = build_config(PretrainConfig, file=file, overrides=options)
    train = options.get("train") or {}
    if train.get("epochs") is not None and train.get("steps") is None:
        cfg.train.steps = None
    if resume and train.get("steps") is None:
        cfg.train.steps = None  # keep the run's own length, not the default's (only train.steps changes it)
    return cfg
