"""Masking settings: what every policy shares (`MaskingConfig`) and one model per policy with its own settings,
told apart by `policy`.

    masking: {policy: hpm, mask_ratio: 0.75, ema_decay: 0.99}    # YAML: a flat mapping, as before
    MaskingConfig(policy="hpm", ema_decay=0.99)                  # -> HPMMaskingConfig

A setting of another policy is checked against that policy's range and then dropped: run directories written
before the split hold every policy's settings, and one YAML file serves grids that vary `policy` (`ahm bench`).
A name no policy knows is refused.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from ahm.config.base import Count, NonNegative, OpenShare, Share, _Strict, constraint_phrase


def _mask_ratio(v: float) -> float:
    if not 0.0 < v < 1.0:
        raise ValueError("mask ratio must be strictly between 0 and 1")
    return v


MaskRatio = Annotated[float, AfterValidator(_mask_ratio)]
# Asynchronous agent workers are processes: a few per core at most.
MAX_AGENT_WORKERS = max(1, (os.cpu_count() or 1) * 4)


class MaskingConfig(_Strict):
    """Which patches get masked: the settings of every policy. Called directly it builds the model of the
    policy named by `policy` (default random)."""

    policy: str = "random"  # random | block | hpm | adamae | ahm | ahm-official
    # The module whose import registers the policy (`ahm.masking.base.register`): policies are imported on first
    # use, so the CLI and the config load without torch. Each model in POLICY_CONFIGS names its own.
    policy_module: ClassVar[str] = ""
    mask_ratio: MaskRatio = 0.75
    mask_ratio_end: MaskRatio | None = None  # if set: linear rise from mask_ratio to this over training
    # AHM's asynchronous A3C worker processes (0: synchronous, in-process). Every policy carries it: the loop
    # refuses workers on a GPU or under DDP before it builds any policy, and tools set it on whichever they run.
    agent_workers: int = Field(0, ge=0, le=MAX_AGENT_WORKERS)

    def __new__(cls, *args: Any, **data: Any) -> MaskingConfig:
        if cls is MaskingConfig:
            return masking_config(data)
        return super().__new__(cls)

    @model_validator(mode="before")
    @classmethod
    def _settings_of_other_policies(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        foreign = [key for key in data if key not in cls.model_fields and key in _owners()]
        for key in foreign:
            _check_foreign(key, data[key])
        return {k: v for k, v in data.items() if k not in foreign}

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> MaskingConfig:
        """A copy; with another `policy` in `update`, the model of that policy (settings it lacks dropped)."""
        if update and update.get("policy", self.policy) != self.policy:
            return masking_config({**self.model_dump(), **update})
        return super().model_copy(update=update, deep=deep)


class _HardSchedule(MaskingConfig):
    hard_fraction_max: Share = 0.5  # easy-to-hard schedule end for hpm / ahm (alpha_max)
    hard_fraction_warmup: Share = 0.0  # share of training before the hard fraction starts rising


class _Learned(MaskingConfig):
    policy_lr: NonNegative = 1e-3  # the policy's parameters, in the model's optimiser (or the agent's own)


class RandomMaskingConfig(MaskingConfig):
    policy: Literal["random"] = "random"
    policy_module: ClassVar[str] = "ahm.masking.random"


class BlockMaskingConfig(MaskingConfig):
    policy: Literal["block"] = "block"
    policy_module: ClassVar[str] = "ahm.masking.block"


class HPMMaskingConfig(_Learned, _HardSchedule):
    policy: Literal["hpm"] = "hpm"
    policy_module: ClassVar[str] = "ahm.masking.hpm"
    ema_decay: OpenShare = 0.999  # the teacher


class AdaMAEMaskingConfig(_Learned):
    policy: Literal["adamae"] = "adamae"
    policy_module: ClassVar[str] = "ahm.masking.adamae"
    agent_dim: Count = 64
    agent_heads: Count = 4


class AHMMaskingConfig(_Learned, _HardSchedule):
    policy: Literal["ahm"] = "ahm"
    policy_module: ClassVar[str] = "ahm.masking.ahm"
    # "transformer" (our design: patch embedding + transformer blocks) or "conv" (the authors' fully convolutional
    # actor-critic, masking/ahm/agent.py ConvAgent; agent_dim is its width, 64 in the paper)
    agent: Literal["transformer", "conv"] = "transformer"
    agent_dim: Count = 64
    agent_depth: Count = 1
    agent_heads: Count = 4
    temperature: float = 1.0
    critic_coef: NonNegative = 0.5
    entropy_coef: NonNegative = 0.01
    critic_loss: Literal["mse", "pairwise"] = "mse"
    queue_size: Count = 16


class OfficialMaskingConfig(MaskingConfig):
    """ahm-official: the authors' staged pipeline (docs/method.md)."""

    policy: Literal["ahm-official"] = "ahm-official"
    policy_module: ClassVar[str] = "ahm.masking.official"
    agent_dim: Count = 64  # the authors' conv agent's width
    # Stage lengths as shares of the run's steps: reconstructor warm-up with random masks, then agent training
    # against the frozen reconstructor; the rest is masked image modeling with the frozen agent's top-k masks.
    official_recon_fraction: OpenShare = 0.4
    official_agent_fraction: OpenShare = 0.2
    official_agent_lr: NonNegative = 2e-4  # the authors' Adam
    official_lr_step: Count = 25  # StepLR: the agent's lr times official_lr_gamma every this many agent steps
    official_lr_gamma: float = Field(0.9, gt=0.0, le=1.0)
    official_balance: NonNegative = 0.5  # weight of the "balance" term (squared predicted intensity) in the reward
    official_probe_every: Count = 10  # steps between hardness probes (extra no-grad forwards with a random mask)
    # The published code's defects, each restorable (off by default; docs/method.md, "Defects"):
    reward_scope: Literal["image", "batch"] = "image"  # batch: each patch's reward summed over the whole batch
    reward_window: Count | None = None  # None: the patch; N: N-px windows at N-px pitch (the authors': 20 on 16)
    loss_patches: Literal["masked", "all"] = "masked"  # all: actor and critic terms over every patch, masked or not

    @model_validator(mode="after")
    def _stages(self) -> OfficialMaskingConfig:
        if self.official_recon_fraction + self.official_agent_fraction >= 1.0:
            raise ValueError("official_recon_fraction + official_agent_fraction must leave a share for the MIM stage")
        return self


