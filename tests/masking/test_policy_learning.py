"""HPM's loss predictor and AdaMAE's sampler learn where the hard patches are.

Synthetic task: 64x64 single-channel images (16x16 patches, a 4x4 grid) with a bright textured 2x2-patch
square on a flat background, placed anywhere on the patch grid (so a policy must read the content, not
memorise a position); the per-patch "reconstruction loss" is high on the textured patches and low
elsewhere, plus noise, and (as the model reports it) zero on visible patches. Only the policy's own
parameters are optimised (Adam), exactly through the `aux_loss` the loop would add.
"""

from __future__ import annotations

import pytest
import torch
from masking_helpers import make_policy, tiny_model

from ahm.masking.base import iter_policy_params
from ahm.masking.hpm import masked_indices, pairwise_rank_loss

GRID = (4, 4)
PATCH = 16


def synthetic_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and the per-patch hardness map [B, L] (1 on the textured square, 0.1 elsewhere, plus noise)."""
    images = torch.full((batch, 1, 64, 64), 0.2)
    hardness = torch.full((batch, *GRID), 0.1)
    corners = torch.randint(0, GRID[0] - 1, (batch, 2), generator=generator)
    for b, (r, c) in enumerate(corners.tolist()):
        texture = 0.6 + 0.4 * torch.rand(1, 2 * PATCH, 2 * PATCH, generator=generator)
        images[b, :, r * PATCH:(r + 2) * PATCH, c * PATCH:(c + 2) * PATCH] = texture
        hardness[b, r:r + 2, c:c + 2] = 1.0
    hardness = hardness.view(batch, -1) + 0.05 * torch.rand(batch, GRID[0] * GRID[1], generator=generator)
    return images, hardness


def train_policy(policy, steps: int, progress: float, seed: int = 0, lr: float = 3e-3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(list(iter_policy_params(policy)), lr=lr)
    logs = []
    for _ in range(steps):
        images, hardness = synthetic_batch(8, g)
        mask = policy.propose(images, progress)
        step = policy.observe(images, mask, hardness * mask, progress)
        opt.zero_grad()
        step.aux_loss.backward()
        opt.step()
        logs.append(step.metrics)
    return logs


def _mean(logs: list[dict], key: str) -> float:
    values = [m[key] for m in logs if key in m]
    return sum(values) / len(values)


def _eval_set(seed: int = 123):
    """A fixed held-out batch with fixed uniform-random masks, so losses before/after are comparable;
    also returns where the textured patches are."""
    g = torch.Generator().manual_seed(seed)
    images, hardness = synthetic_batch(16, g)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask.scatter_(1, torch.rand(16, 16, generator=g).topk(12, dim=1).indices, True)
    return images, hardness * mask, mask, hardness > 0.5


def hpm_eval_loss(policy) -> float:
    images, loss, mask, _ = _eval_set()
    idx = masked_indices(mask)
    pred = policy.predict_hardness(images)
    return float(pairwise_rank_loss(pred.gather(1, idx), loss.gather(1, idx)))


def adamae_eval_loss(policy) -> float:
    images, loss, mask, _ = _eval_set()
    with torch.no_grad():
        log_p = policy.log_probs(images)
    return float(-(log_p * loss * mask).sum() / mask.sum())


@pytest.mark.parametrize("backbone", ["standin", "vit", "unet"])
def test_hpm_predictor_learns_to_find_the_hard_patches(backbone):
    model = tiny_model(backbone, 64, PATCH)
    policy = make_policy("hpm", grid=GRID, patch_size=PATCH, model=model, ema_decay=0.99)
    before = hpm_eval_loss(policy)
    early = train_policy(policy, 5, progress=1.0)
    logs = train_policy(policy, 40, progress=1.0, seed=1)
    after = hpm_eval_loss(policy)
    assert after < 0.8 * before
    late = logs[-10:]
    assert _mean(late, "hpm_pred_loss") < _mean(early, "hpm_pred_loss")
    assert _mean(late, "hardness_ratio") > 1.5
    assert _mean(late, "critic_spearman") > 0.3
    assert all(m["hard_fraction"] == pytest.approx(0.5) for m in logs)


def test_adamae_sampler_learns_to_favour_the_hard_patches():
    policy = make_policy("adamae", grid=GRID, patch_size=PATCH, agent_dim=32, agent_heads=4)
    images, _, _, textured = _eval_set()
    before = adamae_eval_loss(policy)
    mass_before = float((policy.probabilities(images) * textured).sum(1).mean())
    logs = train_policy(policy, 40, progress=0.0, lr=3e-3)
    after = adamae_eval_loss(policy)
    probs = policy.probabilities(images)
    assert after < before
    assert float(probs[textured].mean()) > 2.0 * float(probs[~textured].mean())
    assert float((probs * textured).sum(1).mean()) > mass_before + 0.2
    assert logs[-1]["policy_entropy"] < logs[0]["policy_entropy"]
