"""The data, model and training sections shared by pretraining and fine-tuning."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from ahm.config.base import (
    Count,
    NonNegative,
    OpenShare,
    OptionalCount,
    Positive,
    Share,
    StepCount,
    _Strict,
)
from ahm.errors import AhmError


def _orientation(v: str) -> str:
    code = v.upper()
    pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
    if len(code) != 3 or any(len(set(code) & pair) != 1 for pair in pairs):
        raise ValueError("orientation must be three axis codes, one of L/R, A/P, S/I each (e.g. RAS, LPS)")
    return code


Modality = Literal["auto", "mri", "ct", "photo"]


class DataConfig(_Strict):
    """Where the images are and how they become tensors."""

    path: str | None = None
    layout: str = "auto"  # auto | folder | msd | lgg | busi | isic | kvasir | img-anno
    image_size: int = Field(128, ge=16, le=4096)
    channels: OptionalCount = None  # None: as stored (grayscale 1, RGB 3)
    modality: Modality = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    slice_axis: Literal[0, 1, 2] = 2  # axis along which 3D volumes are cut into 2D slices
    val_fraction: OpenShare = 0.15
    test_fraction: OpenShare = 0.15
    split_seed: int = 0
    skip_bad: bool = False
    max_pixels: Count = 64_000_000  # refuse larger images before decoding them
    # 2: every volume is cut into 2D slices (along slice_axis), every image resized to image_size.
    # 3: volumes stay whole (layouts msd and folder; NIfTI, NRRD/MetaImage, DICOM); the options below apply.
    spatial_dims: Literal[2, 3] = 2
    # 3D: target voxel spacing in mm per axis after reorientation (MONAI Spacingd: image bilinear, label
    # nearest); None keeps each volume's own spacing.
    spacing: tuple[Positive, Positive, Positive] | None = (1.5, 1.5, 1.5)
    # 3D: axis codes every volume is reoriented to (MONAI Orientationd)
    orientation: Annotated[str, AfterValidator(_orientation)] = "RAS"
    # 3D: training crop in voxels; a volume smaller than it after resampling is zero-padded to it (always: the
    # padding is undone with the rest of the preprocessing), so a crop never exceeds its volume.
    crop_size: tuple[Count, Count, Count] = (64, 64, 64)
    # (3D intensity follows `modality`: CT is clipped to ct_window and scaled to [0, 1]; MRI is z-scored over its
    # non-zero voxels per channel, MONAI NormalizeIntensityd(nonzero=True).)
    # 3D fine-tuning: share of crops centred on a foreground voxel (MONAI RandCropByPosNegLabeld), so small
    # structures are seen; the rest are centred on background.
    pos_neg_ratio: Share = 0.5

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError("ct_window must be (low, high) with low < high")
        return self


VIT_PRESETS: dict[str, dict[str, int]] = {
    # depth 12 throughout: MONAI UNETR taps layers 3, 6, 9 and 12.
    "tiny": {"hidden_size": 192, "mlp_dim": 768, "num_layers": 12, "num_heads": 3},
    "small": {"hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6},
    "base": {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
}


def _registered_backbone(name: str) -> str:
    # Imported here: the registry imports torch and the models, which import this module.
    from ahm.models.backbones import BACKBONES

    if name not in BACKBONES:
        raise ValueError(f"model backbone {name!r} is not known; choose {' or '.join(BACKBONES)}")
    return name


class ModelConfig(_Strict):
    """The backbone being pretrained and later fine-tuned."""

    # A registered backbone (ahm.models.backbones: "vit", "unet" and any added there), so a new one is selectable
    # from YAML without editing this file.
    backbone: Annotated[str, AfterValidator(_registered_backbone)] = "vit"
    preset: str = "tiny"  # a key of VIT_PRESETS, or "custom" to use the fields below as given
    patch_size: int = Field(16, ge=2)
    hidden_size: OptionalCount = None
    mlp_dim: OptionalCount = None
    num_layers: OptionalCount = None
    num_heads: OptionalCount = None
    decoder_dim: Count = 128
    decoder_depth: Count = 2
    decoder_heads: Count = 4
    decoder_mlp_dim: OptionalCount = None  # the decoder blocks' MLP width; None: 4 x decoder_dim
    norm_pix: bool = True
    # unet backbone (MONAI UNet)
    unet_channels: tuple[Count, ...] = (32, 64, 128, 256)
    unet_strides: tuple[Count, ...] = (2, 2, 2)
    unet_num_res_units: StepCount = 2
    # "unet": MONAI UNet; "basic-unet": MONAI BasicUNet, the classic U-Net of the AHM authors' reconstructor
    # (five unet_channels, strides 2,2,2,2; models/unet_nets.py). unet_dropout: per encoder level (basic-unet).
    unet_network: Literal["unet", "basic-unet"] = "unet"
    unet_dropout: tuple[OpenShare, ...] = ()
    # Normalisation of the convolution blocks (the UNet; UNETR's convolutional decoder). "batch" keeps the
    # absolute intensity that tells tissues apart in MRI/CT; "instance" (MONAI's default, and this project's
    # before the option existed) normalises every feature map per image and so cannot see it: on the brain
    # set it cost 0.08 validation Dice (docs/results.md).
    norm: Literal["batch", "instance"] = "batch"
    # nnunet backbone: the network nnU-Net builds from this plans file (nnUNet_preprocessed/DatasetNNN_X/
    # nnUNetPlans.json) for this configuration ("2d", "3d_fullres", ...); the plans also fix the data's patch
    # size, spacing and CT window (ahm.nnunet).
    plans: str | None = None
    configuration: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backbone == "nnunet" and not (self.plans and self.configuration):
            raise ValueError("the nnunet backbone needs model.plans and model.configuration (--plans, "
                             "--configuration)")
        if self.preset != "custom" and self.preset not in VIT_PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose one of {', '.join(VIT_PRESETS)} or custom")
        if len(self.unet_strides) != len(self.unet_channels) - 1:
            raise ValueError("unet_strides must have one entry fewer than unet_channels")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads {self.decoder_heads}")
        if len(self.unet_dropout) > len(self.unet_channels):
            raise ValueError("unet_dropout: at most one value per level, each in [0, 1)")
        return self

    def decoder_dims(self) -> dict[str, int]:
        """The MAE decoder's decoder_dim, decoder_depth, decoder_heads and decoder_mlp_dim (4 x dim unless set)."""
        return {"decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                "decoder_heads": self.decoder_heads, "decoder_mlp_dim": self.decoder_mlp_dim or 4 * self.decoder_dim}

    def vit_dims(self) -> dict[str, int]:
        """hidden_size, mlp_dim, num_layers, num_heads after applying the preset."""
        base = dict(VIT_PRESETS.get(self.preset, {}))
        for key in ("hidden_size", "mlp_dim", "num_layers", "num_heads"):
            value = getattr(self, key)
            if value is not None:
                base[key] = value
        missing = [k for k in ("hidden_size", "mlp_dim", "num_layers", "num_heads") if k not in base]
        if missing:
            raise AhmError(f"model preset 'custom' needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        if base["hidden_size"] % base["num_heads"]:
            raise AhmError("model: hidden_size must be divisible by num_heads")
        return base


class TrainConfig(_Strict):
    """Optimisation and run mechanics shared by pretraining and fine-tuning."""

    steps: OptionalCount = None
    epochs: OptionalCount = None
    batch_size: Count = 32
    lr: NonNegative = 1.5e-3
    min_lr: NonNegative = 1e-5
    weight_decay: NonNegative = 0.05
    warmup_steps: StepCount = 20
    clip_grad: NonNegative = 1.0
    seed: int = 0
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: Count = 1
    compile: bool = False
    checkpoint_every: Count = 100
    log_every: Count = 10
    augment: bool = True
    num_threads: OptionalCount = None
    nan_policy: Literal["stop", "skip"] = "stop"
    # DataLoader worker processes that read, preprocess and augment training samples (pretraining and
    # fine-tuning) ahead of the step (0: in the training process). None: half the CPU cores, at most 4. The
    # samples do not depend on it.
    workers: StepCount | None = None
    # CUDA kernels: TF32 matrix products (torch.set_float32_matmul_precision("high")) and cuDNN's autotuner for
    # the fixed input shapes of a run. No effect on the CPU.
    tf32: bool = True
    cudnn_benchmark: bool = True
    # Batch-norm statistics over every process's batch (SyncBatchNorm) under DDP. None: on with more than one
    # process on a GPU; PyTorch's SyncBatchNorm runs on GPUs only, so it is refused on the CPU.
    sync_batchnorm: bool | None = None


class SourceConfig(_Strict):
    """One source of a pretraining corpus: a dataset folder in any layout (or as listed in a corpus.json)."""

    path: str
    layout: str | None = None  # None: data.layout
    modality: Modality | None = None  # None: data.modality
    ct_window: tuple[float, float] | None = None  # None: data.ct_window
    # Relative sampling weight: each epoch draws weight x (the source's images), whole copies plus a seeded
    # subset for the fraction (2: every image twice an epoch; 0.5: half of them, a different half each epoch).
    weight: Positive = 1.0
    all_splits: bool | None = None  # a labelled source's val/test images too (None: the run's all_splits)
