"""MAE masking: K patches per image chosen uniformly at random."""

from __future__ import annotations

from torch import Tensor

from ahm.masking.base import MaskingPolicy, random_scores, register, topk_mask


@register("random")
class RandomMasking(MaskingPolicy):
    """Uniform random masking (He et al., MAE): the top-K of fresh uniform noise per image."""

    def propose(self, images: Tensor, progress: float) -> Tensor:
        k = self.num_masked(progress)
        scores = random_scores(images.shape[0], self.num_patches, self.generator, images.device)
        return topk_mask(scores, k)
