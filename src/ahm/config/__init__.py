"""Typed configuration: one source of truth for every option, loadable from and saved to YAML.

A run directory holds the resolved config of its run (`config.yaml`); CLI options override the YAML file,
which overrides these defaults.
"""

from ahm.config.base import Count, Fraction, NonNegative, OpenShare, OptionalCount, Positive, Share, StepCount
from ahm.config.files import build_config, file_section, load_config, read_yaml, save_config
from ahm.config.masking import (
    POLICY_CONFIGS,
    AdaMAEMaskingConfig,
    AHMMaskingConfig,
    AnyMaskingConfig,
    BlockMaskingConfig,
    HPMMaskingConfig,
    MaskingConfig,
    OfficialMaskingConfig,
    RandomMaskingConfig,
    masking_config,
)
from ahm.config.runs import FinetuneConfig, PretrainConfig
from ahm.config.sections import (
    VIT_PRESETS,
    DataConfig,
    ModelConfig,
    SourceConfig,
    TrainConfig,
)

__all__ = [
    "POLICY_CONFIGS",
    "VIT_PRESETS",
    "AHMMaskingConfig",
    "AdaMAEMaskingConfig",
    "AnyMaskingConfig",
    "BlockMaskingConfig",
    "Count",
    "DataConfig",
    "FinetuneConfig",
    "Fraction",
    "HPMMaskingConfig",
    "MaskingConfig",
    "ModelConfig",
    "NonNegative",
    "OfficialMaskingConfig",
    "OpenShare",
    "OptionalCount",
    "Positive",
    "PretrainConfig",
    "RandomMaskingConfig",
    "Share",
    "SourceConfig",
    "StepCount",
    "TrainConfig",
    "build_config",
    "file_section",
    "load_config",
    "masking_config",
    "read_yaml",
    "save_config",
]