POLICY_CONFIGS: dict[str, type[MaskingConfig]] = {
    "random": RandomMaskingConfig,
    "block": BlockMaskingConfig,
    "hpm": HPMMaskingConfig,
    "adamae": AdaMAEMaskingConfig,
    "ahm": AHMMaskingConfig,
    "ahm-official": OfficialMaskingConfig,
}


def _policy_of(value: Any) -> str | None:
    return value.get("policy", "random") if isinstance(value, dict) else getattr(value, "policy", None)


AnyMaskingConfig = Annotated[
    # built from the registry at import: `X | Y` cannot take a generated tuple
    Union[tuple(Annotated[model, Tag(name)] for name, model in POLICY_CONFIGS.items())],  # type: ignore[misc]  # noqa: UP007
    Discriminator(_policy_of),
]
_ADAPTER: TypeAdapter = TypeAdapter(AnyMaskingConfig)


def masking_config(data: dict[str, Any]) -> MaskingConfig:
    """The model of `data["policy"]` (default random) validated from `data`; pydantic's ValidationError if not."""
    return _ADAPTER.validate_python(data)


@cache
def _owners() -> dict[str, TypeAdapter]:
    """{setting: a validator of its value} for every policy's own settings."""
    common = set(MaskingConfig.model_fields)
    found: dict[str, TypeAdapter] = {}
    for model in POLICY_CONFIGS.values():
        for name, info in model.model_fields.items():
            if name not in common and name not in found:
                found[name] = TypeAdapter(Annotated[info.annotation, info])
    return found


def _check_foreign(key: str, value: Any) -> None:
    try:
        _owners()[key].validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        phrase = constraint_phrase(err) or err.get("msg", "invalid value").removeprefix("Value error, ")
        raise ValueError(f"{key} {phrase}") from None
