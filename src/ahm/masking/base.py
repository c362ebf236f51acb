"""The masking-policy interface and the schedules every policy shares.

The pretraining loop never branches on a policy's name:

    mask = policy.propose(images, progress)                 # bool [B, L], exactly K True per row
    out  = model(images, mask)                              # MIMOutput: loss, per_patch_loss [B, L], prediction
    step = policy.observe(images, mask, out.per_patch_loss.detach(), progress)
    loss = out.loss + step.aux_loss (if any)                # one backward, one optimiser (policy params included)

`progress` is the fraction of training done, in [0, 1]; K is `policy.num_masked(progress)`, so the loop hands it to
the model (`num_masked=`) rather than reading it back from the mask.

The loop reads nothing from the device on a step it does not log: a host read waits for all queued device work.
Before each step it sets two attributes every policy honours (`forward_step`):
- `wants_metrics`: whether this step is logged. Diagnostics (hardness ratio, critic Spearman, background share,
  entropy, ...) are computed only then.
- `host_reads` False: `observe` returns its metrics as tensors, which the loop reads all at once per log, and
  leaves a non-finite loss to the loop's own check rather than reading it. A policy used alone (tests, notebooks)
  keeps the defaults: metrics every step, as floats.
Noise for masks is drawn on the images' device (`generator_for`), from the policy's own seeded stream.

Staged policies (ahm-official) split the run into stages (`stages()`): the loop asks `stage_at(step)` each step
whether the MIM model's weights train in it (`trains_model`; if not, the model runs in eval mode without
gradient and no model update happens) and restarts its learning-rate schedule at each stage's first step. The
loop hands the whole MIMOutput to `observe_output` (by default: `observe` on its per-patch loss), for policies
whose reward needs the prediction itself. Single-stage policies need none of this.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ahm.config import POLICY_CONFIGS, MaskingConfig
from ahm.errors import AhmError
from ahm.grid import PatchGrid
from ahm.masking.diagnostics import row_spearman


@dataclass(kw_only=True)
class PolicyContext:
    """What a policy learns about the run when it is built.

    `grid` is the run's `PatchGrid` (2D or 3D), the MIM model's `patch_grid` (the training loop, `ahm visualize`
    and `bench speed` pass it so). `grid=(rows, cols[, ...])` with `patch_size=p` is still accepted (tests and
    older callers) and turned into the PatchGrid here, so every policy sees one type.
    Afterwards `patch_size` is the grid's patch size: one int when it is the same along every axis, else a tuple.
    """

    grid: PatchGrid
    in_channels: int
    total_steps: int
    patch_size: int | tuple[int, ...] | None = None  # input only with a tuple `grid`; derived otherwise
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model: nn.Module | None = None  # the MIM model (unwrapped), for policies that need its features (HPM)
    world_size: int = 1
    rank: int = 0
    # the run's mixed-precision context (Fabric's `autocast`), for the networks a policy runs besides the model
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext

    def __post_init__(self) -> None:
        given = self.patch_size
        if not isinstance(self.grid, PatchGrid):
            if given is None:
                raise ValueError("PolicyContext: a grid given as patches per axis needs patch_size")
            patches = tuple(int(g) for g in self.grid)
            per_axis = (int(given),) * len(patches) if isinstance(given, int) else tuple(int(p) for p in given)
            self.grid = PatchGrid(tuple(g * p for g, p in zip(patches, per_axis)), per_axis)
        sizes = self.grid.patch_size
        if given is not None and ((int(given),) * len(sizes) if isinstance(given, int) else tuple(given)) != sizes:
            raise ValueError(f"PolicyContext: patch_size {given} disagrees with the grid's {sizes}")
        self.patch_size = sizes[0] if len(set(sizes)) == 1 else sizes

    @property
    def num_patches(self) -> int:
        return self.grid.num_patches

    @property
    def spatial_dims(self) -> int:
        return self.grid.spatial_dims


@dataclass
class PolicyStep:
    """What `observe` returns: an optional loss the loop adds to the reconstruction loss, and metrics to log
    (floats, or 0-d tensors when the policy's `host_reads` is off)."""

    aux_loss: Tensor | None = None
    metrics: dict[str, float | Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A span of training steps [start, end) with one role; `trains_model` False: the MIM model is frozen."""

    name: str
    start: int
    end: int
    trains_model: bool = True

    @property
    def steps(self) -> int:
        return self.end - self.start


def num_masked(ratio: float, num_patches: int) -> int:
    """K = round(ratio * L), kept in [1, L-1] so both the visible and the masked sets are non-empty."""
    return int(min(max(round(ratio * num_patches), 1), num_patches - 1))


def mask_ratio_at(cfg: MaskingConfig, progress: float) -> float:
    """Fixed ratio, or a linear rise from `mask_ratio` to `mask_ratio_end` over training."""
    if cfg.mask_ratio_end is None:
        return cfg.mask_ratio
    p = min(max(progress, 0.0), 1.0)
    return cfg.mask_ratio + (cfg.mask_ratio_end - cfg.mask_ratio) * p


def hard_fraction_at(cfg: MaskingConfig, progress: float) -> float:
    """Easy-to-hard schedule (HPM): 0 until `hard_fraction_warmup`, then linear to `hard_fraction_max` at the end."""
    p = min(max(progress, 0.0), 1.0)
    start = cfg.hard_fraction_warmup
    if p <= start:
        return 0.0
    return cfg.hard_fraction_max * min(1.0, (p - start) / max(1e-8, 1.0 - start))


def _device_of(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def random_scores(batch: int, num_patches: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform noise for random top-k selection, reproducible from `generator`: drawn on the generator's device
    (a policy's `generator_for(device)` lives on `device`), then moved to `device` if it is elsewhere."""
    return torch.rand(batch, num_patches, generator=generator, device=_device_of(generator)).to(device)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """bool [B, L] with True at the k highest scores of each row."""
    idx = scores.topk(k, dim=1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise, drawn from `generator` on its device (CPU without one)."""
    u = torch.rand(shape, generator=generator, device=_device_of(generator))
    # the clamp keeps -log(-log(u)) finite at the float edges
    u = u.clamp_(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
    return -torch.log(-torch.log(u))


def gumbel_topk(logits: Tensor, k: int, noise: Tensor, temperature: float = 1.0) -> Tensor:
    """Indices [B, k] of an ordered draw without replacement from softmax(logits / temperature) (Gumbel-top-k).

    `noise` is Gumbel noise of the shape of `logits` (see `gumbel_noise`); column j is the j-th draw.
    """
    if k == 0:
        return torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)
    scores = logits.detach() / temperature + noise.to(logits.device)
    return scores.topk(k, dim=1, sorted=True).indices


def masked_indices(mask: Tensor, k: int | None = None) -> Tensor:
    """[B, K] indices of the True entries of a bool [B, L] mask with the same K in every row, ascending (the order
    of `mask[row]`'s True entries). `k`: K when the caller knows it; else it is read from the mask and checked."""
    if k is None:
        counts = mask.sum(dim=1)
        k = int(counts[0])
        if not bool((counts == k).all()):
            raise ValueError(f"mask rows must all hold the same number of masked patches, got {counts.tolist()}")
    return mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]


def indices_mask(indices: Tensor, num_patches: int) -> Tensor:
    """bool [B, L] with True at `indices` [B, k]."""
    mask = torch.zeros(indices.shape[0], num_patches, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


class MaskingPolicy(nn.Module):
    """Base class: a policy is an nn.Module (so its networks move, save and all-reduce like the model's).

    Subclasses implement `propose`; learned ones also `observe`. Parameters of the module are added to the
    loop's optimiser (param group with `policy_lr`, no weight decay) unless the policy trains itself
    (`owns_optimizer = True`, as A3C does). Extra state beyond parameters/buffers (RNG, counters, a private
    optimiser) goes through `extra_state()` / `load_extra_state()`.
    """

    name: str = "base"
    owns_optimizer: bool = False
    # set by the pretraining loop before each step (see the module docstring); these defaults serve a policy used alone
    wants_metrics: bool = True
    host_reads: bool = True

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self._seed = 10_007 * (ctx.seed + 1) + ctx.rank
        self.generator = torch.Generator().manual_seed(self._seed)
        self._device_generator: torch.Generator | None = None
        self._device_generator_state: Tensor | None = None  # from a checkpoint, until the generator exists

    @property
    def num_patches(self) -> int:
        return self.ctx.num_patches

    def num_masked(self, progress: float) -> int:
        """K: the patches every row of `propose(images, progress)` masks."""
        return num_masked(mask_ratio_at(self.cfg, progress), self.num_patches)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The policy's random stream on `device`, so noise is drawn where the images are, not copied there each
        step. On the CPU it is `generator` itself, so CPU runs draw what they always drew; on an accelerator a
        generator seeded alike (another algorithm, so other masks than on the CPU, as reproducible)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.generator
        if self._device_generator is None or self._device_generator.device != device:
            self._device_generator = torch.Generator(device=device).manual_seed(self._seed)
            if self._device_generator_state is not None:
                self._device_generator.set_state(self._device_generator_state)
                self._device_generator_state = None
        return self._device_generator

    def report(self, metrics: dict[str, float | Tensor]) -> dict[str, float | Tensor]:
        """`observe`'s metrics as its caller takes them: untouched (tensors included) for the loop, which reads
        them itself (`host_reads` off); else as floats, leaving out the undefined (non-finite) ones."""
        if not self.host_reads:
            return metrics
        values = {key: float(value) for key, value in metrics.items()}
        return {key: value for key, value in values.items() if math.isfinite(value)}

    def propose(self, images: Tensor, progress: float) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def observe(self, images: Tensor, mask: Tensor, per_patch_loss: Tensor, progress: float) -> PolicyStep:
        return PolicyStep()

    def observe_output(self, images: Tensor, mask: Tensor, out: Any, progress: float) -> PolicyStep:
        """What the loop calls after the model's forward (`out` a MIMOutput); by default `observe` on its loss."""
        return self.observe(images, mask, out.per_patch_loss.detach().float(), progress)

    def stages(self) -> list[Stage]:
        """The run's stages in order; one that trains the model throughout unless the policy is staged."""
        return [Stage("mim", 0, self.ctx.total_steps, True)]

    def stage_at(self, step: int) -> Stage:
        """The stage holding step `step` (0-based); the last one past the end."""
        stages = self.stages()
        for stage in stages:
            if stage.start <= step < stage.end:
                return stage
        return stages[-1]

    @property
    def agent_parameters(self) -> int:
        """Parameters the policy learns (its agent, sampler or predictor); 0 for fixed rules such as random."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_state(self) -> dict[str, Any]:
        state = {"generator": self.generator.get_state()}
        if self._device_generator is not None:
            state["device_generator"] = self._device_generator.get_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if "device_generator" in state:
            if self._device_generator is not None:
                self._device_generator.set_state(state["device_generator"])
            else:
                self._device_generator_state = state["device_generator"]

    def close(self) -> None:
        """Release processes or other resources (A3C workers). Safe to call twice."""


_REGISTRY: dict[str, Callable[[MaskingConfig, PolicyContext], MaskingPolicy]] = {}


def register(name: str) -> Callable[[type[MaskingPolicy]], type[MaskingPolicy]]:
    def deco(cls: type[MaskingPolicy]) -> type[MaskingPolicy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def policy_names() -> list[str]:
    return list(POLICY_CONFIGS)


def build_policy(cfg: MaskingConfig, ctx: PolicyContext) -> MaskingPolicy:
    """Build the policy named by `cfg.policy`; an unknown name is a user error naming the choices."""
    name = cfg.policy
    if name not in POLICY_CONFIGS:
        raise AhmError(f"--policy: unknown masking policy {name!r}; choose one of {', '.join(POLICY_CONFIGS)}")
    if name not in _REGISTRY:
        import importlib

        importlib.import_module(POLICY_CONFIGS[name].policy_module)  # its @register fills _REGISTRY
    return _REGISTRY[name](cfg, ctx)


def check_mask(mask: Tensor, k: int) -> None:
    counts = mask.sum(dim=1)
    if not bool((counts == k).all()):
        raise AssertionError(f"policy produced {counts.tolist()} masked patches, expected {k} per image")


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by order), as a float; nan if undefined."""
    return float(row_spearman(a.reshape(1, -1), b.reshape(1, -1))[0])


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build a policy's networks under this seed without touching the global RNG. Seed by `ctx.seed` only, not
    the rank: under DDP every rank must start from the same weights, since only gradients are all-reduced."""
    with torch.random.fork_rng(devices=[]):
        # CPU generator only: networks are initialised on CPU, and accelerator RNG state stays untouched.
        torch.default_generator.manual_seed(7_919 * (seed + 1))
        yield


def iter_policy_params(policy: MaskingPolicy) -> Iterable[nn.Parameter]:
    return (p for p in policy.parameters() if p.requires_grad)
