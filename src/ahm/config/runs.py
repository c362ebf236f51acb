"""The two run kinds' configs: pretraining and fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ahm.config.base import Fraction, OpenShare, OptionalCount, Share, StepCount, _Strict
from ahm.config.masking import AnyMaskingConfig, RandomMaskingConfig
from ahm.config.sections import DataConfig, ModelConfig, SourceConfig, TrainConfig

SCRATCH_INITS = ("", "none", "scratch", "random")  # `init` values that name no pretraining run


def is_scratch_init(init: str | None) -> bool:
    """True when `init` names no pretraining run: none, 'none', 'scratch' or 'random'."""
    return init is None or str(init).strip().lower() in SCRATCH_INITS


def _take_plans_data(cfg: PretrainConfig | FinetuneConfig) -> None:
    """The data settings the nnunet network's plans fix (`ahm.nnunet.data_update`), where the config leaves them
    unset."""
    from ahm.nnunet import data_update

    update = data_update(cfg.model.plans, cfg.model.configuration, cfg.data)
    if update:
        # set without re-validating the whole config (validate_assignment would run this check again)
        object.__setattr__(cfg, "data", cfg.data.model_copy(update=update))


class PretrainConfig(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    masking: AnyMaskingConfig = RandomMaskingConfig()
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
    cache: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.model.backbone == "nnunet":
            _take_plans_data(self)
        if self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"image_size {self.data.image_size} is not divisible by patch_size {self.model.patch_size}"
            )
        return self


class FinetuneConfig(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(epochs=30, batch_size=8, lr=1e-3, weight_decay=1e-4, warmup_steps=20)
    init: str | None = None  # pretraining run directory, or None for scratch
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
    num_classes: int | None = None  # None: from the labels found in the data
    # Steps between validations (and the best-checkpoint choice). None: every epoch, but at most about 50
    # times per run, so a small labelled subset (an epoch of 2 steps) does not spend its time validating.
    val_every: OptionalCount = None
    # Steps per epoch. None: one pass over the labelled images (2D). Set (the 3D default, 250 as nnU-Net): an
    # epoch is that many batches of crops drawn from the labelled volumes with replacement, so a few volumes make
    # a real epoch and whole-volume validation (once per epoch, and at the end) costs a bounded share of the run.
    iterations_per_epoch: OptionalCount = None
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
    intensity_jitter: OpenShare = 0.0
    # Simulated acquisition changes on the image, half of the time each (0: off): a gamma drawn in
    # [1/(1+gamma), 1+gamma], and a smooth multiplicative bias field with coefficients in [-bias_field,
    # bias_field]. For sets whose scans differ in contrast and shading (e.g. brain-demo --shift); both keep
    # the order of intensities within an image, unlike jitter across a threshold.
    gamma: float = Field(0.0, ge=0.0, le=4.0)
    bias_field: Share = 0.0
    rotate_deg: float = Field(0.0, ge=0.0, le=180.0)  # random in-plane rotation of up to +- this many degrees, half of the time (0: off)
    # 3D validation: share of each sliding window (the training crop) that overlaps the next, Gaussian-blended
    overlap: OpenShare = 0.5


    @model_validator(mode="after")
    def _one_label_budget(self) -> FinetuneConfig:
        if self.labels_subjects is not None and self.labels_fraction < 1.0:
            raise ValueError("labels_fraction and labels_subjects: give one of them (labels_subjects replaces the "
                             "fraction)")
        return self

    @model_validator(mode="after")
    def _nnunet_data(self) -> FinetuneConfig:
        # from scratch; from a pretraining run the model (plans included) comes later, with the run's data settings
        if (self.segmenter == "nnunet" and is_scratch_init(self.init) and self.model.plans
                and self.model.configuration):
            _take_plans_data(self)
        return self
