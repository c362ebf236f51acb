"""The backbone registry: every registered backbone builds its MIM model and its segmenter (2D and 3D), a
pretrained encoder loads strictly with a report, and a backbone registered from outside is usable by the callers
that fine-tuning uses (build_segmenter, load_pretrained, encoder_param_groups, train_crop_size) untouched."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ahm.config import FinetuneConfig, ModelConfig
from ahm.errors import AhmError
from ahm.models import build_mim_model
from ahm.models.backbones import BACKBONES, Backbone, backbone_of_segmenter, get_backbone, register_backbone
from ahm.models.mim import MIMModel, mask_order, masked_patch_loss, patchify
from ahm.models.segmenter import build_segmenter, encoder_param_groups, load_pretrained
from ahm.models.unet_nets import build_unet_network, head_prefix

# Small settings per built-in backbone; 32 px (2D) and 32 voxels a side (3D), patch 16: 4 or 8 patches.
CONFIGS = {
    "vit": {"preset": "custom", "hidden_size": 32, "mlp_dim": 64, "num_layers": 12, "num_heads": 2,
            "patch_size": 16, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
    "unet": {"backbone": "unet", "patch_size": 16, "unet_channels": (4, 8, 16), "unet_strides": (2, 2),
             "unet_num_res_units": 1},
}
SIZE = 32


def model_cfg(name: str) -> ModelConfig:
    return ModelConfig(**CONFIGS[name])


# Backbones whose network comes from elsewhere, tested where that is made: nnU-Net's from a plans file that its
# own planner writes (tests/nnunet/test_nnunet_e2e.py, 2D and 3D).
TESTED_ELSEWHERE = {"nnunet"}


def test_every_builtin_backbone_has_a_test_config() -> None:
    # a backbone added to the registry must be added to CONFIGS so that the tests below cover it
    assert set(CONFIGS) | TESTED_ELSEWHERE == set(BACKBONES)
    assert {b.name: backbone_of_segmenter(b.segmenter).name for b in BACKBONES.values()} == {
        "vit": "vit", "unet": "unet", "nnunet": "nnunet"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backbone_builds_its_mim_model_and_segmenter_in_2d(name: str) -> None:
    torch.manual_seed(0)
    cfg = model_cfg(name)
    backbone = get_backbone(name)
    mim = build_mim_model(cfg, SIZE, 1)
    assert mim.backbone == name
    images = torch.rand(2, 1, SIZE, SIZE)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    out = mim(images, mask)
    assert torch.isfinite(out.loss)
    assert out.per_patch_loss.shape == (2, 4)
    assert (out.per_patch_loss[~mask] == 0).all()
    seg = build_segmenter(backbone.segmenter, cfg, SIZE, 1, num_classes=3)
    assert seg(images).shape == (2, 3, SIZE, SIZE)
    summary = load_pretrained(seg, backbone.segmenter, mim.export_encoder(), mim.encoder_metadata())
    assert summary["loaded"] > 0
    groups = encoder_param_groups(seg, backbone.segmenter, 1e-3, encoder_lr_scale=0.5)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in seg.parameters() if p.requires_grad}
    assert any(not g["pretrained"] and g["lr"] == 1e-3 for g in groups)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backbone_builds_its_segmenter_in_3d(name: str) -> None:
    torch.manual_seed(0)
    backbone = get_backbone(name)
    seg = build_segmenter(backbone.segmenter, model_cfg(name), SIZE, 1, num_classes=2, spatial_dims=3)
    assert seg(torch.rand(1, 1, SIZE, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE, SIZE)
    assert seg.spatial_dims == 3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backbone_builds_its_mim_model_in_3d(name: str) -> None:
    torch.manual_seed(0)
    mim = build_mim_model(model_cfg(name), SIZE, 1, spatial_dims=3)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :4] = True
    out = mim(torch.rand(2, 1, SIZE, SIZE, SIZE), mask)
    assert torch.isfinite(out.loss)
    assert out.per_patch_loss.shape == (2, 8)
    segmenter = get_backbone(name).segmenter
    seg = build_segmenter(segmenter, model_cfg(name), SIZE, 1, num_classes=2, spatial_dims=3)
    report = load_pretrained(seg, segmenter, mim.export_encoder(), mim.encoder_metadata())
    assert report["loaded"] > 0
    state = seg.state_dict()
    for key, value in mim.export_encoder().items():
        if key not in report["skipped"]:  # UNETR holds the ViT's keys under "vit."
            assert torch.equal(state[key] if key in state else state[f"vit.{key}"], value)


def _unet_metadata(net: nn.Module, spatial_dims: int) -> dict[str, str]:
    meta = get_backbone("unet").expected_metadata(net)
    return {**meta, "backbone": "unet", "spatial_dims": str(spatial_dims), "path": "encoder.safetensors"}


def test_pretrained_3d_unet_loads_strictly_with_a_report() -> None:
    torch.manual_seed(0)
    cfg = model_cfg("unet")
    pretrained = build_unet_network(cfg, 1, 1, spatial_dims=3)  # the MIM UNet's network: outputs pixels
    weights = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    seg = build_segmenter("unet", cfg, SIZE, 1, num_classes=2, spatial_dims=3)
    head = head_prefix(seg)
    fresh_head = {k: v.clone() for k, v in seg.state_dict().items() if k.startswith(head)}
    report = load_pretrained(seg, "unet", weights, _unet_metadata(pretrained, 3))
    state = seg.state_dict()
    assert report == {"loaded": len(state) - len(fresh_head), "skipped": sorted(fresh_head)}
    for key, value in state.items():
        assert torch.equal(value, fresh_head[key] if key in fresh_head else weights[key])


def test_unet_encoder_of_the_other_dimension_is_refused_in_one_line() -> None:
    cfg = model_cfg("unet")
    flat = build_unet_network(cfg, 1, 1, spatial_dims=2)
    seg = build_segmenter("unet", cfg, SIZE, 1, num_classes=2, spatial_dims=3)
    with pytest.raises(AhmError, match=r"encoder.safetensors: encoder was pretrained in 2D but the segmenter is 3D"):
        load_pretrained(seg, "unet", flat.state_dict(), _unet_metadata(flat, 2))
    # an encoder from before spatial_dims was recorded: its weights' shapes refuse it
    old = {k: v for k, v in _unet_metadata(flat, 2).items() if k != "spatial_dims"}
    with pytest.raises(AhmError, match=r"encoder.safetensors: weights do not fit the UNet segmenter \(shape of"):
        load_pretrained(seg, "unet", flat.state_dict(), old)


def test_unknown_backbone_and_segmenter_name_the_choices() -> None:
    with pytest.raises(AhmError, match="backbone 'resnet' is not known; choose vit or unet"):
        get_backbone("resnet")
    with pytest.raises(AhmError, match=r"segmenter 'resnet' \(--segmenter, or segmenter: in a config\) is not known; "
                                       "choose one of unetr, unet"):
        build_segmenter("resnet", model_cfg("unet"), SIZE, 1, 2)


# A backbone from outside the package: a two-layer conv net, pretrained by filling masked patches.
class _ConvMIM(MIMModel):
    backbone = "tinyconv"

    def __init__(self, image_size: int, patch_size: int, in_channels: int) -> None:
        super().__init__(image_size, patch_size, in_channels)
        self.body = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.out = nn.Conv2d(6, in_channels, 1)

    def forward(self, images: Tensor, mask: Tensor):
        order, k = mask_order(mask)
        g, p = self.grid[0], self.patch_size
        pixels = mask.view(-1, 1, g, 1, g, 1).expand(-1, 1, g, p, g, p).reshape(-1, 1, g * p, g * p)
        recon = self.out(torch.relu(self.body(images.masked_fill(pixels, 0.0))))
        pred = torch.gather(patchify(recon, p), 1,
                            order[:, self.num_patches - k:, None].expand(-1, -1, recon.shape[1] * p * p))
        return masked_patch_loss(pred, images, mask, p, self.grid, False, order, k)

    def export_encoder(self) -> dict[str, Tensor]:
        return {f"0.{k}": v.detach().clone() for k, v in self.body.state_dict().items()}

    def encoder_metadata(self) -> dict[str, str]:
        return {"backbone": self.backbone, "in_channels": str(self.in_channels)}


class _ConvBackbone(Backbone):
    name = "tinyconv"
    segmenter = "tinyseg"

    def build_mim_model(self, model_cfg: ModelConfig, image_size: int, in_channels: int,
                        spatial_dims: int = 2) -> MIMModel:
        return _ConvMIM(image_size, model_cfg.patch_size, in_channels)

    def build_segmenter(self, model_cfg: ModelConfig, image_size: int, in_channels: int, num_classes: int,
                        spatial_dims: int = 2) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, num_classes, 1))

    def expected_metadata(self, segmenter: nn.Module) -> dict[str, str]:
        return {"in_channels": str(segmenter[0].in_channels)}

    def load_weights(self, segmenter: nn.Module, weights: dict[str, Tensor], source: str) -> dict[str, Any]:
        segmenter[0].load_state_dict({k.removeprefix("0."): v for k, v in weights.items()}, strict=True)
        return {"loaded": len(weights), "skipped": sorted(f"2.{k}" for k in segmenter[2].state_dict())}

    def param_groups(self, segmenter: nn.Module, base_lr: float, encoder_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict[str, Any]]:
        return [{"name": "body", "params": list(segmenter[0].parameters()), "lr": base_lr * encoder_lr_scale,
                 "pretrained": True},
                {"name": "head", "params": list(segmenter[2].parameters()), "lr": base_lr, "pretrained": False}]

    def encoder_modules(self, segmenter: nn.Module) -> list[nn.Module]:
        return [segmenter[0]]

    def crop_multiple(self, model_cfg: ModelConfig) -> int:
        return 12


@pytest.fixture
def tinyconv():
    backbone = register_backbone(_ConvBackbone())
    yield backbone
    BACKBONES.pop(backbone.name)


def test_a_registered_backbone_works_through_the_fine_tuning_callers(tinyconv: Backbone) -> None:
    from ahm.train.finetune import train_crop_size

    torch.manual_seed(0)
    cfg = ModelConfig(patch_size=8, backbone="tinyconv")
    mim = build_mim_model(cfg, SIZE, 1)
    out = mim(torch.rand(2, 1, SIZE, SIZE), torch.arange(16).repeat(2, 1) % 2 == 0)
    out.loss.backward()
    seg = build_segmenter("tinyseg", cfg, SIZE, 1, num_classes=2)
    report = load_pretrained(seg, "tinyseg", mim.export_encoder(), mim.encoder_metadata())
    assert report == {"loaded": 2, "skipped": ["2.bias", "2.weight"]}
    assert torch.equal(seg[0].weight, mim.body.weight)
    groups = encoder_param_groups(seg, "tinyseg", 1e-3, encoder_lr_scale=0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("body", pytest.approx(1e-4)), ("head", 1e-3)]
    with pytest.raises(AhmError, match="pretrained with backbone 'unet', but --segmenter tinyseg needs a 'tinyconv'"):
        load_pretrained(seg, "tinyseg", {}, {"backbone": "unet"})
    ft = FinetuneConfig(data={"image_size": 64}, segmenter="tinyseg", crop_fraction=0.5)
    assert train_crop_size(ft) == 24  # 32 rounded down to the backbone's multiple of 12


def test_a_registered_backbone_is_selectable_from_yaml_and_an_unknown_one_is_refused_by_name(tinyconv: Backbone,
                                                                                            tmp_path) -> None:
    from ahm.config import PretrainConfig, load_config
    from ahm.train.pretrain import check_config

    def written(name: str, text: str):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    assert load_config(PretrainConfig, written("p.yaml", "model: {backbone: tinyconv}\n")).model.backbone == "tinyconv"
    assert load_config(FinetuneConfig, written("f.yaml", "segmenter: tinyseg\n")).segmenter == "tinyseg"
    # refused as the config is read: the registry is the list of choices
    with pytest.raises(AhmError, match="bad.yaml: model.backbone: model backbone 'resnet' is not known; choose vit "
                                       "or unet or nnunet or tinyconv$"):
        load_config(PretrainConfig, written("bad.yaml", "model: {backbone: resnet}\n"))
    good = load_config(PretrainConfig, written("good.yaml", "model: {backbone: tinyconv}\n"))
    good.model.__dict__["backbone"] = "resnet"  # unregistered after the config was read
    with pytest.raises(AhmError, match="^model backbone 'resnet' is not known; choose vit or unet or nnunet or tinyconv$"):
        check_config(good)
    from ahm.train.finetune import finetune

    # refused before any data is read (the data folder does not exist) and before the run folder is made
    ft = FinetuneConfig(data={"path": str(tmp_path / "no-data")}, segmenter="resnet")
    with pytest.raises(AhmError, match=r"segmenter 'resnet' \(--segmenter, or segmenter: in a config\) is not known; "
                                       "choose one of unetr, unet, nnunet, tinyseg"):
        finetune(ft, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
