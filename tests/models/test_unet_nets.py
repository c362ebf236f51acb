"""The paper's reconstructor preset (`model.unet_network: basic-unet`): size, dropout, MIM model, segmenter loading."""

from __future__ import annotations

import pytest
import torch

from ahm.config import ModelConfig
from ahm.errors import AhmError
from ahm.models.segmenter import build_segmenter, load_pretrained
from ahm.models.unet_mim import MaskedUNet
from ahm.models.unet_nets import build_unet_network

PAPER = dict(backbone="unet", unet_network="basic-unet", unet_channels=(32, 64, 128, 256, 512),
             unet_strides=(2, 2, 2, 2), unet_dropout=(0.05, 0.1, 0.2, 0.3, 0.5), norm="batch", norm_pix=False)
AUTHORS_PARAMETERS = 7_765_409  # their models_unet_1.UNet(1, 1, init_feature_num=32)


def test_paper_reconstructor_size_and_dropout() -> None:
    net = build_unet_network(ModelConfig(**PAPER), 1, 1)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - AUTHORS_PARAMETERS) / AUTHORS_PARAMETERS < 0.05
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0] == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert net(torch.rand(1, 1, 320, 320)).shape == (1, 1, 320, 320)


def test_paper_preset_pretrains_and_loads_into_its_segmenter() -> None:
    cfg = ModelConfig(**{**PAPER, "unet_channels": (4, 8, 8, 8, 8), "patch_size": 16})
    mim = MaskedUNet(cfg, 32, 1)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, :3] = True
    out = mim(torch.rand(2, 1, 32, 32), mask)
    out.loss.backward()
    assert mim.features(torch.rand(1, 1, 32, 32)).shape[:2] == (1, 4)
    seg = build_segmenter("unet", cfg, 32, 1, 3)
    loaded = load_pretrained(seg, "unet", mim.export_encoder(), mim.encoder_metadata())
    assert loaded["skipped"] == ["final_conv.bias", "final_conv.weight"]
    # an encoder of the other network is refused with one line
    plain = MaskedUNet(ModelConfig(backbone="unet", unet_channels=(4, 8, 8, 8, 8), unet_strides=(2, 2, 2, 2),
                                   unet_num_res_units=0), 32, 1)
    with pytest.raises(AhmError, match="unet_network") as err:
        load_pretrained(seg, "unet", plain.export_encoder(), plain.encoder_metadata())
    assert "\n" not in str(err.value)


def test_basic_unet_needs_five_levels() -> None:
    with pytest.raises(AhmError, match="five unet_channels"):
        build_unet_network(ModelConfig(backbone="unet", unet_network="basic-unet"), 1, 1)


def test_ahm_official_preset_resolves() -> None:
    from pathlib import Path

    from ahm.config import FinetuneConfig, PretrainConfig, build_config

    path = Path(__file__).resolve().parents[2] / "configs" / "ahm-official.yaml"
    pre = build_config(PretrainConfig, file=path)
    assert (pre.data.image_size, pre.model.patch_size, pre.masking.mask_ratio, pre.train.batch_size) == (320, 16, 0.75, 12)
    assert pre.masking.policy == "ahm-official" and pre.masking.official_agent_lr == 2e-4
    assert sum(p.numel() for p in build_unet_network(pre.model, 1, 1).parameters()) == 7_782_849
    assert build_config(FinetuneConfig, file=path).model.unet_network == "basic-unet"
