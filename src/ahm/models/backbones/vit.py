"""The `vit` backbone: an MAE-style ViT pretrained on visible patches, fine-tuned as MONAI UNETR.

The MAE's encoder is exactly `monai.networks.nets.ViT(...)`, so its state dict loads strictly into `UNETR(...).vit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monai.networks.nets import UNETR
from torch import Tensor, nn

from ahm.errors import AhmError
from ahm.models.backbones.base import Backbone, param_group_adder
from ahm.models.mae import MAEViT, freeze_unused_norms
from ahm.models.mim import size_text
from ahm.models.norm import fast_instance_norms

if TYPE_CHECKING:
    # annotations only: the config validates backbone names against this registry, so a runtime import would be a circle
    from ahm.config import ModelConfig

UNETR_PATCH_SIZE = 16  # fixed inside MONAI's UNETR
UNETR_NUM_LAYERS = 12  # UNETR taps blocks 3, 6, 9 and 12


class ViTBackbone(Backbone):
    name = "vit"
    segmenter = "unetr"
    # UNETR's position embeddings are one per patch of a fixed grid: a crop is padded back to the full image
    pads_crop = True

    def check_config(self, model_cfg: ModelConfig) -> None:
        model_cfg.vit_dims()

    def build_mim_model(self, model_cfg: ModelConfig, image_size: int, in_channels: int,
                        spatial_dims: int = 2) -> MAEViT:
        dims = model_cfg.vit_dims()
        if model_cfg.decoder_dim % model_cfg.decoder_heads:
            raise AhmError(
                f"model.decoder_dim {model_cfg.decoder_dim} must be divisible by "
                f"model.decoder_heads {model_cfg.decoder_heads}"
            )
        return MAEViT(
            image_size=image_size,
            in_channels=in_channels,
            patch_size=model_cfg.patch_size,
            norm_pix=model_cfg.norm_pix,
            decoder_dim=model_cfg.decoder_dim,
            decoder_depth=model_cfg.decoder_depth,
            decoder_heads=model_cfg.decoder_heads,
            decoder_mlp_dim=model_cfg.decoder_dims()["decoder_mlp_dim"],
            spatial_dims=spatial_dims,
            **dims,
        )

    def build_segmenter(self, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int,
                        spatial_dims: int = 2) -> nn.Module:
        """MONAI UNETR with the ViT sizes of `model_cfg` (patch 16 and 12 blocks are fixed inside UNETR)."""
        side = "x".join([str(UNETR_PATCH_SIZE)] * spatial_dims)
        if model_cfg.patch_size != UNETR_PATCH_SIZE:
            raise AhmError(
                f"--patch-size {model_cfg.patch_size} cannot be used with --segmenter unetr: MONAI's UNETR "
                f"always cuts {side} patches; pretrain with --patch-size 16 "
                f"or fine-tune --segmenter unet"
            )
        dims = model_cfg.vit_dims()
        if dims["num_layers"] != UNETR_NUM_LAYERS:
            raise AhmError(
                f"model num_layers {dims['num_layers']} cannot be used with --segmenter unetr: MONAI's UNETR has "
                f"exactly {UNETR_NUM_LAYERS} transformer blocks"
            )
        # 3D: one size per axis (the training crop, which is the network's input)
        sides = (image_size,) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if any(side % UNETR_PATCH_SIZE for side in sides):
            raise AhmError(
                f"--image-size {'x'.join(map(str, sides))} must be a multiple of {UNETR_PATCH_SIZE} for "
                f"--segmenter unetr"
            )
        if not isinstance(image_size, int):
            image_size = sides
        net = UNETR(
            in_channels=in_channels,
            out_channels=num_classes,
            img_size=image_size,
            feature_size=16,
            hidden_size=dims["hidden_size"],
            mlp_dim=dims["mlp_dim"],
            num_heads=dims["num_heads"],
            norm_name=model_cfg.norm,
            spatial_dims=spatial_dims,
        )
        net.spatial_dims = spatial_dims
        # MONAI reads this flag only in forward: attention goes through SDPA, the weights and keys stay the same
        for block in net.vit.blocks:
            block.attn.use_flash_attention = True
        freeze_unused_norms(net)
        fast_instance_norms(net)
        return net

    def expected_metadata(self, segmenter: nn.Module) -> dict[str, str]:
        vit = segmenter.vit
        conv = vit.patch_embedding.patch_embeddings
        block = vit.blocks[0]
        return {
            "hidden_size": str(conv.out_channels),
            "mlp_dim": str(block.mlp.linear1.out_features),
            "num_layers": str(len(vit.blocks)),
            "num_heads": str(block.attn.num_heads),
            "patch_size": str(conv.kernel_size[0]),
            "image_size": size_text([f * conv.kernel_size[0] for f in segmenter.feat_size]),
            "in_channels": str(conv.in_channels),
        }

    def encoder_modules(self, segmenter: nn.Module) -> list[nn.Module]:
        """The ViT; UNETR's convolutional encoder taps and decoder are new layers."""
        return [segmenter.vit]

    def load_weights(self, segmenter: nn.Module, weights: dict[str, Tensor], source: str) -> dict[str, Any]:
        try:
            segmenter.vit.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise AhmError(
                f"{source}: weights do not fit the UNETR encoder ({str(exc).splitlines()[0]})"
            ) from exc
        return {"loaded": len(weights), "skipped": []}

    def param_groups(self, segmenter: nn.Module, base_lr: float, encoder_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """Layer-wise decay over the ViT: block i (0-based) at base*scale*decay**(num_layers - i), the patch
        embedding one step further (decay**(num_layers + 1)), the final norm at base*scale, the decoder at base."""
        groups: list[dict[str, Any]] = []
        add = param_group_adder(groups)
        encoder_lr = base_lr * encoder_lr_scale
        vit = segmenter.vit
        depth = len(vit.blocks)
        add("vit.patch_embedding", list(vit.patch_embedding.parameters()), encoder_lr * layer_decay ** (depth + 1))
        for i, block in enumerate(vit.blocks):
            add(f"vit.blocks.{i}", list(block.parameters()), encoder_lr * layer_decay ** (depth - i))
        add("vit.norm", list(vit.norm.parameters()), encoder_lr)
        in_vit = {id(p) for p in vit.parameters()}
        add("decoder", [p for p in segmenter.parameters() if id(p) not in in_vit], base_lr, pretrained=False)
        return groups

    def input_multiple(self, model_cfg: ModelConfig) -> int:
        return UNETR_PATCH_SIZE

    def init_mismatches(self, metadata: dict[str, str], pretrained: ModelConfig, pretrained_size,
                        image_size) -> list[str]:
        # The ViT's position embeddings are one per patch of the pretraining grid.
        patch = int(metadata.get("patch_size", pretrained.patch_size))
        if not isinstance(image_size, int):  # 3D: the pretraining and fine-tuning crops, per axis
            pre = tuple(int(s) for s in pretrained_size)
            here = tuple(int(s) for s in image_size)
            if pre != here:
                return [f"patch grid {'x'.join(str(s // patch) for s in pre)} of {patch} px pretrained vs "
                        f"{'x'.join(f'{s / patch:g}' for s in here)} here (use data.crop_size "
                        f"{'x'.join(map(str, pre))})"]
            return []
        pre_grid = f"{pretrained_size // patch}x{pretrained_size // patch}"
        grid = f"{image_size // patch}x{image_size // patch}"
        if pre_grid != grid or image_size % patch:
            return [f"patch grid {pre_grid} of {patch} px pretrained vs "
                    f"{grid if not image_size % patch else f'{image_size / patch:g} patches a side'} here"]
        return []
