"""Does a pretraining run fit this fine-tuning? Pretraining on corpus A and fine-tuning on dataset B is the
normal case; the weights only transfer when B's images reach the network as A's did."""

from __future__ import annotations

from ahm.config import FinetuneConfig
from ahm.errors import AhmError
from ahm.pipeline import pipeline_for
from ahm.train.pretrained import PretrainedEncoder


def pretrained_normalization(enc: PretrainedEncoder) -> str | None:
    """The rule the encoder's images were normalised by (None: a run from before it was recorded, `auto`)."""
    recorded = enc.metadata.get("normalization")
    if recorded:
        return recorded
    data = enc.pretrain_cfg.data
    if data.modality == "auto":
        return None  # decided by A's dataset, which the run did not record and may be gone
    lo, hi = (float(v) for v in data.ct_window)
    return f"ct {lo:g}..{hi:g}" if data.modality == "ct" else data.modality


def pretrained_spatial_dims(enc: PretrainedEncoder) -> int:
    """2 or 3: what the encoder was pretrained on."""
    return int(enc.metadata["spatial_dims"])


def check_spatial_dims(enc: PretrainedEncoder, cfg: FinetuneConfig) -> None:
    """One AhmError line when a 2D encoder meets a 3D fine-tuning or the reverse (before any data is read)."""
    pre = pretrained_spatial_dims(enc)
    if pre != cfg.data.spatial_dims:
        raise AhmError(f"--init {enc.run_dir}: the encoder was pretrained in {pre}D (data.spatial_dims {pre}) but "
                       f"this fine-tuning is {cfg.data.spatial_dims}D; fine-tune with --spatial-dims {pre} or "
                       f"pretrain in {cfg.data.spatial_dims}D")


def init_mismatches(enc: PretrainedEncoder, cfg: FinetuneConfig, in_channels: int, normalization: str) -> list[str]:
    """What differs between the pretraining in `enc` and this fine-tuning, one phrase each (empty: they agree)."""
    from ahm.models import backbone_of_segmenter

    found = []
    pre_channels = int(enc.metadata.get("in_channels", enc.pretrain_cfg.data.channels or in_channels))
    if pre_channels != in_channels:
        found.append(f"channels {pre_channels} pretrained vs {in_channels} in {cfg.data.path} "
                     f"(set data.channels: {pre_channels} in a --config to convert its images)")
    pre_size, size, differ = pipeline_for(cfg).pretrained_sizes(enc.pretrain_cfg.data, enc.metadata, cfg.data)
    found += differ
    found += backbone_of_segmenter(enc.segmenter).init_mismatches(enc.metadata, enc.pretrain_cfg.model, pre_size, size)
    pre_norm = pretrained_normalization(enc)
    if pre_norm is not None and pre_norm != normalization:
        found.append(f"normalisation {pre_norm} pretrained vs {normalization} here "
                     f"(set data.modality{' and data.ct_window' if pre_norm.startswith('ct') else ''} in a --config)")
    return found


def check_init_matches(enc: PretrainedEncoder, cfg: FinetuneConfig, in_channels: int, normalization: str) -> None:
    """One AhmError line listing every difference, or nothing."""
    found = init_mismatches(enc, cfg, in_channels, normalization)
    if found:
        raise AhmError(f"--init {enc.run_dir}: the pretraining does not match this fine-tuning: {'; '.join(found)}")
