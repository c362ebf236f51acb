"""The backbone interface: everything that differs between a ViT and a UNet, in one object per backbone.

A backbone is pretrained as a masked-image model and fine-tuned as a segmenter. The training loops, the CLI and
the benches ask the backbone (`get_backbone(cfg.model.backbone)`, or `backbone_of_segmenter(cfg.segmenter)` on the
fine-tuning side) and never branch on its name, so a new backbone is one file registered in `__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.models.mim import MIMModel

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig


class Backbone(ABC):
    """One backbone: its masked-image model, its segmenter, how pretrained weights move between them."""

    name: str = ""  # the `model.backbone` value, also written as "backbone" in the encoder's metadata
    segmenter: str = ""  # the `segmenter` value of a fine-tuning config (`--model` of `ahm finetune`)
    # True when the segmenter trains on the fine-tuning crop padded back to the full image (a fixed patch grid)
    pads_crop: bool = False

    def check_config(self, model_cfg: ModelConfig) -> None:
        """AhmError for model settings this backbone refuses, before any run directory is made."""

    @abstractmethod
    def build_mim_model(self, model_cfg: ModelConfig, image_size: int, in_channels: int,
                        spatial_dims: int = 2) -> MIMModel:
        """The masked-image model that pretraining drives."""

    @abstractmethod
    def build_segmenter(self, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int,
                        spatial_dims: int = 2) -> nn.Module:
        """The segmenter with `num_classes` outputs that the MIM model's exported encoder loads into."""

    @abstractmethod
    def expected_metadata(self, segmenter: nn.Module) -> dict[str, str]:
        """The encoder metadata (see `MIMModel.encoder_metadata`) a segmenter needs to load weights (strings)."""

    def segmenter_record(self, model_cfg: ModelConfig, spatial_dims: int) -> dict[str, str]:
        """What a fine-tuning checkpoint records about how this backbone's segmenter reads its input, beyond the
        common metadata; `check_segmenter_record` holds a checkpoint to it when it is loaded. Nothing by default."""
        return {}

    def check_segmenter_record(self, model_cfg: ModelConfig, spatial_dims: int, meta: dict[str, Any],
                               source: str | Path) -> None:
        """Refuse, in one line, a checkpoint whose segmenter read its input otherwise than this code's does."""
        for key, value in self.segmenter_record(model_cfg, spatial_dims).items():
            if meta.get(key) != value:
                raise AhmError(f"{source}: the checkpoint records {key}={meta.get(key)!r}, but this ahm's "
                               f"{self.segmenter} segmenter needs {key}={value!r} (it was fine-tuned by an older "
                               f"ahm that read its input differently); fine-tune it again")

    @abstractmethod
    def load_weights(self, segmenter: nn.Module, weights: dict[str, Tensor], source: str) -> dict[str, Any]:
        """Load checked weights strictly; {"loaded": tensors loaded, "skipped": keys left at their fresh init}."""

    @abstractmethod
    def param_groups(self, segmenter: nn.Module, base_lr: float, encoder_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """AdamW groups with "name", "params", "lr" and "pretrained" (False only for the layers that start new)."""

    @abstractmethod
    def encoder_modules(self, segmenter: nn.Module) -> list[nn.Module]:
        """The modules that hold the pretrained representation, which the frozen-encoder protocol fixes (weights
        and normalisation statistics); everything else in the segmenter trains."""

    def crop_multiple(self, model_cfg: ModelConfig) -> int:
        """A fine-tuning crop's side must be a multiple of this (1: any side)."""
        return 1

    def input_multiple(self, model_cfg: ModelConfig) -> int:
        """A side of the segmenter's own input must be a multiple of this: in 3D the training crop is that input
        (no padding back to a fixed grid), so a patch-based segmenter needs whole patches too."""
        return self.crop_multiple(model_cfg)

    def finetune_model_config(self, pretrained: ModelConfig, finetune: ModelConfig) -> ModelConfig:
        """The fine-tuning model settings when starting from an encoder pretrained with `pretrained`."""
        return pretrained.model_copy(update={"norm": finetune.norm})

    def init_mismatches(self, metadata: dict[str, str], pretrained: ModelConfig, pretrained_size: int,
                        image_size: int) -> list[str]:
        """What besides channels, size and normalisation keeps a pretrained encoder from this fine-tuning."""
        return []

    def load_pretrained(self, segmenter: nn.Module, weights: dict[str, Tensor],
                        metadata: dict[str, str]) -> dict[str, Any]:
        """Check the encoder's metadata against the segmenter, then load its weights strictly.

        Returns {"loaded": number of tensors loaded, "skipped": keys left at their fresh initialisation}.
        AhmError, naming metadata["path"] when given, if the backbone, sizes, image size or channels differ.
        """
        source = metadata.get("path", "pretrained encoder")
        got = metadata.get("backbone")
        if got != self.name:
            raise AhmError(f"{source}: encoder was pretrained with backbone {got!r}, "
                           f"but --segmenter {self.segmenter} needs a {self.name!r} encoder")
        dims = getattr(segmenter, "spatial_dims", 2)
        # encoders written before 3D existed carry no spatial_dims: they are 2D, and the weights' shapes say so
        if "spatial_dims" in metadata and metadata["spatial_dims"] != str(dims):
            raise AhmError(f"{source}: encoder was pretrained in {metadata['spatial_dims']}D but the segmenter is "
                           f"{dims}D; fine-tune with the pretraining run's data.spatial_dims")
        for key, value in self.expected_metadata(segmenter).items():
            got_value = metadata.get(key)
            if got_value is None:
                # every encoder written since the run format existed records it; migrate() adds it to older ones
                raise AhmError(f"{source}: encoder metadata has no {key!r}; a run directory written by an older ahm "
                               f"is upgraded when read as a run (`ahm finetune --init RUN`)")
            if got_value != value:
                if key == "norm":
                    raise AhmError(
                        f"{source}: encoder was pretrained with {got_value} norm but the segmenter has {value} norm; "
                        f"fine-tune with the pretraining run's model settings (model.norm: {got_value})"
                    )
                raise AhmError(
                    f"{source}: encoder has {key}={got_value!r} but the segmenter needs {key}={value!r}; "
                    f"fine-tune with the pretraining run's model and data settings"
                )
        return self.load_weights(segmenter, weights, source)


def param_group_adder(groups: list[dict[str, Any]]):
    """`add(name, params, lr, pretrained=True)`: append a group of the trainable ones among `params`."""

    def add(name: str, params: list[nn.Parameter], lr: float, pretrained: bool = True) -> None:
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lr, "pretrained": pretrained})

    return add
