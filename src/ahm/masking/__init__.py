"""Masking policies: which patches a masked-image-modeling step hides. One file per policy."""

from ahm.masking.base import (
    MaskingPolicy,
    PolicyContext,
    PolicyStep,
    build_policy,
    hard_fraction_at,
    mask_ratio_at,
    num_masked,
    policy_names,
    register,
)

__all__ = [
    "MaskingPolicy",
    "PolicyContext",
    "PolicyStep",
    "build_policy",
    "hard_fraction_at",
    "mask_ratio_at",
    "num_masked",
    "policy_names",
    "register",
]
