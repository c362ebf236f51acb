"""Typed configuration: one source of truth for every option, loadable from and saved to YAML.

A run directory holds the resolved config of its run (`config.yaml`); CLI options override the YAML file,
which overrides these defaults.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ahm.errors import AhmError
from ahm.io import write_text


def _optional_at_least_one(v: Optional[int]) -> Optional[int]:
    if v is not None and v < 1:
        raise ValueError("must be at least 1")
    return v


def _at_least_zero(v: int) -> int:
    if v < 0:
        raise ValueError("must be 0 or more")
    return v


def _fraction(v: float) -> float:
    if not 0.0 < v <= 1.0:
        raise ValueError("must be in (0, 1]")
    return v


OptionalCount = Annotated[Optional[int], AfterValidator(_optional_at_least_one)]  # None, or 1 and more
Fraction = Annotated[float, AfterValidator(_fraction)]  # in (0, 1]
StepCount = Annotated[int, AfterValidator(_at_least_zero)]  # 0 and more


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images are and how they become tensors."""

    path: Optional[str] = None
    layout: str = "auto"  # auto | folder | msd | lgg | busi | isic | kvasir | img-anno
    image_size: int = 128
    channels: Optional[int] = None  # None: as stored (grayscale 1, RGB 3)
    modality: Literal["auto", "mri", "ct", "photo"] = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    slice_axis: int = 2  # axis along which 3D volumes are cut into 2D slices
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    skip_bad: bool = False
    max_pixels: int = 64_000_000  # refuse larger images before decoding them
    # 2: every volume is cut into 2D slices (along slice_axis), every image resized to image_size.
    # 3: volumes stay whole (layouts msd and folder; NIfTI, NRRD/MetaImage, DICOM); the options below apply.
    spatial_dims: Literal[2, 3] = 2
    # 3D: target voxel spacing in mm per axis after reorientation (MONAI Spacingd: image bilinear, label
    # nearest); None keeps each volume's own spacing.
    spacing: Optional[tuple[float, float, float]] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"  # 3D: axis codes every volume is reoriented to (MONAI Orientationd)
    # 3D: training crop in voxels; a volume smaller than it after resampling is zero-padded to it (always: the
    # padding is undone with the rest of the preprocessing), so a crop never exceeds its volume.
    crop_size: tuple[int, int, int] = (64, 64, 64)
    # (3D intensity follows `modality`: CT is clipped to ct_window and scaled to [0, 1]; MRI is z-scored over its
    # non-zero voxels per channel, MONAI NormalizeIntensityd(nonzero=True).)
    # 3D fine-tuning: share of crops centred on a foreground voxel (MONAI RandCropByPosNegLabeld), so small
    # structures are seen; the rest are centred on background.
    pos_neg_ratio: float = 0.5

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 16 or v > 4096:
            raise ValueError("image_size must be between 16 and 4096")
        return v

    @field_validator("val_fraction", "test_fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("slice_axis")
    @classmethod
    def _axis(cls, v: int) -> int:
        if v not in (0, 1, 2):
            raise ValueError("slice_axis must be 0, 1 or 2")
        return v

    @field_validator("channels", "max_pixels")
    @classmethod
    def _at_least_one(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: Optional[tuple[float, float, float]]) -> Optional[tuple[float, float, float]]:
        if v is not None and not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError("spacing must be three positive millimetre values, or null to keep each volume's")
        return v

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        code = v.upper()
        pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
        if len(code) != 3 or any(len(set(code) & pair) != 1 for pair in pairs):
            raise ValueError("orientation must be three axis codes, one of L/R, A/P, S/I each (e.g. RAS, LPS)")
        return code

    @field_validator("crop_size")
    @classmethod
    def _crop(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 1 for s in v):
            raise ValueError("crop_size must be three positive voxel counts")
        return v

    @field_validator("pos_neg_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("pos_neg_ratio must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> "DataConfig":
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError("ct_window must be (low, high) with low < high")
        return self


VIT_PRESETS: dict[str, dict[str, int]] = {
    # depth 12 throughout: MONAI UNETR taps layers 3, 6, 9 and 12.
    "tiny": {"hidden_size": 192, "mlp_dim": 768, "num_layers": 12, "num_heads": 3},
    "small": {"hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6},
    "base": {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
}


class ModelConfig(_Strict):
    """The backbone being pretrained and later fine-tuned."""

    # A registered backbone (ahm.models.backbones: "vit", "unet" and any added there), so a new one is selectable
    # from YAML without editing this file; checked by name before any work (train.pretrain.check_config).
    backbone: str = "vit"
    preset: str = "tiny"  # a key of VIT_PRESETS, or "custom" to use the fields below as given
    patch_size: int = 16
    hidden_size: Optional[int] = None
    mlp_dim: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: Optional[int] = None  # the decoder blocks' MLP width; None: 4 x decoder_dim
    norm_pix: bool = True
    # unet backbone (MONAI UNet)
    unet_channels: tuple[int, ...] = (32, 64, 128, 256)
    unet_strides: tuple[int, ...] = (2, 2, 2)
    unet_num_res_units: int = 2
    # "unet": MONAI UNet; "basic-unet": MONAI BasicUNet, the classic U-Net of the AHM authors' reconstructor
    # (five unet_channels, strides 2,2,2,2; models/unet_nets.py). unet_dropout: per encoder level (basic-unet).
    unet_network: Literal["unet", "basic-unet"] = "unet"
    unet_dropout: tuple[float, ...] = ()
    # Normalisation of the convolution blocks (the UNet; UNETR's convolutional decoder). "batch" keeps the
    # absolute intensity that tells tissues apart in MRI/CT; "instance" (MONAI's default, and this project's
    # before the option existed) normalises every feature map per image and so cannot see it: on the brain
    # set it cost 0.08 validation Dice (docs/results.md).
    norm: Literal["batch", "instance"] = "batch"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.preset != "custom" and self.preset not in VIT_PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose one of {', '.join(VIT_PRESETS)} or custom")
        if self.patch_size < 2:
            raise ValueError("patch_size must be at least 2")
        if len(self.unet_strides) != len(self.unet_channels) - 1:
            raise ValueError("unet_strides must have one entry fewer than unet_channels")
        sizes = {"hidden_size": self.hidden_size, "mlp_dim": self.mlp_dim, "num_layers": self.num_layers,
                 "num_heads": self.num_heads, "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                 "decoder_heads": self.decoder_heads, "decoder_mlp_dim": self.decoder_mlp_dim}
        for name, value in sizes.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads {self.decoder_heads}")
        if any(not 0.0 <= p < 1.0 for p in self.unet_dropout) or len(self.unet_dropout) > len(self.unet_channels):
            raise ValueError("unet_dropout: at most one value per level, each in [0, 1)")
        if min(self.unet_channels, default=1) < 1 or min(self.unet_strides, default=1) < 1 or self.unet_num_res_units < 0:
            raise ValueError("unet_channels and unet_strides must be at least 1, unet_num_res_units at least 0")
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


class MaskingConfig(_Strict):
    """Which patches get masked, and how learned policies learn."""

    policy: str = "random"  # random | block | hpm | adamae | ahm | ahm-official
    mask_ratio: float = 0.75
    mask_ratio_end: Optional[float] = None  # if set: linear rise from mask_ratio to this over training
    hard_fraction_max: float = 0.5  # easy-to-hard schedule end for hpm / ahm (alpha_max)
    hard_fraction_warmup: float = 0.0  # share of training before the hard fraction starts rising
    policy_lr: float = 1e-3
    ema_decay: float = 0.999  # hpm teacher
    # AHM agent: "transformer" (our design: patch embedding + transformer blocks) or "conv" (the authors' fully
    # convolutional actor-critic, masking/ahm/agent.py ConvAgent; agent_dim is its width, 64 in the paper)
    agent: Literal["transformer", "conv"] = "transformer"
    agent_dim: int = 64
    agent_depth: int = 1
    agent_heads: int = 4
    temperature: float = 1.0
    critic_coef: float = 0.5
    entropy_coef: float = 0.01
    critic_loss: Literal["mse", "pairwise"] = "mse"
    agent_workers: int = 0  # 0: synchronous A2C in-process; N>0: asynchronous A3C with N worker processes
    queue_size: int = 16
    # ahm-official: the authors' staged pipeline (docs/method.md). Stage lengths as shares of the run's steps:
    # reconstructor warm-up with random masks, then agent training against the frozen reconstructor; the rest is
    # masked image modeling with the frozen agent's top-k masks.
    official_recon_fraction: float = 0.4
    official_agent_fraction: float = 0.2
    official_agent_lr: float = 2e-4  # the authors' Adam
    official_lr_step: int = 25  # StepLR: the agent's lr times official_lr_gamma every this many agent steps
    official_lr_gamma: float = 0.9
    official_balance: float = 0.5  # weight of the "balance" term (squared predicted intensity) in the reward
    official_probe_every: int = 10  # steps between hardness probes (extra no-grad forwards with a random mask)
    # The published code's defects, each restorable (off by default; docs/method.md, "Defects"):
    reward_scope: Literal["image", "batch"] = "image"  # batch: each patch's reward summed over the whole batch
    reward_window: Optional[int] = None  # None: the patch; N: N-px windows at N-px pitch (the authors': 20 on 16)
    loss_patches: Literal["masked", "all"] = "masked"  # all: actor and critic terms over every patch, masked or not

    @field_validator("mask_ratio", "mask_ratio_end")
    @classmethod
    def _ratio(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("mask ratio must be strictly between 0 and 1")
        return v

    @field_validator("hard_fraction_max", "hard_fraction_warmup")
    @classmethod
    def _hard(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v

    @field_validator("agent_dim", "agent_depth", "agent_heads", "queue_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("policy_lr", "critic_coef", "entropy_coef")
    @classmethod
    def _nonneg(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a non-negative number")
        return v

    @field_validator("ema_decay")
    @classmethod
    def _ema(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        return v

    @field_validator("official_recon_fraction", "official_agent_fraction")
    @classmethod
    def _stage_share(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("official_agent_lr", "official_balance")
    @classmethod
    def _nonneg_official(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a non-negative number")
        return v

    @field_validator("official_lr_step", "official_probe_every")
    @classmethod
    def _positive_official(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("official_lr_gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("reward_window")
    @classmethod
    def _window(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("must be at least 1 (pixels)")
        return v

    @model_validator(mode="after")
    def _stages(self) -> "MaskingConfig":
        if self.official_recon_fraction + self.official_agent_fraction >= 1.0:
            raise ValueError("official_recon_fraction + official_agent_fraction must leave a share for the MIM stage")
        return self

    @field_validator("agent_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        import os

        limit = max(1, (os.cpu_count() or 1) * 4)
        if v < 0 or v > limit:
            raise ValueError(f"agent_workers must be between 0 and {limit} on this machine")
        return v


class TrainConfig(_Strict):
    """Optimisation and run mechanics shared by pretraining and fine-tuning."""

    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: StepCount = 20
    clip_grad: float = 1.0
    seed: int = 0
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    accelerator: str = "auto"
    devices: int = 1
    compile: bool = False
    checkpoint_every: int = 100
    log_every: int = 10
    augment: bool = True
    num_threads: OptionalCount = None
    nan_policy: Literal["stop", "skip"] = "stop"
    # DataLoader worker processes that read, preprocess and augment training samples (pretraining and
    # fine-tuning) ahead of the step (0: in the training process). None: half the CPU cores, at most 4. The
    # samples do not depend on it.
    workers: Optional[StepCount] = None
    # CUDA kernels: TF32 matrix products (torch.set_float32_matmul_precision("high")) and cuDNN's autotuner for
    # the fixed input shapes of a run. No effect on the CPU.
    tf32: bool = True
    cudnn_benchmark: bool = True
    # Batch-norm statistics over every process's batch (SyncBatchNorm) under DDP. None: on with more than one
    # process on a GPU; PyTorch's SyncBatchNorm runs on GPUs only, so it is refused on the CPU.
    sync_batchnorm: Optional[bool] = None

    @field_validator("batch_size", "checkpoint_every", "log_every", "devices")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("steps", "epochs")
    @classmethod
    def _pos_opt(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("lr", "min_lr", "weight_decay", "clip_grad")
    @classmethod
    def _nonneg(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a non-negative number")
        return v

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "gpu", "mps"):
            raise ValueError("accelerator must be auto, cpu, cuda, gpu or mps")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        allowed = {"32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"}
        if v not in allowed:
            raise ValueError(f"precision must be one of {', '.join(sorted(allowed))}")
        return v


class SourceConfig(_Strict):
    """One source of a pretraining corpus: a dataset folder in any layout (or as listed in a corpus.json)."""

    path: str
    layout: Optional[str] = None  # None: data.layout
    modality: Optional[Literal["auto", "mri", "ct", "photo"]] = None  # None: data.modality
    ct_window: Optional[tuple[float, float]] = None  # None: data.ct_window
    # Relative sampling weight: each epoch draws weight x (the source's images), whole copies plus a seeded
    # subset for the fraction (2: every image twice an epoch; 0.5: half of them, a different half each epoch).
    weight: float = 1.0
    all_splits: Optional[bool] = None  # a labelled source's val/test images too (None: the run's all_splits)

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError("weight must be a positive number")
        return v


def model_input_size(data: DataConfig) -> int | tuple[int, ...]:
    """What a model is built for: the square image side in 2D, the training crop in 3D (pretraining, fine-tuning
    and `ahm visualize` build it so)."""
    return tuple(int(v) for v in data.crop_size) if data.spatial_dims == 3 else data.image_size


class PretrainConfig(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    train: TrainConfig = TrainConfig(steps=400)
    # With an epoch budget (train.epochs, train.steps null): at least this many steps, so that a small corpus still
    # gets a minimum number of updates while a large one gets its epochs: a budget that grows with the corpus.
    min_steps: OptionalCount = None
    # The corpus: empty means the one dataset at data.path. Of an unlabelled source every image is pretraining
    # data; of a labelled one its training split, unless all_splits (then its val and test images too).
    sources: list[SourceConfig] = []
    all_splits: bool = False
    # Read the corpus into memory before training (yes), stream it from disk (no), or preload it when its
    # preprocessed size is at most 1 GiB (auto). The samples are the same either way.
    preload: Literal["auto", "yes", "no"] = "auto"
    # A folder for an on-disk store of preprocessed samples (memory-mapped; named by a digest of the corpus and the
    # preprocessing), so that later epochs, and later runs on the same corpus, skip decoding. None: no store.
    cache: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"image_size {self.data.image_size} is not divisible by patch_size {self.model.patch_size}"
            )
        return self


class FinetuneConfig(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(epochs=30, batch_size=8, lr=1e-3, weight_decay=1e-4, warmup_steps=20)
    init: Optional[str] = None  # pretraining run directory, or None for scratch
    # The frozen-encoder protocol (a probe of the representation): only the new layers train (UNETR's decoder; the
    # UNet's expanding path and head); the encoder's weights and normalisation statistics stay fixed (eval mode).
    # Its scratch arm is the same network with a randomly initialised frozen encoder (`init: random`).
    freeze_encoder: bool = False
    segmenter: str = "unetr"  # a registered backbone's segmenter ("unetr", "unet"); checked before any data is read
    labels_fraction: Fraction = 1.0
    # Label exactly this many training subjects instead of a fraction of them (None: use labels_fraction). For a
    # given seed the subjects drawn for n are among those drawn for any larger n, so a curve over n is nested.
    labels_subjects: OptionalCount = None
    # With an epoch budget (train.epochs): at least this many steps, so a small labelled subset still gets a
    # minimum number of updates while a large one gets its epochs: the budget grows with the labelled set.
    min_steps: OptionalCount = None
    layer_decay: float = 1.0  # layer-wise lr decay for a pretrained ViT encoder (1.0: off)
    encoder_lr_scale: float = 1.0  # lr multiplier on pretrained weights
    # Steps at the start in which only the new layers train (the pretrained weights wait at lr 0, then get their
    # own warm-up and cosine): linear probing, then fine-tuning (LP-FT). 0: off; no effect from scratch.
    head_warmup_steps: StepCount = 0
    num_classes: Optional[int] = None  # None: from the labels found in the data
    # Steps between validations (and the best-checkpoint choice). None: every epoch, but at most about 50
    # times per run, so a small labelled subset (an epoch of 2 steps) does not spend its time validating.
    val_every: OptionalCount = None
    # The validation figure that keeps the best checkpoint; neither can be won by predicting nothing:
    # dataset_dice (mean over foreground classes of the pooled 2 TP / (2 TP + FP + FN) over the split) or
    # case_dice (mean per-case Dice, cases where a class is absent from prediction and truth left out).
    select_by: Literal["dataset_dice", "case_dice"] = "dataset_dice"
    # Random crop without resampling, this share of each side (rounded down to what the UNet's strides divide;
    # UNETR's fixed grid gets it zero-padded back). It keeps every pixel's intensity and label exactly as they
    # are, which a resized crop does not (1: off).
    crop_fraction: Fraction = 0.75
    # Random resized crop (rescaled back to the grid) keeping at least this share of the area (1: off).
    min_crop_area: Fraction = 1.0
    # Random intensity scale/shift of the image (up to +- this fraction, half of the time each; 0: off).
    # Off by default: where a tissue boundary is an intensity threshold, jitter moves it and adds label noise.
    intensity_jitter: float = 0.0
    # Simulated acquisition changes on the image, half of the time each (0: off): a gamma drawn in
    # [1/(1+gamma), 1+gamma], and a smooth multiplicative bias field with coefficients in [-bias_field,
    # bias_field]. For sets whose scans differ in contrast and shading (e.g. brain-demo --shift); both keep
    # the order of intensities within an image, unlike jitter across a threshold.
    gamma: float = 0.0
    bias_field: float = 0.0
    rotate_deg: float = 0.0  # random in-plane rotation of up to +- this many degrees, half of the time (0: off)
    # 3D validation: share of each sliding window (the training crop) that overlaps the next, Gaussian-blended
    overlap: float = 0.5

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _one_label_budget(self) -> "FinetuneConfig":
        if self.labels_subjects is not None and self.labels_fraction < 1.0:
            raise ValueError("labels_fraction and labels_subjects: give one of them (labels_subjects replaces the "
                             "fraction)")
        return self

    @field_validator("rotate_deg")
    @classmethod
    def _rot(cls, v: float) -> float:
        if not 0.0 <= v <= 180.0:
            raise ValueError("must be in [0, 180]")
        return v

    @field_validator("intensity_jitter")
    @classmethod
    def _jitter(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not 0.0 <= v <= 4.0:
            raise ValueError("must be in [0, 4]")
        return v

    @field_validator("bias_field")
    @classmethod
    def _bias(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    where = f"{loc}: " if loc else ""
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {where}{msg}{more}"


def _deep_merge(base: dict[str, Any], override: dict[str, Any], keep_none: bool = False) -> dict[str, Any]:
    """Nested update. CLI overrides use None for "not given"; in a YAML file an explicit null is a value."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, keep_none)
        elif value is not None or keep_none:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AhmError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AhmError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise AhmError(f"{path}: a config file must hold a mapping of sections (data, model, ...)")
    return data


_SECTIONS = {"PretrainConfig": "pretrain", "FinetuneConfig": "finetune"}


def _section_for(kind: type[_Strict], loaded: dict[str, Any]) -> dict[str, Any]:
    """A preset file may hold both `pretrain:` and `finetune:` sections; the one for this kind."""
    section = _SECTIONS.get(kind.__name__)
    if section and (section in loaded or set(loaded) <= set(_SECTIONS.values())):
        return loaded.get(section) or {}
    return loaded


def file_section(kind: type[_Strict], path: str | Path) -> dict[str, Any]:
    """What a YAML file says for `kind`: its `pretrain:` or `finetune:` section when it has them, else all of it."""
    loaded = _section_for(kind, read_yaml(path))
    return loaded if isinstance(loaded, dict) else {}


def build_config(kind: type[_Strict], file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "options", nulls: bool = False, base: dict[str, Any] | None = None) -> Any:
    """Defaults <- base <- YAML file <- overrides (nested dict; None means "not given" unless `nulls`), validated.
    `base` holds defaults of this call's own (e.g. what a fine-tuning takes from its pretraining run); its None
    values are values (`spacing: null`), and the file and the overrides win over it."""
    merged: dict[str, Any] = kind().model_dump()
    if base:
        merged = _deep_merge(merged, base, keep_none=True)
    if file is not None:
        loaded = _section_for(kind, read_yaml(file))
        merged = _deep_merge(merged, loaded, keep_none=True)
        source = str(file)
    if overrides:
        merged = _deep_merge(merged, overrides, keep_none=nulls)
    try:
        return kind.model_validate(merged)
    except ValidationError as exc:
        if file is not None and _given(overrides, exc.errors()[0].get("loc", ())):
            source = "options"  # the bad value came from the command line, not from the file
        raise AhmError(_format_validation_error(exc, source)) from exc


def _given(overrides: dict[str, Any] | None, loc: tuple) -> bool:
    """Whether `overrides` sets the (non-None) value at the error location `loc`."""
    node: Any = overrides or {}
    for key in loc:
        if not isinstance(node, dict) or node.get(key) is None:
            return False
        node = node[key]
    return bool(loc)


def save_config(config: _Strict, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def load_config(kind: type[_Strict], path: str | Path) -> Any:
    """The config.yaml of an existing run. Runs written before `model.norm` existed used instance norm."""
    cfg = build_config(kind, file=path)
    model = getattr(cfg, "model", None)
    if isinstance(model, ModelConfig):
        saved = _section_for(kind, read_yaml(path))
        if "norm" not in (saved.get("model") or {}):
            model.norm = "instance"
    return cfg
