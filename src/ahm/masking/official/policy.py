"""ahm-official: the authors' three-stage AHM behind the one MaskingPolicy interface (see docs/method.md).

Stages, as shares of the run's steps (`official_recon_fraction`, `official_agent_fraction`, the rest):
1. "reconstructor": the MIM model trains with uniform random masks (the authors' stage-1 U-Net warm-up).
2. "agent": the MIM model is frozen (eval mode, no update: `Stage.trains_model` False). The convolutional agent
   (ConvAgent, 371,396 parameters at 1 channel) masks the K patches with the highest policy values (deterministic
   top-k), the frozen model reconstructs, each patch's reward is its reconstruction error plus the balance term
   (reward.py) and the agent takes one Adam step (lr `official_agent_lr`, StepLR every `official_lr_step` agent
   steps) on the one-step actor-critic loss. The agent has its own optimiser (`owns_optimizer`).
3. "mim": the MIM model trains again with the frozen agent's top-k masks (agent in eval mode).

Diagnostics, on the steps the loop logs in the agent and MIM stages: `critic_spearman` (Spearman of V and the
model's loss over the masked patches, per image), `background_share` (share of masked patches on flat background)
and, at most once per `official_probe_every` steps and at each stage's last step, `hardness_ratio`: the model's mean
masked-patch loss under the agent's masks over that under uniform random masks of the same K, on the same batch
(eval mode, no gradient; a deterministic top-k has no random masked patches to compare with inside one mask).

The agent and the probes run under the run's mixed precision (`PolicyContext.autocast`); the agent's output layers,
the top-k and the losses stay in float32.

Checkpoints hold the agent (state_dict) and, in `extra_state`, its optimiser and scheduler, the stage layout and
the patch grid: a resume with another layout (e.g. another --steps) or grid is refused with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking.ahm.agent import ConvAgent
from ahm.masking.ahm.policy import AgentCheckpointMismatch
from ahm.masking.base import (
    MaskingPolicy,
    PolicyContext,
    PolicyStep,
    Stage,
    masked_indices,
    random_scores,
    register,
    seeded_init,
    topk_mask,
)
from ahm.masking.diagnostics import background_share, masked_mean, mean_row_spearman
from ahm.masking.official.reward import official_agent_loss, official_reward, patch_reward_terms

RECONSTRUCTOR, AGENT, MIM = "reconstructor", "agent", "mim"


@dataclass
class _Draw:
    mask: Tensor  # bool [B, L] on the agent's device
    logits: Tensor  # [B, L]; with graph when the agent learns from this batch
    values: Tensor  # [B, L]
    learn: bool
    k: int
    returned: Tensor  # the mask as `propose` returned it (on the images' device)


def stage_layout(total_steps: int, recon_fraction: float, agent_fraction: float) -> list[Stage]:
    """The three stages over `total_steps`; AhmError if a stage with a non-zero share would get no step."""
    recon = int(round(recon_fraction * total_steps))
    agent = int(round(agent_fraction * total_steps))
    if total_steps - recon - agent < 1 or (recon_fraction > 0 and recon < 1) or (agent_fraction > 0 and agent < 1):
        raise AhmError(
            f"--steps {total_steps}: too few for ahm-official's stages ({recon} reconstructor, {agent} agent and "
            f"{total_steps - recon - agent} MIM steps; each stage needs one); give more steps or change "
            f"masking.official_recon_fraction / official_agent_fraction"
        )
    return [
        Stage(RECONSTRUCTOR, 0, recon, True),
        Stage(AGENT, recon, recon + agent, False),
        Stage(MIM, recon + agent, total_steps, True),
    ]


def _describe(layout: list[list[Any]]) -> str:
    return ", ".join(f"{name} {start}-{end}" for name, start, end in layout)


@register("ahm-official")
class OfficialAHMPolicy(MaskingPolicy):
    """The authors' staged pipeline: random-mask warm-up, agent against the frozen model, MIM with the agent's masks."""

    owns_optimizer = True

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.world_size > 1:
            raise AhmError("--devices: ahm-official trains its agent in a single process; use --devices 1")
        self._stages = stage_layout(ctx.total_steps, cfg.official_recon_fraction, cfg.official_agent_fraction)
        with seeded_init(ctx.seed):
            self.agent = ConvAgent(ctx.in_channels, ctx.grid.patch_size, ctx.grid.shape, width=cfg.agent_dim,
                                   value_head="bn-relu6")
        # on its device before the optimiser exists, so a resumed optimiser state lands there too
        self.agent.to(ctx.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.official_agent_lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.official_lr_step,
                                                         gamma=cfg.official_lr_gamma)
        self._draw: _Draw | None = None
        self._last_probe: int | None = None  # the step of the last hardness probe

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        return list(self._stages)

    def _step_of(self, progress: float) -> int:
        return int(round(progress * self.ctx.total_steps))

    @property
    def agent_device(self) -> torch.device:
        return next(self.agent.parameters()).device

    # ------------------------------------------------------------------ acting
    def propose(self, images: Tensor, progress: float) -> Tensor:
        stage = self.stage_at(self._step_of(progress))
        k = self.num_masked(progress)
        batch = images.shape[0]
        if stage.name == RECONSTRUCTOR:
            self._draw = None
            scores = random_scores(batch, self.num_patches, self.generator_for(images.device), images.device)
            return topk_mask(scores, k)
        learn = stage.name == AGENT and self.training
        self.agent.train(learn)  # the MIM stage uses the frozen agent in eval mode (its BN running statistics)
        with torch.set_grad_enabled(learn), self.ctx.autocast():
            logits, values = self.agent(images.detach().to(self.agent_device))
        # sigmoid is monotone: the top-k of the logits are the top-k of the policy map
        mask = topk_mask(logits.detach(), k)
        returned = mask.to(images.device)
        self._draw = _Draw(mask, logits, values, learn, k, returned)
        return returned

    @property
    def last_hard_indices(self) -> Tensor | None:
        """The agent-chosen patches [B, K] of the last propose (all masked ones: a top-k), None in the warm-up."""
        if self._draw is None:
            return None
        return self._draw.mask.to(torch.uint8).topk(self._draw.k, dim=1).indices

    @torch.no_grad()
    def agent_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The policy map sigmoid(z) and the value map, both [B, L] (agent in eval mode)."""
        was = self.agent.training
        self.agent.eval()
        try:
            logits, values = self.agent(images.detach().to(self.agent_device))
        finally:
            self.agent.train(was)
        return logits.sigmoid(), values

    # ---------------------------------------------------------------- learning
    def observe_output(self, images: Tensor, mask: Tensor, out: Any, progress: float) -> PolicyStep:
        step = self._step_of(progress)
        stage = self.stage_at(step)
        if stage.name == RECONSTRUCTOR:
            return PolicyStep()
        draw, self._draw = self._draw, None
        if draw is None:
            raise RuntimeError("OfficialAHMPolicy.observe_output() needs the propose() of the same batch first")
        device = draw.mask.device
        # the loop passes the very tensor `propose` returned, so it needs no comparison read from the device
        if mask is not draw.returned and (tuple(mask.shape) != tuple(draw.mask.shape)
                                          or not torch.equal(mask.to(device), draw.mask)):
            raise RuntimeError("OfficialAHMPolicy.observe_output() got a mask that its last propose() did not make")
        loss_map = out.per_patch_loss.detach().float().to(device)
        metrics: dict[str, float | Tensor] = self._diagnostics(images, draw, loss_map) if self.wants_metrics else {}
        if draw.learn:
            error, balance = patch_reward_terms(images, out.prediction, self.ctx.grid.shape, self.ctx.grid.patch_size,
                                                self.cfg.reward_window)
            reward = official_reward(error, balance, self.cfg.official_balance, self.cfg.reward_scope).to(device)
            # A non-finite reward must not reach the agent. It steps its own optimiser here, where no check of the
            # loop's reaches, so this reads the device once per agent-stage step.
            if bool(torch.isfinite(reward).all()):
                loss, parts = official_agent_loss(draw.logits, draw.values, reward, draw.mask, self.cfg.loss_patches)
                if self.wants_metrics:
                    metrics["agent_lr"] = float(self.optimizer.param_groups[0]["lr"])
                    metrics.update(parts)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
            else:
                metrics["agent_skipped"] = 1.0
        if self._probe_due(step, stage):
            metrics["hardness_ratio"] = self._hardness_ratio(images, mask, draw.k,
                                                             loss_map if stage.name == AGENT else None, step)
            self._last_probe = step
        return PolicyStep(metrics=self.report(metrics))

    def _probe_due(self, step: int, stage: Stage) -> bool:
        """Whether this step probes the hardness ratio (two extra forwards of the model): only a step whose metrics
        are wanted, the first such step past each multiple of `official_probe_every` and a stage's last step. With
        every step logged, that is every multiple and every stage's last step."""
        if self.ctx.model is None or not self.wants_metrics:
            return False
        every, last = self.cfg.official_probe_every, self._last_probe
        return last is None or step == stage.end - 1 or step // every > last // every

    def observe(self, images: Tensor, mask: Tensor, per_patch_loss: Tensor, progress: float) -> PolicyStep:
        raise RuntimeError("ahm-official learns from the model's prediction: call observe_output()")

    @torch.no_grad()
    def _diagnostics(self, images: Tensor, draw: _Draw, loss_map: Tensor) -> dict[str, float | Tensor]:
        idx = masked_indices(draw.mask, draw.k)
        return {
            "critic_spearman": mean_row_spearman(draw.values.gather(1, idx), loss_map.gather(1, idx)),
            "background_share": background_share(images, self.ctx.grid.patch_size, draw.mask),
            "policy_mean": draw.logits.detach().sigmoid().mean(),
        }

    @torch.no_grad()
    def _hardness_ratio(self, images: Tensor, mask: Tensor, k: int, agent_loss: Tensor | None, step: int) -> Tensor:
        """0-d; NaN where the random masks' mean loss is not positive."""
        model = self.ctx.model
        was = model.training
        model.eval()
        try:
            # its own stream, so probing never shifts the masks or data of the run
            gen = torch.Generator().manual_seed(7_368_787 + 1_000_003 * self.ctx.seed + step)
            rand = topk_mask(torch.rand(mask.shape, generator=gen), k).to(images.device)
            with self.ctx.autocast():  # the model's precision in the run, where the agent's losses come from
                if agent_loss is None:
                    agent_loss = model(images, mask.to(images.device)).per_patch_loss
                rand_loss = model(images, rand).per_patch_loss
        finally:
            model.train(was)
        base = masked_mean(rand_loss, rand)
        ratio = masked_mean(agent_loss.to(images.device), mask.to(images.device)) / base
        return torch.where(torch.isfinite(base) & (base > 0), ratio, float("nan"))

    # --------------------------------------------------------------- state
    def _layout(self) -> list[list[Any]]:
        return [[s.name, s.start, s.end] for s in self._stages]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        mine = self.state_dict()
        for key, value in mine.items():
            other = state_dict.get(key)
            if not isinstance(other, Tensor) or tuple(other.shape) != tuple(value.shape):
                got = list(other.shape) if isinstance(other, Tensor) else "missing"
                raise AgentCheckpointMismatch(
                    f"{key} is {got} in the checkpoint but {list(value.shape)} here; use the run's --agent-dim "
                    f"and the same number of image channels"
                )
        extra = [key for key in state_dict if key not in mine]
        if extra:
            raise AgentCheckpointMismatch(f"unexpected entry {extra[0]}: not an ahm-official agent")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["official"] = {
            "stages": self._layout(),
            "grid": list(self.ctx.grid.shape),
            "patch_size": self.agent.patch_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "last_probe": self._last_probe,
        }
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("official")
        if not isinstance(saved, dict):
            raise AhmError("--resume: the checkpoint holds no ahm-official agent state (written by another policy?)")
        grid, patch = list(saved.get("grid", [])), saved.get("patch_size")
        # one int (every 2D checkpoint) or one size per axis
        per_axis = [patch] * len(grid) if isinstance(patch, int) else list(patch or [])
        if grid != list(self.ctx.grid.shape) or per_axis != list(self.ctx.grid.patch_size):
            raise AhmError(
                f"--resume: the checkpoint's agent works on a {'x'.join(map(str, grid))} grid of {patch} px patches, "
                f"this run on {'x'.join(map(str, self.ctx.grid.shape))} of {self.agent.patch_size} px; resume with "
                f"the run's --image-size and --patch-size"
            )
        layout = [list(item) for item in saved.get("stages", [])]
        if layout != self._layout():
            total = layout[-1][2] if layout else "?"
            raise AhmError(
                f"--resume: the run's stages are {_describe(layout)} but these options give {_describe(self._layout())}; "
                f"resume with --steps {total} and the run's stage fractions"
            )
        super().load_extra_state(state)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self._last_probe = saved.get("last_probe")
