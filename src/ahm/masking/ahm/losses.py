"""The AHM agent's learning signal: normalised per-patch reward, advantage, actor/critic/entropy losses.

Shared by the synchronous policy (A2C, the loss is returned to the training loop) and the A3C worker
processes (each computes it on a transition with its local copy of the agent).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ahm.masking.ahm.sampling import plackett_luce_steps
from ahm.masking.base import masked_indices

REWARD_EPS = 1e-6


def normalised_reward(per_patch_loss: Tensor, mask: Tensor, eps: float = REWARD_EPS) -> Tensor:
    """r_i = (l_i - mean) / (std + eps) over each image's masked patches; 0 on visible patches. [B, L]"""
    weight = mask.to(per_patch_loss.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (per_patch_loss * weight).sum(dim=1, keepdim=True) / count
    var = ((per_patch_loss - mean).square() * weight).sum(dim=1, keepdim=True) / count
    return (per_patch_loss - mean) / (var.sqrt() + eps) * weight


def _standardise_masked(values: Tensor, mask: Tensor) -> Tensor:
    """Values on the reward scale: standardised over each image's masked patches (for the pairwise critic)."""
    weight = mask.to(values.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (values * weight).sum(dim=1, keepdim=True) / count
    var = ((values - mean).square() * weight).sum(dim=1, keepdim=True) / count
    return (values - mean) / (var.sqrt() + REWARD_EPS)


def pairwise_critic_loss(values: Tensor, per_patch_loss: Tensor, mask: Tensor, num_masked: int | None = None) -> Tensor:
    """HPM's relative objective: BCE(sigmoid(V_i - V_j), 1[l_i > l_j]) over ordered pairs of masked patches.
    `num_masked`: K, when the caller knows it (else it is read from the mask)."""
    idx = masked_indices(mask, num_masked)
    v = values.gather(1, idx)
    loss = per_patch_loss.gather(1, idx)
    diff = v.unsqueeze(2) - v.unsqueeze(1)
    target = (loss.unsqueeze(2) > loss.unsqueeze(1)).to(values.dtype)
    valid = (loss.unsqueeze(2) != loss.unsqueeze(1)).to(values.dtype)  # ties (and i == j) carry no order
    bce = F.binary_cross_entropy_with_logits(diff, target, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1.0)


def agent_loss(logits: Tensor, values: Tensor, mask: Tensor, hard_idx: Tensor, per_patch_loss: Tensor, *,
               temperature: float = 1.0, critic_coef: float = 0.5, entropy_coef: float = 0.01,
               critic_loss: str = "mse", num_masked: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Agent loss = actor + critic_coef * critic - entropy_coef * entropy, and its loss parts (detached).

    Each actor-chosen patch is one sub-action of the Plackett-Luce draw, rewarded with its normalised
    loss r_i. Its baseline is the critic's value of the state it was drawn in: the expected V over the
    pool it was drawn from, b_j = sum_m pi_j(m) V_m. (Subtracting the chosen patch's own V_i, an action
    value, would cancel the learning signal in expectation as soon as the critic is accurate.)
    Actor loss: -sum_j log pi_j * (r_{i_j} - b_j) averaged over the K_hard draws and the batch, so its
    scale does not grow with the mask ratio or the hard fraction. Critic: MSE(V_i, r_i) over all masked
    patches, actor-chosen and random (the random ones are unbiased data), or HPM's pairwise loss.
    `num_masked`: K, when the caller knows it (the pairwise loss would otherwise read it from the mask).
    """
    per_patch_loss = per_patch_loss.detach().to(values.dtype)
    reward = normalised_reward(per_patch_loss, mask)
    log_pi = (logits / temperature).log_softmax(dim=1)
    entropy = -(log_pi.exp() * log_pi).sum(dim=1).mean()

    if critic_loss == "pairwise":
        critic = pairwise_critic_loss(values, per_patch_loss, mask, num_masked)
        value_on_reward_scale = _standardise_masked(values.detach(), mask)
    else:
        weight = mask.to(values.dtype)
        critic = ((values - reward).square() * weight).sum() / weight.sum().clamp_min(1.0)
        value_on_reward_scale = values.detach()

    if hard_idx.shape[1] > 0:
        step_logp, pools = plackett_luce_steps(logits, hard_idx, temperature)
        baseline = (pools.detach() * value_on_reward_scale.unsqueeze(1)).sum(dim=-1)
        advantage = reward.gather(1, hard_idx) - baseline
        actor = -(step_logp * advantage.detach()).mean()
    else:
        actor = logits.sum() * 0.0  # keeps the graph uniform when the schedule has no hard patches yet

    loss = actor + critic_coef * critic - entropy_coef * entropy
    parts = {
        "agent_loss": loss.detach(),
        "actor_loss": actor.detach(),
        "critic_loss": critic.detach(),
    }
    return loss, parts
