"""nnU-Net's 3D network sees nnU-Net's axis order in fine-tuning as in pretraining (plans written here; nnU-Net's
own network classes, no planning run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                reason="needs nnunetv2 (pip install 'ahm[nnunet]')")


def _plans(path: Path) -> Path:
    """A 3d_fullres configuration whose axes differ: nnU-Net's (z, y, x) permuted by transpose_forward [0, 2, 1],
    an anisotropic patch and first-stage strides that pool only two of the three axes."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
                            "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"dataset_name": "Dataset900_Axes", "plans_name": "nnUNetPlans", "transpose_forward": [0, 2, 1],
             "transpose_backward": [0, 2, 1], "configurations": {"3d_fullres": {
                 "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": [8, 16, 32], "median_image_size_in_voxels": [8, 16, 32], "spacing": [3.0, 1.0, 0.8],
                 "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                 "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
                 "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
                 "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                 "resampling_fn_probabilities_kwargs": {}, "architecture": arch, "batch_dice": False}},
             "foreground_intensity_properties_per_channel": {}}
    path.write_text(json.dumps(plans))
    return path


def test_segmenter_and_pretraining_model_feed_the_network_the_same_axes(tmp_path: Path) -> None:
    from ahm.config import ModelConfig
    from ahm.models.backbones import get_backbone
    from ahm.models.nnunet_mim import MaskedNnunet
    from ahm.nnunet import SEG_KEY, geometry, read_plans

    plans = _plans(tmp_path / "nnUNetPlans.json")
    cfg = ModelConfig(backbone="nnunet", plans=str(plans), configuration="3d_fullres", patch_size=8)
    geo = geometry(read_plans(plans), "3d_fullres")
    assert geo.permutes and geo.patch_size != (8, 16, 32)  # ahm's order is not the network's
    torch.manual_seed(0)
    pre = MaskedNnunet(cfg, geo.patch_size, 1, spatial_dims=3).eval()
    seg = get_backbone("nnunet").build_segmenter(cfg, geo.patch_size, 1, 3, spatial_dims=3).eval()
    seg.load_state_dict({k: v for k, v in pre.net.state_dict().items() if SEG_KEY not in k}, strict=False)
    x = torch.randn(2, 1, *geo.patch_size)  # a batch in ahm's axis order, as the pipeline hands it over
    seen: list[torch.Tensor] = []
    hook = seg.decoder.seg_layers[-1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = seg(x)
        pre_features = pre.features(x)
    hook.remove()
    assert tuple(out.shape) == (2, 3, *geo.patch_size)  # logits back on ahm's grid
    # the decoder's last feature map, pooled per patch as pretraining pools it: the same weights on the same input
    # give the same features only if both feed the network the same axes
    fmap = seen[-1].permute(geo.from_network_dims())
    pooled = torch.nn.functional.adaptive_avg_pool3d(fmap, pre.grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, pre_features)
    # and the network itself was given nnU-Net's order
    with torch.no_grad():
        direct = seg.decoder.seg_layers[-1](seen[-1])
    assert tuple(direct.shape[2:]) == tuple(geo.patch_size[a] for a in geo.to_network)


def test_a_3d_checkpoint_without_the_axis_record_is_refused_in_one_line(tmp_path: Path) -> None:
    from ahm.config import ModelConfig
    from ahm.errors import AhmError
    from ahm.models.backbones import get_backbone

    cfg = ModelConfig(backbone="nnunet", plans=str(_plans(tmp_path / "nnUNetPlans.json")),
                      configuration="3d_fullres", patch_size=8)
    backbone = get_backbone("nnunet")
    record = backbone.segmenter_record(cfg, 3)
    assert record == {"nnunet_axes": "network"}
    backbone.check_segmenter_record(cfg, 3, {"segmenter": "nnunet", **record}, "run/best.ckpt")
    # a segmenter fine-tuned before its input was permuted to nnU-Net's axes
    with pytest.raises(AhmError, match=r"run/best.ckpt: .*nnunet_axes=None.*fine-tune it again"):
        backbone.check_segmenter_record(cfg, 3, {"segmenter": "nnunet"}, "run/best.ckpt")
    # other backbones record nothing, and hold no checkpoint to anything
    assert get_backbone("unet").segmenter_record(ModelConfig(), 3) == {}
