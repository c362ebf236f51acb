"""ahm-official: the authors' convolutional agent, top-k masks, the per-image reward (and each restorable defect),
and learning on the planted toy."""

from __future__ import annotations

import pytest
import torch
from ahm_toy import GRID, PATCH, SIZE, planted_batch

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking import PolicyContext, build_policy
from ahm.masking.ahm.agent import ConvAgent, conv_agent_levels
from ahm.masking.official.reward import official_agent_loss, official_reward, patch_reward_terms
from ahm.models.mae import MIMOutput, patchify


def test_paper_agent_size_and_maps() -> None:
    agent = ConvAgent(1, 16, (20, 20))
    assert sum(p.numel() for p in agent.parameters()) == 371_396
    logits, values = agent(torch.rand(2, 1, 320, 320))
    assert logits.shape == values.shape == (2, 400)
    assert bool((values >= 0).all() and (values <= 6).all())  # BN + ReLU6 value head
    # other powers of two: log2(patch) stride-2 levels, one map cell per patch, any grid shape
    assert conv_agent_levels(8) == 3 and conv_agent_levels(32) == 5
    assert ConvAgent(3, 8, (4, 6))(torch.rand(1, 3, 32, 48))[0].shape == (1, 24)


def test_non_power_of_two_patch_is_refused_in_one_line() -> None:
    with pytest.raises(AhmError, match="power of two") as err:
        ConvAgent(1, 12, (10, 10))
    assert "\n" not in str(err.value)


def _policy(total: int = 10, **masking) -> object:
    cfg = MaskingConfig(policy="ahm-official", official_recon_fraction=0.2, official_agent_fraction=0.3, **masking)
    return build_policy(cfg, PolicyContext(grid=(4, 4), patch_size=16, in_channels=1, total_steps=total, seed=0))


def test_masks_are_exactly_k_and_the_top_k_of_the_policy_map() -> None:
    policy = _policy(mask_ratio=0.75)
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert [s.name for s in policy.stages()] == ["reconstructor", "agent", "mim"]
    for step in (3, 8):  # agent stage (agent in train mode) and MIM stage (frozen agent, eval mode)
        mask = policy.propose(images, step / 10)
        assert mask.sum(dim=1).tolist() == [12, 12, 12]
        policy_map = torch.sigmoid(policy._draw.logits.detach())
        kth = policy_map.topk(12, dim=1).values[:, -1:]
        assert bool((policy_map[mask].view(3, 12) >= kth).all())
        assert bool((policy_map[~mask].view(3, 4) <= kth).all())
    probs, _ = policy.agent_maps(images)  # eval-mode maps: exactly what the MIM stage masks by
    assert torch.equal(policy.propose(images, 0.8), torch.zeros_like(mask).scatter(1, probs.topk(12, 1).indices, True))


def test_reconstructor_stage_masks_at_random() -> None:
    policy = _policy()
    images = torch.rand(4, 1, 64, 64)
    a, b = policy.propose(images, 0.0), policy.propose(images, 0.1)
    assert a.sum(1).tolist() == [12] * 4 and not torch.equal(a, b)


def _terms(images, prediction, **kw):
    return patch_reward_terms(images, prediction, (20, 20), 16, **kw)


def test_reward_of_an_image_ignores_the_rest_of_its_batch_unless_scope_batch() -> None:
    g = torch.Generator().manual_seed(1)
    images, prediction = torch.rand(4, 1, 320, 320, generator=g), torch.rand(4, 1, 320, 320, generator=g)
    other_images, other_pred = images.clone(), prediction.clone()
    other_images[1:] = torch.rand(3, 1, 320, 320, generator=g)  # permute / replace every other image of the batch
    other_pred[1:] = other_pred[1:].flip(0)
    for scope, same in (("image", True), ("batch", False)):
        first = official_reward(*_terms(images, prediction), 0.5, scope)
        second = official_reward(*_terms(other_images, other_pred), 0.5, scope)
        assert torch.allclose(first[0], second[0]) is same
    perm = torch.tensor([2, 0, 3, 1])
    per_image = official_reward(*_terms(images, prediction), 0.5, "image")
    assert torch.allclose(official_reward(*_terms(images[perm], prediction[perm]), 0.5, "image"), per_image[perm])
    batch = official_reward(*_terms(images, prediction), 0.5, "batch")
    assert torch.allclose(batch[0], batch[3])  # the published defect: one reward map for the whole batch


