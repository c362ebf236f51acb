"""Hard Patches Mining (Wang et al., CVPR 2023): mask the patches a loss predictor expects to be hardest.

An EMA teacher (a frozen copy of the MIM model, moved towards it after every step) embeds the full image;
a small MLP head on those features predicts each patch's reconstruction loss. The head is trained with
HPM's relative objective: for every pair of masked patches, BCE-with-logits(p_i - p_j, 1[l_i > l_j]),
so only the ranking of losses matters, not their scale. Of the K masked slots, the top round(alpha_t * K)
go to the predicted-hardest patches and the rest are uniform random among the others; alpha_t rises from
0 to `hard_fraction_max` over training (easy to hard).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking.base import (  # noqa: F401  (masked_indices: first defined here, still importable from here)
    MaskingPolicy,
    PolicyContext,
    PolicyStep,
    hard_fraction_at,
    masked_indices,
    random_scores,
    register,
    seeded_init,
    topk_mask,
)
from ahm.masking.diagnostics import hardness_ratio, mean_row_spearman


def pairwise_rank_loss(pred: Tensor, target: Tensor) -> Tensor:
    """HPM's relative loss over the patches of each row: mean over pairs with unequal targets of
    BCE-with-logits(pred_i - pred_j, 1[target_i > target_j]). `pred`, `target`: [B, K]. Zero if no pair counts."""
    diff = pred.unsqueeze(2) - pred.unsqueeze(1)
    t_i, t_j = target.unsqueeze(2), target.unsqueeze(1)
    label = (t_i > t_j).to(pred.dtype)
    valid = (t_i != t_j).to(pred.dtype)
    per_pair = F.binary_cross_entropy_with_logits(diff, label, reduction="none")
    # Each unordered pair is counted twice with identical terms, so this is also the mean over unordered pairs.
    return (per_pair * valid).sum() / valid.sum().clamp_min(1.0)


def _feature_dim(model: nn.Module, ctx: PolicyContext) -> int:
    """D of `model.features`: from one forward pass on a blank image (or volume) of the run's size."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = ctx.device
    blank = torch.zeros(1, ctx.in_channels, *ctx.grid.spatial_shape, device=device)
    with torch.no_grad():
        feats = model.features(blank)
    if feats.dim() != 3 or feats.shape[1] != ctx.num_patches:
        raise AhmError(
            f"--policy hpm: the model's features() returned shape {tuple(feats.shape)}, "
            f"expected [batch, {ctx.num_patches} patches, dim]"
        )
    return int(feats.shape[2])


@register("hpm")
class HPMMasking(MaskingPolicy):
    """Hard Patches Mining: EMA-teacher features -> loss predictor -> hard + random masks.

    Learned parameters: `predictor` only (trained through `aux_loss` by the loop's optimiser). The teacher
    is a frozen submodule: it is saved with the policy's state dict but never receives gradients.
    """

    def __init__(self, cfg: MaskingConfig, ctx: PolicyContext) -> None:
        super().__init__(cfg, ctx)
        model = ctx.model
        if model is None or not callable(getattr(model, "features", None)):
            raise AhmError("--policy hpm needs the MIM model (with a features() method) to build its EMA teacher")
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        dim = _feature_dim(self.teacher, ctx)
        with seeded_init(ctx.seed):
            self.predictor = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self._cache: dict | None = None

    def train(self, mode: bool = True) -> HPMMasking:
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target network, whatever mode the loop sets
        return self

    def teacher_features(self, images: Tensor) -> Tensor:
        """Teacher features of the full (unmasked) images, [B, L, D], without gradients, in the run's mixed precision
        as the student runs (the loss predictor takes them in float32)."""
        with torch.no_grad(), self.ctx.autocast():
            return self.teacher.features(images).detach()

    def _predict(self, feats: Tensor) -> Tensor:
        weight = self.predictor[1].weight
        return self.predictor(feats.to(device=weight.device, dtype=weight.dtype)).squeeze(-1)

    def predict_hardness(self, images: Tensor) -> Tensor:
        """Predicted reconstruction-loss score per patch, [B, L] (a ranking score: higher = harder)."""
        with torch.no_grad():
            return self._predict(self.teacher_features(images))

    def propose(self, images: Tensor, progress: float) -> Tensor:
        batch, length = images.shape[0], self.num_patches
        k = self.num_masked(progress)
        alpha = hard_fraction_at(self.cfg, progress)
        k_hard = min(k, round(alpha * k))
        feats = self.teacher_features(images)
        noise = random_scores(batch, length, self.generator_for(images.device), images.device)
        if k_hard > 0:
            with torch.no_grad():
                pred = self._predict(feats)
            hard = topk_mask(pred.to(images.device), k_hard)
        else:
            hard = torch.zeros(batch, length, dtype=torch.bool, device=images.device)
        # Noise lies in [0, 1), so lifting the hard patches above 1 keeps them and fills the rest at random.
        mask = topk_mask(noise + hard.to(noise.dtype) * 2.0, k)
        self._cache = {"images": images, "feats": feats, "hard": hard, "mask": mask, "alpha": alpha, "k": k,
                       "k_hard": k_hard}
        return mask

    def observe(self, images: Tensor, mask: Tensor, per_patch_loss: Tensor, progress: float) -> PolicyStep:
        cache, self._cache = self._cache, None
        if cache is not None and cache["images"] is images:
            feats = cache["feats"]
        else:
            feats = self.teacher_features(images)
        # the mask `propose` drew (the loop passes that very tensor, so no comparison is read): K and the hard
        # patches are known
        drawn = cache is not None and (mask is cache["mask"] or torch.equal(cache["mask"], mask))
        idx = masked_indices(mask, cache["k"] if drawn else None)
        pred = self._predict(feats)
        pred_masked = pred.gather(1, idx.to(pred.device))
        loss_masked = per_patch_loss.detach().to(pred.device, pred.dtype).gather(1, idx.to(pred.device))
        aux = pairwise_rank_loss(pred_masked, loss_masked)
        metrics: dict[str, float | Tensor] = {}
        if self.wants_metrics:
            metrics["hpm_pred_loss"] = aux.detach()
            metrics["hard_fraction"] = float(cache["alpha"] if cache is not None else hard_fraction_at(self.cfg, progress))
            metrics["critic_spearman"] = mean_row_spearman(pred_masked, loss_masked)
            if drawn and 0 < cache["k_hard"] < cache["k"]:  # both hard and random masked patches
                metrics["hardness_ratio"] = hardness_ratio(per_patch_loss.detach(), cache["hard"], mask)
        self.update_teacher()
        return PolicyStep(aux_loss=aux, metrics=self.report(metrics))

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- ema_decay * teacher + (1 - ema_decay) * student; buffers copied."""
        student = self.ctx.model
        weight = 1.0 - self.cfg.ema_decay
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.lerp_(s.detach().to(t.device, t.dtype), weight)
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s.detach().to(t.device))

