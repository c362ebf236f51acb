"""The `nnunet` backbone: the network nnU-Net v2 builds from a plans file (`model.plans`,
`model.configuration`), pretrained as a masked-input autoencoder and fine-tuned in nnU-Net (`ahm export --to
nnunet`) or here (`--segmenter nnunet`: the same network with num_classes outputs)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.models.backbones.base import Backbone, param_group_adder
from ahm.nnunet import (
    SEG_KEY,
    build_network,
    configuration_digest,
    geometry,
    read_plans,
    resolve_configuration,
)

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig
    from ahm.models.nnunet_mim import MaskedNnunet


class NnunetBackbone(Backbone):
    name = "nnunet"
    segmenter = "nnunet"

    def check_config(self, model_cfg: ModelConfig) -> None:
        _configuration(model_cfg)

    def crop_multiple(self, model_cfg: ModelConfig) -> int:
        """nnU-Net's skip connections need whole feature maps: every side a multiple of the strides' product (the
        largest over the axes)."""
        config = _configuration(model_cfg)
        strides = config["architecture"].get("arch_kwargs", {}).get("strides") or []
        dims = len(config["patch_size"])
        # a stage's stride is one int for every axis, or one per axis
        per_stage = [[int(s)] * dims if isinstance(s, int) else [int(v) for v in s] for s in strides]
        return max((math.prod(axis) for axis in zip(*per_stage, strict=True)), default=1)

    def build_mim_model(self, model_cfg: ModelConfig, image_size: int, in_channels: int,
                        spatial_dims: int = 2) -> MaskedNnunet:
        from ahm.models.nnunet_mim import MaskedNnunet

        self.check_config(model_cfg)
        return MaskedNnunet(model_cfg, image_size, in_channels, spatial_dims)

    def build_segmenter(self, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int,
                        spatial_dims: int = 2) -> nn.Module:
        self.check_config(model_cfg)  # both named from here on
        plans_path, name = str(model_cfg.plans), str(model_cfg.configuration)
        plans = read_plans(plans_path)
        net = build_network(plans, name, in_channels, num_classes)
        geo = geometry(plans, name, plans_path)
        if geo.permutes:
            # as in pretraining (MaskedNnunet): the network sees nnU-Net's axis order, so every pretrained kernel
            # meets the axis it learned on; hooks rather than a wrapper keep the state-dict keys nnU-Net's own
            to_net, from_net = geo.to_network_dims(), geo.from_network_dims()
            net.register_forward_pre_hook(lambda _m, args: (args[0].permute(to_net), *args[1:]))
            net.register_forward_hook(lambda _m, _args, out: out.permute(from_net))
        net.nnunet_digest = configuration_digest(resolve_configuration(plans, model_cfg.configuration))
        net.in_channels = in_channels
        net.spatial_dims = spatial_dims
        return net

    def segmenter_record(self, model_cfg: ModelConfig, spatial_dims: int) -> dict[str, str]:
        plans_path, name = str(model_cfg.plans), str(model_cfg.configuration)
        # 3D segmenters fine-tuned before the axis hooks fed the network ahm's axis order; they lack this record
        return {"nnunet_axes": "network"} if geometry(read_plans(plans_path), name, plans_path).permutes else {}

    def expected_metadata(self, segmenter: nn.Module) -> dict[str, str]:
        return {"nnunet_digest": segmenter.nnunet_digest, "in_channels": str(segmenter.in_channels)}

    def encoder_modules(self, segmenter: nn.Module) -> list[nn.Module]:
        return [segmenter.encoder]

    def load_weights(self, segmenter: nn.Module, weights: dict[str, Tensor], source: str) -> dict[str, Any]:
        target = segmenter.state_dict()
        body = {k: v for k, v in target.items() if SEG_KEY not in k}
        missing = sorted(set(body) - set(weights))
        wrong = sorted(k for k in body if k in weights and tuple(weights[k].shape) != tuple(body[k].shape))
        if missing or wrong:
            key = (missing or wrong)[0]
            what = f"missing {key}" if missing else \
                f"shape of {key} is {tuple(weights[key].shape)}, needs {tuple(body[key].shape)}"
            raise AhmError(f"{source}: weights do not fit the nnU-Net segmenter ({what})")
        segmenter.load_state_dict({k: weights[k] for k in body}, strict=False)
        return {"loaded": len(body), "skipped": sorted(k for k in target if SEG_KEY in k)}

    def param_groups(self, segmenter: nn.Module, base_lr: float, encoder_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        add = param_group_adder(groups)
        named = list(segmenter.named_parameters())
        add("nnunet.pretrained", [p for n, p in named if SEG_KEY not in n], base_lr * encoder_lr_scale)
        add("nnunet.head", [p for n, p in named if SEG_KEY in n], base_lr, pretrained=False)
        return groups

    def finetune_model_config(self, pretrained: ModelConfig, finetune: ModelConfig) -> ModelConfig:
        return pretrained.model_copy()


def _configuration(model_cfg: ModelConfig) -> dict[str, Any]:
    """The configuration of the plans that `model_cfg` names, resolved; AhmError when it names none."""
    plans, name = model_cfg.plans, model_cfg.configuration
    if not plans or not name:
        raise AhmError("the nnunet backbone needs model.plans and model.configuration (--plans, --configuration)")
    return resolve_configuration(read_plans(plans), name, plans)
