"""AHM: adaptive hard masking by a reinforcement-learned actor-critic (see METHOD.md, "AHM as this project builds it").

Per batch, `propose` runs the light agent once: K = round(mask_ratio_t * L) patches are masked, of
which K_hard = round(alpha_t * K) are drawn by the actor (Gumbel-top-k from softmax(z / tau)) and the
rest uniformly at random among the others. `observe` turns the reconstruction losses into the agent's
learning signal (see `losses.agent_loss`):
- synchronous mode (A2C, `agent_workers == 0`): the agent loss is returned as `aux_loss`; the training
  loop backpropagates it with the model's loss and steps the agent with `policy_lr` (under DDP the
  loop all-reduces the agent's gradients like the model's). Exactly reproducible from the seed.
- asynchronous mode (A3C, `agent_workers = N`): the global agent lives in shared memory and trains
  itself (`owns_optimizer`); `observe` queues the transition for N worker processes (see `a3c.py`).

Checkpoints: the agent's weights are the policy's parameters (`state_dict`); the generator, and in
async mode the shared optimiser state and transition counters, are in `extra_state`. Loading a
checkpoint of another agent shape raises AhmError (one line naming the options to match).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking.ahm.agent import build_agent
from ahm.masking.ahm.losses import agent_loss, normalised_reward
from ahm.masking.ahm.sampling import gumbel_noise, gumbel_topk
from ahm.masking.base import (
    MaskingPolicy,
    PolicyContext,
    PolicyStep,
    hard_fraction_at,
    masked_indices,
    random_scores,
    register,
    topk_mask,
)
from ahm.masking.diagnostics import (
    BACKGROUND_STD,
    background_share,
    hardness_ratio,
    masked_mean,
    mean_row_spearman,
    patch_std,
    row_spearman,
)

# re-exported: the official policy and the tests import them from here
__all__ = ["AHMPolicy", "AgentCheckpointMismatch", "BACKGROUND_STD", "patch_std", "row_spearman"]


class AgentCheckpointMismatch(AhmError, RuntimeError):
    """A policy checkpoint written for another agent shape.

    Also a RuntimeError, like torch's own load_state_dict failures, so callers that add the checkpoint's
    path to those (the pretraining loop does) handle it the same way.
    """


@dataclass
class _Draw:
    """What `propose` computed, kept for the `observe` of the same batch."""

    mask: Tensor  # bool [B, L] on the agent's device
    hard_idx: Tensor  # long [B, K_hard], in draw order
    logits: Tensor  # [B, L] (with graph in synchronous training)
    values: Tensor  # [B, L]
    k: int
    k_hard: int
    returned: Tensor  # the mask as `propose` returned it (on the images' device)


@register("ahm")
class AHMPolicy(MaskingPolicy):
    """The AHM masking policy (actor-critic agent; A2C in-process or A3C with worker processes)."""

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.temperature <= 0:
            raise AhmError(f"--temperature must be positive, got {cfg.temperature}")
        self.asynchronous = cfg.agent_workers > 0
        self.owns_optimizer = self.asynchronous
        if self.asynchronous and ctx.world_size > 1:
            raise AhmError(
                "--agent-workers: asynchronous A3C workers cannot be combined with multi-process (DDP) training; "
                "use --agent-workers 0 (synchronous A2C, the agent's gradients are all-reduced)"
            )
        # seeded from the run seed only, so every DDP rank starts from the same agent
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            if cfg.agent == "conv":
                # the authors' network with an unbounded value: this variant's rewards are standardised
                self.agent = build_agent("conv", in_channels=ctx.in_channels, patch_size=ctx.patch_size,
                                         grid=ctx.grid.shape, width=cfg.agent_dim, value_head="linear")
            else:
                self.agent = build_agent("transformer", in_channels=ctx.in_channels, patch_size=ctx.patch_size,
                                         grid=ctx.grid.shape, dim=cfg.agent_dim, depth=cfg.agent_depth,
                                         heads=cfg.agent_heads)
        self._draw: _Draw | None = None
        self._workers: Any = None
        if self.asynchronous:
            from ahm.masking.ahm.a3c import A3CWorkers

            self.agent.share_memory()
            self._workers = A3CWorkers(self.agent, cfg.agent_workers, cfg.queue_size, cfg.policy_lr,
                                       self._loss_kwargs(), seed=ctx.seed)
        else:
            self.agent.to(ctx.device)

    def _loss_kwargs(self) -> dict[str, Any]:
        return {
            "temperature": self.cfg.temperature,
            "critic_coef": self.cfg.critic_coef,
            "entropy_coef": self.cfg.entropy_coef,
            "critic_loss": self.cfg.critic_loss,
        }

    def _apply(self, fn: Callable, recurse: bool = True) -> AHMPolicy:
        # the A3C global agent must stay in CPU shared memory where the workers see it
        if not self.asynchronous:
            return super()._apply(fn, recurse)
        agent = self._modules.pop("agent")
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["agent"] = agent
        return self

    @property
    def agent_device(self) -> torch.device:
        return next(self.agent.parameters()).device

    @property
    def workers(self) -> Any:
        """The A3C worker pool (None in synchronous mode)."""
        return self._workers

    # ------------------------------------------------------------------ acting
    def hard_count(self, progress: float) -> tuple[int, int]:
        """(K, K_hard) at this point of training."""
        k = self.num_masked(progress)
        return k, round(hard_fraction_at(self.cfg, progress) * k)

    def propose(self, images: Tensor, progress: float) -> Tensor:
        if self._workers is not None:
            self._workers.check()
        batch = images.shape[0]
        length = self.num_patches
        k, k_hard = self.hard_count(progress)
        device = self.agent_device
        learn_here = self.training and not self.asynchronous
        with torch.set_grad_enabled(learn_here):
            logits, values = self.agent(images.detach().to(device))
        # both draws always happen so the generator's stream does not depend on the schedule
        generator = self.generator_for(device)
        noise = gumbel_noise((batch, length), generator)
        uniform = random_scores(batch, length, generator, device)
        hard_idx = gumbel_topk(logits, k_hard, noise, self.cfg.temperature)
        # actor-chosen patches outrank every uniform score, so the top K are them plus random others
        mask = topk_mask(uniform.scatter(1, hard_idx, 2.0), k)
        returned = mask.to(images.device)
        self._draw = _Draw(mask, hard_idx, logits, values, k, k_hard, returned)
        return returned

    @property
    def last_hard_indices(self) -> Tensor | None:
        """The actor-chosen patches [B, K_hard] of the last `propose` (draw order), until its `observe`."""
        return None if self._draw is None else self._draw.hard_idx

    @torch.no_grad()
    def agent_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The actor's draw probabilities softmax(z / tau) and the critic's predicted loss, both [B, L]."""
        logits, values = self.agent(images.detach().to(self.agent_device))
        return (logits / self.cfg.temperature).softmax(dim=1), values

    # ---------------------------------------------------------------- learning
    def observe(self, images: Tensor, mask: Tensor, per_patch_loss: Tensor, progress: float) -> PolicyStep:
        draw, self._draw = self._draw, None
        if draw is None:
            raise RuntimeError("AHMPolicy.observe() needs the propose() of the same batch first")
        device = draw.mask.device
        # the loop passes the very tensor `propose` returned, so it needs no comparison read from the device
        if mask is not draw.returned and (tuple(mask.shape) != tuple(draw.mask.shape)
                                          or not torch.equal(mask.to(device), draw.mask)):
            raise RuntimeError("AHMPolicy.observe() got a mask that its last propose() did not draw")
        loss = per_patch_loss.detach().to(device=device, dtype=torch.float32)
        # A non-finite loss must not reach the agent. Driven by the loop (`host_reads` off), the policy does not read
        # the device to find out: the step's loss is then not finite either, and the loop's own check stops the run
        # or skips the batch, the agent's update with it.
        finite = not self.host_reads or bool(torch.isfinite(loss[draw.mask]).all())
        metrics: dict[str, float | Tensor] = {}
        if self.wants_metrics:
            metrics["hard_fraction"] = draw.k_hard / draw.k
            if finite:
                metrics.update(self._diagnostics(images, draw, loss))
        if not finite:
            metrics["agent_skipped"] = 1.0
        step = PolicyStep()
        if self.asynchronous:
            if finite and self.training:
                transition = {
                    # half precision halves the shared memory a queued batch holds; the agent standardises anyway
                    "images": images.detach().to("cpu", torch.float16, copy=True),
                    # copies: queueing moves a tensor's storage to shared memory, and these may be the loop's own
                    "mask": draw.mask.to("cpu", copy=True),
                    "hard_idx": draw.hard_idx.to("cpu", copy=True),
                    "loss": loss.to("cpu", copy=True),
                    "progress": float(progress),
                }
                # checked on the host copy, which the queue needs anyway
                if bool(torch.isfinite(transition["loss"][transition["mask"]]).all()):
                    self._workers.push(transition)
            if self.wants_metrics:
                metrics.update(self._workers.collect())
                metrics["transitions_dropped"] = float(self._workers.dropped)
        else:
            if self.wants_metrics:
                metrics["transitions_dropped"] = 0.0
            if finite and self.training and draw.logits.requires_grad:
                total, parts = agent_loss(draw.logits, draw.values, draw.mask, draw.hard_idx, loss,
                                          num_masked=draw.k, **self._loss_kwargs())
                step.aux_loss = total
                if self.wants_metrics:
                    metrics.update(parts)
        step.metrics = self.report(metrics)
        return step

    @torch.no_grad()
    def _diagnostics(self, images: Tensor, draw: _Draw, loss: Tensor) -> dict[str, Tensor]:
        mask = draw.mask
        hard = torch.zeros_like(mask).scatter_(1, draw.hard_idx, True)
        out: dict[str, Tensor] = {}
        if 0 < draw.k_hard < draw.k:  # both actor-chosen and random masked patches
            out["hardness_ratio"] = hardness_ratio(loss, hard, mask)
        reward = normalised_reward(loss, mask)
        out["mean_reward"] = masked_mean(reward, hard if draw.k_hard > 0 else mask)
        idx = masked_indices(mask, draw.k)
        out["critic_spearman"] = mean_row_spearman(draw.values.gather(1, idx), loss.gather(1, idx))
        log_pi = (draw.logits.detach() / self.cfg.temperature).log_softmax(dim=1)
        out["policy_entropy"] = -(log_pi.exp() * log_pi).sum(dim=1).mean()
        patch = self.ctx.grid.patch_size
        out["background_share"] = background_share(images, patch, mask)
        if draw.k_hard > 0:
            out["background_share_actor"] = background_share(images, patch, hard)
        return out

    def flush(self, timeout: float = 60.0) -> None:
        """Async mode: wait until the workers applied every queued transition (no-op in sync mode)."""
        if self._workers is not None:
            self._workers.flush(timeout)

    # --------------------------------------------------------------- state
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore the agent; a checkpoint of another agent shape raises AhmError naming the options to match."""
        problem = self._state_mismatch(state_dict)
        if problem is not None:
            raise AgentCheckpointMismatch(
                f"{problem}; use the run's --agent, --agent-dim/-depth/-heads, --patch-size, --image-size"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _state_mismatch(self, state_dict: Mapping[str, Any]) -> str | None:
        mine = self.state_dict()
        missing = [key for key in mine if key not in state_dict]
        if missing:
            return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        for key, value in mine.items():
            other = state_dict[key]
            if not isinstance(other, Tensor) or tuple(other.shape) != tuple(value.shape):
                shape = list(other.shape) if isinstance(other, Tensor) else type(other).__name__
                return f"{key} is {shape} in the checkpoint but {list(value.shape)} here"
        extra = [key for key in state_dict if key not in mine]
        if extra:
            return f"unexpected entry {extra[0]}"
        return None

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self._workers is not None:
            state["a3c"] = self._workers.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self._workers is not None and "a3c" in state:
            self._workers.load_state_dict(state["a3c"])

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
