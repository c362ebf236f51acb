"""Segmenters: building, loading pretrained weights (and refusing mismatches), layer-wise lr groups."""

from __future__ import annotations

import itertools

import pytest
import torch

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models import build_mim_model
from ahm.models.segmenter import build_segmenter, encoder_param_groups, load_pretrained

SIZE = 32


def vit_cfg(**update: object) -> ModelConfig:
    base = {
        "preset": "custom",
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_layers": 12,
        "num_heads": 2,
        "patch_size": 16,
        "decoder_dim": 16,
        "decoder_depth": 1,
        "decoder_heads": 2,
    }
    base.update(update)
    return ModelConfig(**base)


def unet_cfg(**update: object) -> ModelConfig:
    base = {
        "backbone": "unet",
        "patch_size": 8,
        "unet_channels": (4, 8, 16),
        "unet_strides": (2, 2),
        "unet_num_res_units": 1,
    }
    base.update(update)
    return ModelConfig(**base)


def test_unetr_loads_the_pretrained_vit_strictly() -> None:
    torch.manual_seed(0)
    mim = build_mim_model(vit_cfg(), SIZE, 3)
    seg = build_segmenter("unetr", vit_cfg(), SIZE, 3, num_classes=2)
    summary = load_pretrained(seg, "unetr", mim.export_encoder(), mim.encoder_metadata())
    assert summary == {"loaded": len(seg.vit.state_dict()), "skipped": []}
    for key, value in mim.export_encoder().items():
        assert torch.equal(seg.vit.state_dict()[key], value)
    assert seg(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE)


def test_unetr_sdpa_attention_matches_monai_attention() -> None:
    torch.manual_seed(0)
    seg = build_segmenter("unetr", vit_cfg(), SIZE, 1, num_classes=3).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    fast = seg(x)
    for block in seg.vit.blocks:
        block.attn.use_flash_attention = False
    assert torch.allclose(fast, seg(x), atol=1e-5)


def test_unet_loads_everything_but_the_head() -> None:
    torch.manual_seed(0)
    mim = build_mim_model(unet_cfg(), SIZE, 1)
    seg = build_segmenter("unet", unet_cfg(), SIZE, 1, num_classes=2)
    fresh_head = {k: v.clone() for k, v in seg.state_dict().items() if k.startswith("model.2.")}
    weights = mim.export_encoder()
    summary = load_pretrained(seg, "unet", weights, mim.encoder_metadata())
    state = seg.state_dict()
    assert sorted(summary["skipped"]) == sorted(fresh_head)
    assert summary["loaded"] == len(state) - len(fresh_head)
    for key, value in state.items():
        if key in fresh_head:
            assert torch.equal(value, fresh_head[key])
        else:
            assert torch.equal(value, weights[key])
    assert seg(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE)


@pytest.mark.parametrize(
    ("kind", "cfg_mim", "channels", "cfg_seg", "message"),
    [
        ("unetr", unet_cfg(), 1, vit_cfg(), "backbone 'unet'.*needs a 'vit'"),
        ("unet", vit_cfg(), 1, unet_cfg(), "backbone 'vit'.*needs a 'unet'"),
        ("unetr", vit_cfg(hidden_size=48, num_heads=3), 1, vit_cfg(), "hidden_size='48'.*hidden_size='32'"),
        ("unetr", vit_cfg(), 3, vit_cfg(), "in_channels='3'.*in_channels='1'"),
        ("unet", unet_cfg(), 3, unet_cfg(), "in_channels='3'.*in_channels='1'"),
        ("unet", unet_cfg(unet_channels=(8, 16, 32)), 1, unet_cfg(), "unet_channels='8,16,32'"),
    ],
)
def test_load_pretrained_refuses_a_mismatch(kind, cfg_mim, channels, cfg_seg, message) -> None:
    mim = build_mim_model(cfg_mim, SIZE, channels)
    seg = build_segmenter(kind, cfg_seg, SIZE, 1, num_classes=2)
    metadata = dict(mim.encoder_metadata(), path="runs/a/encoder.safetensors")
    with pytest.raises(AhmError, match="^runs/a/encoder.safetensors: .*" + message):
        load_pretrained(seg, kind, mim.export_encoder(), metadata)


def test_load_pretrained_refuses_weights_that_do_not_fit_their_metadata() -> None:
    mim = build_mim_model(vit_cfg(), SIZE, 1)
    seg = build_segmenter("unetr", vit_cfg(), SIZE, 1, num_classes=2)
    weights = mim.export_encoder()
    weights.pop("norm.weight")
    with pytest.raises(AhmError, match="^pretrained encoder: weights do not fit"):
        load_pretrained(seg, "unetr", weights, mim.encoder_metadata())
    useg = build_segmenter("unet", unet_cfg(), SIZE, 1, num_classes=2)
    umim = build_mim_model(unet_cfg(), SIZE, 1)
    uweights = umim.export_encoder()
    uweights["model.0.residual.bias"] = torch.zeros(5)
    with pytest.raises(AhmError, match="model.0.residual.bias"):
        load_pretrained(useg, "unet", uweights, dict(umim.encoder_metadata(), path="enc.pt"))


