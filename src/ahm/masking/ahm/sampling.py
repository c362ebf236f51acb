"""Sampling k patches without replacement from softmax(z / tau), and the exact log-probability of the draw.

Gumbel-top-k: adding independent Gumbel(0, 1) noise to the scores z / tau and taking the k largest, in
decreasing order, yields an ordered sample without replacement from the Plackett-Luce distribution

    P(i_1, ..., i_k) = prod_j exp(z_{i_j} / tau) / sum_{m not in {i_1..i_{j-1}}} exp(z_m / tau),

so the draw costs one top-k and its log-probability is a sum of log-softmaxes over the shrinking pool.
"""

from __future__ import annotations

import torch
from torch import Tensor

# one Gumbel-top-k for every policy that samples patches (AdaMAE's sampler too); re-exported here for AHM's users
from ahm.masking.base import gumbel_noise, gumbel_topk

__all__ = ["gumbel_noise", "gumbel_topk", "plackett_luce_log_prob", "plackett_luce_steps"]


def plackett_luce_steps(logits: Tensor, idx: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-draw log-probabilities [B, k] of the ordered draw `idx`, and the draw distributions [B, k, L].

    Row j of the distributions is softmax(logits / temperature) restricted to the patches not drawn
    before step j (the pool the j-th draw came from); it carries gradient like the log-probabilities.
    """
    batch, length = logits.shape
    k = idx.shape[1]
    if k == 0:
        empty = logits.new_zeros(batch, 0)
        return empty, logits.new_zeros(batch, 0, length)
    scores = logits / temperature
    onehot = torch.nn.functional.one_hot(idx, length).to(torch.int32)  # [B, k, L]
    drawn_before = (onehot.cumsum(dim=1) - onehot).bool()
    pool = scores.unsqueeze(1).masked_fill(drawn_before, float("-inf"))
    log_dist = pool.log_softmax(dim=-1)
    step_logp = log_dist.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return step_logp, log_dist.exp()


def plackett_luce_log_prob(logits: Tensor, idx: Tensor, temperature: float = 1.0) -> Tensor:
    """log P(ordered draw `idx`) [B] under Plackett-Luce with scores logits / temperature."""
    return plackett_luce_steps(logits, idx, temperature)[0].sum(dim=1)