def test_reward_is_patch_aligned_and_the_misaligned_window_restores_the_published_one() -> None:
    images = torch.zeros(1, 1, 320, 320)
    prediction = torch.zeros(1, 1, 320, 320)
    prediction[0, 0, 16:32, 0:16] = 1.0  # all the error in patch (1, 0)
    error, balance = _terms(images, prediction)
    assert error.view(20, 20)[1, 0] == pytest.approx(255 / 400 * 256)
    assert float(error.sum()) == pytest.approx(float(error.view(20, 20)[1, 0]))
    assert torch.equal(error, balance)  # against a zero image both terms are the squared prediction
    bad, _ = _terms(images, prediction, window=20)
    grid = bad.view(20, 20)
    assert float(grid[0, 0]) > 0 and float(grid[1, 0]) > 0  # the error spread over misaligned 20 px windows
    full = torch.ones(1, 1, 320, 320)
    edge, _ = _terms(torch.zeros_like(full), full, window=20)
    edge = edge.view(20, 20)
    assert bool((edge[16:] == 0).all() and (edge[:, 16:] == 0).all()) and bool((edge[:16, :16] > 0).all())


def test_loss_uses_log_p_of_masked_patches_unless_all() -> None:
    logits = torch.zeros(2, 16, requires_grad=True)
    values = torch.zeros(2, 16, requires_grad=True)
    reward = torch.ones(2, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    for patches, visible_grad in (("masked", False), ("all", True)):
        logits.grad = None
        loss, parts = official_agent_loss(logits, values, reward, mask, patches)
        loss.backward()
        assert bool((logits.grad[mask] != 0).all())
        assert bool((logits.grad[~mask] != 0).any()) is visible_grad
    # -log(0.5) * (1 - 0) + 0.5 * (0 - 1)^2 / 2
    assert float(parts["agent_loss"]) == pytest.approx(0.693147 + 0.25, rel=1e-5)


class BackgroundReconstructor(torch.nn.Module):
    """A frozen reconstructor that only knows the toy's flat background: it fills every masked patch with 0.2."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> MIMOutput:
        b = images.shape[0]
        g = GRID[0]
        pixel = mask.view(b, 1, g, 1, g, 1).expand(b, 1, g, PATCH, g, PATCH).reshape(b, 1, SIZE, SIZE)
        prediction = torch.where(pixel, torch.full_like(images, 0.2), images)
        error = patchify((prediction - images).square(), PATCH).mean(-1) * mask
        return MIMOutput(loss=error[mask].mean(), per_patch_loss=error, prediction=prediction)


def test_official_agent_learns_the_planted_hard_patches() -> None:
    model = BackgroundReconstructor()
    cfg = MaskingConfig(policy="ahm-official", mask_ratio=0.25, official_recon_fraction=0.0,
                        official_agent_fraction=0.5, official_agent_lr=1e-3, official_probe_every=1, agent_dim=32)
    policy = build_policy(cfg, PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=60, seed=0,
                                             model=model))
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(25):
        images, _ = planted_batch(gen, 6)
        mask = policy.propose(images, step / 60)
        with torch.no_grad():
            out = model(images, mask)
        history.append(policy.observe_output(images, mask, out, step / 60).metrics)
    late = history[-8:]
    assert history[0]["hardness_ratio"] < 1.5
    assert sum(m["hardness_ratio"] for m in late) / len(late) > 2.0
    assert sum(m["critic_spearman"] for m in late) / len(late) > 0.5
    assert sum(m["background_share"] for m in late) / len(late) < history[0]["background_share"]


def test_joint_ahm_takes_the_conv_agent() -> None:
    from ahm.masking.ahm.agent import build_agent

    cfg = MaskingConfig(policy="ahm", agent="conv", agent_dim=16, hard_fraction_max=0.5)
    policy = build_policy(cfg, PolicyContext(grid=(4, 4), patch_size=16, in_channels=1, total_steps=10))
    images = torch.rand(2, 1, 64, 64)
    mask = policy.propose(images, 1.0)
    step = policy.observe(images, mask, torch.rand(2, 16) * mask, 1.0)
    step.aux_loss.backward()
    assert all(p.grad is not None for p in policy.agent.parameters())
    rebuilt = build_agent(**policy.agent.init_kwargs())  # what an A3C worker process does
    assert type(rebuilt) is ConvAgent and rebuilt.value_head == "linear"