def test_unetr_layer_decay_rises_with_depth_and_covers_every_parameter() -> None:
    seg = build_segmenter("unetr", vit_cfg(), SIZE, 1, num_classes=2)
    groups = encoder_param_groups(seg, "unetr", base_lr=1e-3, encoder_lr_scale=0.5, layer_decay=0.75)
    names = [g["name"] for g in groups]
    assert names == ["vit.patch_embedding"] + [f"vit.blocks.{i}" for i in range(12)] + ["vit.norm", "decoder"]
    lrs = [g["lr"] for g in groups]
    assert all(a < b for a, b in itertools.pairwise(lrs))
    assert lrs[-2] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(1e-3)
    assert lrs[1] == pytest.approx(5e-4 * 0.75**12) and lrs[0] == pytest.approx(5e-4 * 0.75**13)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in seg.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)


def test_unet_groups_give_the_new_head_the_base_lr() -> None:
    seg = build_segmenter("unet", unet_cfg(), SIZE, 1, num_classes=2)
    groups = encoder_param_groups(seg, "unet", base_lr=1e-3, encoder_lr_scale=0.1, layer_decay=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("unet.pretrained", pytest.approx(1e-4)),
        ("unet.head", 1e-3),
    ]
    assert sum(len(g["params"]) for g in groups) == len(list(seg.parameters()))


def test_build_segmenter_refuses_what_unetr_cannot_hold() -> None:
    with pytest.raises(AhmError, match="--patch-size 8 cannot be used with --segmenter unetr"):
        build_segmenter("unetr", vit_cfg(patch_size=8), SIZE, 1, 2)
    with pytest.raises(AhmError, match="num_layers 6"):
        build_segmenter("unetr", vit_cfg(num_layers=6), SIZE, 1, 2)
    with pytest.raises(AhmError, match="--image-size 40"):
        build_segmenter("unetr", vit_cfg(), 40, 1, 2)
    with pytest.raises(AhmError, match="segmenter 'swin'"):
        build_segmenter("swin", vit_cfg(), SIZE, 1, 2)


def test_instance_norm_is_blind_to_brightness_and_batch_norm_is_not() -> None:
    # Why model.norm defaults to batch: in a UNet whose convolutions are each followed by instance norm,
    # scaling the intensities (a*x, a > 0; an offset too, but for the zero padding at the borders) gives
    # exactly the same scores, so the network cannot use the intensity level that tells tissues apart.
    # (Residual units let some of it through their shortcuts.)
    torch.manual_seed(0)
    cfg = unet_cfg(unet_num_res_units=0)
    assert cfg.norm == "batch"
    x = torch.rand(2, 1, SIZE, SIZE)
    for norm, blind in (("instance", True), ("batch", False)):
        seg = build_segmenter("unet", cfg.model_copy(update={"norm": norm}), SIZE, 1, num_classes=3)
        seg.train()
        seg(torch.rand(8, 1, SIZE, SIZE))  # gives batch norm running statistics to use in eval
        seg.eval()
        with torch.no_grad():
            gap = float((seg(x) - seg(1.7 * x)).abs().max())
        assert (gap < 1e-3) if blind else (gap > 1e-2), (norm, gap)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in seg.modules()) == (norm == "batch")


def test_unetr_decoder_follows_model_norm() -> None:
    for norm in ("batch", "instance"):
        seg = build_segmenter("unetr", vit_cfg(norm=norm), SIZE, 1, num_classes=3)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in seg.modules()) == (norm == "batch")
    assert seg(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 3, SIZE, SIZE)


def test_unet_norm_must_match_the_pretrained_encoder() -> None:
    torch.manual_seed(0)
    mim = build_mim_model(unet_cfg(norm="instance"), SIZE, 1)
    weights, meta = mim.export_encoder(), mim.encoder_metadata()
    assert meta["norm"] == "instance"
    seg = build_segmenter("unet", unet_cfg(), SIZE, 1, num_classes=3)
    with pytest.raises(AhmError, match="instance norm but the segmenter has batch norm.*model.norm: instance"):
        load_pretrained(seg, "unet", weights, meta)
    # encoders saved before the option existed carry no "norm": runformat.migrate() records their instance norm
    # (tests/train/test_runformat.py); metadata without it, read outside a run directory, is refused by name
    legacy = {k: v for k, v in meta.items() if k != "norm"}
    with pytest.raises(AhmError, match="encoder metadata has no 'norm'"):
        load_pretrained(seg, "unet", weights, legacy)
    seg = build_segmenter("unet", unet_cfg(norm="instance"), SIZE, 1, num_classes=3)
    assert load_pretrained(seg, "unet", weights, meta)["loaded"] > 0
