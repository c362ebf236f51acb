"""AdaMAE (Bandara et al., CVPR 2023): a small sampling network learns where to mask.

The sampler embeds the image's (or volume's) patches with its own strided convolution, adds a fixed sine-cosine
position embedding over the patch grid, runs one transformer block and maps each token to a logit; p = softmax(logits).
K patches are drawn from p without replacement (Gumbel-top-k, with noise from the policy's generator so
runs are reproducible). It learns by REINFORCE without a baseline: aux_loss = -mean_{masked i} log p_i * l_i,
with l_i the detached reconstruction loss, which pushes probability towards patches that reconstruct badly.
"""

from __future__ import annotations

import torch
from monai.networks.layers import Conv
from torch import Tensor, nn

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.grid import PatchGrid, sincos_position_table
from ahm.masking.base import (
    MaskingPolicy,
    PolicyContext,
    PolicyStep,
    gumbel_noise,
    gumbel_topk,
    indices_mask,
    register,
    seeded_init,
)


def sincos_position_embedding(grid: tuple[int, ...], dim: int) -> Tensor:
    """Fixed sine-cosine embedding [prod(grid), dim], row-major over a 2D or 3D patch grid: each axis gets
    dim // (2 * axes) frequencies (sines, then cosines), axes in order; channels left over carry zeros.
    The models' table (`ahm.grid.sincos_position_table`) with the axes in grid order."""
    axes = len(grid)
    if dim < 2 * axes:
        raise ValueError(f"sin-cos position embedding needs a dim of at least {2 * axes} for a {axes}D grid")
    return sincos_position_table(PatchGrid.square(grid, 1), dim, axis_order=tuple(range(axes)))


def gumbel_topk_mask(log_probs: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """bool [B, L]: k patches per row drawn without replacement from softmax(log_probs) (Gumbel-top-k)."""
    noise = gumbel_noise(tuple(log_probs.shape), generator)
    return indices_mask(gumbel_topk(log_probs.float(), k, noise), log_probs.shape[1])


class PatchSampler(nn.Module):
    """Conv patch embedding + fixed position embedding + one transformer block + linear head -> [B, L] logits."""

    def __init__(self, in_channels: int, patch_size: int | tuple[int, ...], grid: tuple[int, ...], dim: int,
                 heads: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        conv = Conv[Conv.CONV, len(self.grid)]
        self.embed = conv(in_channels, dim, kernel_size=patch_size, stride=patch_size)
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
        # 2D keeps its rule (no channel without a position); in 3D the default 64 is no multiple of 6, so any
        # width of at least 6 goes and the leftover channels carry no position
        # stays here: the sampler's own positional-embedding rule, not a question of the data path
        multiple = 4 if ctx.spatial_dims == 2 else 1
        if dim % multiple or dim % heads or dim < 2 * ctx.spatial_dims:
            raise AhmError(f"--agent-dim {dim} must be divisible by {multiple} and by --agent-heads {heads} "
                           f"(and at least {2 * ctx.spatial_dims}) for adamae")
        with seeded_init(ctx.seed):
            self.sampler = PatchSampler(ctx.in_channels, ctx.grid.patch_size, ctx.grid.shape, dim, heads)

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
        return gumbel_topk_mask(log_p, k, self.generator_for(log_p.device)).to(images.device)

    def observe(self, images: Tensor, mask: Tensor, per_patch_loss: Tensor, progress: float) -> PolicyStep:
        # Recomputed with gradients rather than cached from `propose`, which may run under no_grad.
        log_p = self.log_probs(images)
        weight = mask.to(log_p.device, log_p.dtype)
        reward = per_patch_loss.detach().to(log_p.device, log_p.dtype)
        aux = -(log_p * reward * weight).sum() / weight.sum().clamp_min(1.0)
        if not self.wants_metrics:
            return PolicyStep(aux_loss=aux)
        with torch.no_grad():
            p = log_p.exp()
            entropy = -(p * log_p).sum(dim=1).mean()
            masked_prob = (p * weight).sum() / weight.sum().clamp_min(1.0)
        metrics = {"adamae_loss": aux.detach(), "policy_entropy": entropy, "mean_masked_prob": masked_prob}
        return PolicyStep(aux_loss=aux, metrics=self.report(metrics))
