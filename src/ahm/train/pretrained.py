"""What `--init RUN` brings to a fine-tuning: a pretraining run's encoder weights, their metadata and the
pretraining config, read and checked before any data is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ahm.config import FinetuneConfig, PretrainConfig, load_config
from ahm.config.runs import is_scratch_init
from ahm.errors import AhmError


@dataclass
class PretrainedEncoder:
    """What `--init RUN` brings: the encoder weights, their metadata and the pretraining config."""

    run_dir: Path
    path: Path
    weights: dict[str, torch.Tensor]
    metadata: dict[str, str]
    pretrain_cfg: PretrainConfig
    segmenter: str
    policy: str | None = None


RANDOM_INIT = "random"  # `init: random`: no pretrained weights, asked for as the frozen protocol's scratch arm


def check_freeze(cfg: FinetuneConfig) -> None:
    """The frozen-encoder protocol needs something to freeze: a pretraining run, or an explicit random encoder."""
    if cfg.freeze_encoder and is_scratch_init(cfg.init) and str(cfg.init).strip().lower() != RANDOM_INIT:
        raise AhmError("--freeze-encoder: nothing pretrained to freeze; give --init RUN (or --init random for the "
                       "frozen protocol's scratch arm: the same network with a random frozen encoder)")



def load_init(init: str | Path) -> PretrainedEncoder:
    """Read a pretraining run's encoder.safetensors and config; AhmError naming the file when anything is off."""
    from ahm.io import load_safetensors, safetensors_metadata
    from ahm.models import BACKBONES
    from ahm.runformat import read_from, run_file

    run = Path(init)
    if not run.is_dir():
        raise AhmError(f"--init {run}: not found; give a pretraining run directory (from `ahm pretrain`) or 'none'")
    read_from(run)  # its format checked, and the run upgraded (in place, or in a mirror when read-only)
    path = run / "encoder.safetensors"
    if not path.is_file():
        raise AhmError(f"--init {run}: {path.name} not found; the pretraining did not finish "
                       f"(resume it with `ahm pretrain ... --out {run} --resume`) or this is not a pretraining run")
    source = run_file(run, path.name)
    weights = load_safetensors(source)
    try:
        metadata = safetensors_metadata(source)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise AhmError(f"{path}: unreadable encoder metadata ({str(exc)[:120]})") from exc
    backbone = metadata.get("backbone")
    if backbone not in BACKBONES:
        raise AhmError(f"{path}: no backbone ({' or '.join(BACKBONES)}) in its metadata; not an ahm encoder file")
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise AhmError(f"--init {run}: config.yaml not found; it is needed to rebuild the pretrained network")
    pre_cfg = load_config(PretrainConfig, cfg_path)
    if pre_cfg.model.backbone != backbone:
        raise AhmError(f"{path}: encoder backbone {backbone!r} does not match {cfg_path} "
                       f"(model.backbone {pre_cfg.model.backbone!r})")
    return PretrainedEncoder(run, path, weights, metadata, pre_cfg, BACKBONES[backbone].segmenter,
                             metadata.get("policy"))


def apply_init(cfg: FinetuneConfig, enc: PretrainedEncoder) -> None:
    """The encoder decides the network: its backbone and sizes. Image size, channels and normalisation are
    checked against the data once it is read (`init_check`)."""
    from ahm.models import backbone_of_segmenter

    channels = enc.metadata.get("in_channels")
    if channels is not None:
        channels = int(channels)
        if cfg.data.channels is not None and cfg.data.channels != channels:
            raise AhmError(f"data.channels {cfg.data.channels} does not match the encoder in {enc.path} "
                           f"({channels} input channels)")
    cfg.model = backbone_of_segmenter(enc.segmenter).finetune_model_config(enc.pretrain_cfg.model, cfg.model)
    cfg.segmenter = enc.segmenter


