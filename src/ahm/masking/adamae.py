"""AdaMAE (Bandara et al., CVPR 2023): a small sampling network learns where to mask.

The sampler embeds the image's patches with its own strided convolution, adds a fixed 2D sine-cosine
position embedding, runs one transformer block and maps each token to a logit; p = softmax(logits).
K patches are drawn from p without replacement (Gumbel-top-k, with noise from the policy's generator so
runs are reproducible). It learns by REINFORCE without a baseline: aux_loss = -mean_{masked i} log p_i * l_i,
with l_i the detached reconstruction loss, which pushes probability towards patches that reconstruct badly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking.base import (
    MaskingPolicy,
    PolicyContext,
    PolicyStep,
    random_scores,
    register,
    seeded_init,
    topk_mask,
)


def sincos_position_embedding(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2D sine-cosine embedding [rows*cols, dim], row-major: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError("sin-cos position embedding needs a dim divisible by 4")
    rows, cols = grid
    quarter = dim // 4
    omega = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    parts = []
    for pos in (r.reshape(-1), c.reshape(-1)):
        angle = pos[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def gumbel_topk_mask(log_probs: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """bool [B, L]: k patches per row drawn without replacement from softmax(log_probs) (Gumbel-top-k)."""
    uniform = random_scores(log_probs.shape[0], log_probs.shape[1], generator, log_probs.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1.0 - 1e-7)))
    return topk_mask(log_probs.detach().float() + gumbel, k)


class PatchSampler(nn.Module):
    """Conv patch embedding + fixed position embedding + one transformer block + linear head -> [B, L] logits."""

    def __init__(self, in_channels: int, patch_size: int, grid: tuple[int, int], dim: int, heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_position_embedding(grid, dim).unsqueeze(0), persistent=False)
        self.block = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.embed(images.to(self.embed.weight.dtype))
        if tuple(tokens.shape[2:]) != self.grid:
            raise ValueError(f"images give a {tuple(tokens.shape[2:])} patch grid, the policy was built for {self.grid}")
        tokens = tokens.flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.block(tokens))).squeeze(-1)


@register("adamae")
class AdaMAEMasking(MaskingPolicy):
    """Adaptive masking with a learned token sampler, trained through `aux_loss` by the loop's optimiser."""

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__(cfg, ctx)
        dim, heads = cfg.agent_dim, cfg.agent_heads
        if dim % 4 or dim % heads:
            raise AhmError(f"--agent-dim {dim} must be divisible by 4 and by --agent-heads {heads} for adamae")
        with seeded_init(ctx.seed):
            self.sampler = PatchSampler(ctx.in_channels, ctx.patch_size, ctx.grid, dim, heads)

    def log_probs(self, images: Tensor) -> Tensor:
        """log p over the patches of each image, [B, L] (differentiable)."""
        return torch.log_softmax(self.sampler(images).float(), dim=1)

    def probabilities(self, images: Tensor) -> Tensor:
        """The sampling distribution p, [B, L], without gradients (for inspection and figures)."""
        with torch.no_grad():
            return self.log_probs(images).exp()

    def propose(self, images: Tensor, progress: float) -> Tensor:
        k = self.num_masked(progress)
        with torch.no_grad():
            log_p = self.log_probs(images)
        return gumbel_topk_mask(log_p, k, self.generator).to(images.device)

    def observe(self, images: Tensor, mask: Tensor, per_patch_loss: Tensor, progress: float) -> PolicyStep:
        # Recomputed with gradients rather than cached from `propose`, which may run under no_grad.
        log_p = self.log_probs(images)
        weight = mask.to(log_p.device, log_p.dtype)
        reward = per_patch_loss.detach().to(log_p.device, log_p.dtype)
        aux = -(log_p * reward * weight).sum() / weight.sum().clamp_min(1.0)
        with torch.no_grad():
            p = log_p.exp()
            entropy = -(p * log_p).sum(dim=1).mean()
            masked_prob = (p * weight).sum() / weight.sum().clamp_min(1.0)
        metrics = {
            "adamae_loss": float(aux.detach()),
            "policy_entropy": float(entropy),
            "mean_masked_prob": float(masked_prob),
        }
        return PolicyStep(aux_loss=aux, metrics=metrics)
