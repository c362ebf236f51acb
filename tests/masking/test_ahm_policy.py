"""The AHM policy in synchronous (A2C) mode: masks, learning on a planted toy, diagnostics, resume, errors."""

from __future__ import annotations

import io

import pytest
import torch
from ahm_toy import GRID, PATCH, mean_metric, planted_batch, toy_loss

from ahm.config import MaskingConfig, PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.masking.ahm import AHMPolicy
from ahm.masking.base import PolicyContext, build_policy, check_mask, hard_fraction_at, num_masked


def _policy(seed: int = 0, **overrides: object) -> AHMPolicy:
    cfg = MaskingConfig(**{"policy": "ahm", "mask_ratio": 0.5, "agent_dim": 32, "policy_lr": 3e-3, **overrides})
    ctx = PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=100, seed=seed)
    policy = build_policy(cfg, ctx)
    assert isinstance(policy, AHMPolicy)
    return policy


def _train(policy: AHMPolicy, steps: int, batch: int = 16, seed: int = 1) -> list[dict[str, float]]:
    opt = torch.optim.Adam(policy.parameters(), lr=policy.cfg.policy_lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        progress = step / steps
        images, hardness = planted_batch(gen, batch)
        mask = policy.propose(images, progress)
        out = policy.observe(images, mask, toy_loss(hardness, mask, gen), progress)
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
        history.append(out.metrics)
    return history


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("alpha_max", [0.0, 0.5, 1.0])
def test_exact_mask_counts(ratio: float, alpha_max: float) -> None:
    policy = _policy(mask_ratio=ratio, hard_fraction_max=alpha_max)
    images, hardness = planted_batch(torch.Generator().manual_seed(0), 3)
    for progress in (0.0, 0.37, 1.0):
        k = num_masked(ratio, 64)
        k_hard = round(hard_fraction_at(policy.cfg, progress) * k)
        mask = policy.propose(images, progress)
        check_mask(mask, k)
        draw = policy._draw
        assert draw.hard_idx.shape == (3, k_hard)
        assert bool(mask.gather(1, draw.hard_idx).all())  # actor-chosen patches are masked
        out = policy.observe(images, mask, toy_loss(hardness, mask, torch.Generator()), progress)
        assert out.metrics["hard_fraction"] == pytest.approx(k_hard / k)
        assert ("hardness_ratio" in out.metrics) == (0 < k_hard < k)


def test_metrics_keys_and_aux_loss_reaches_agent_only() -> None:
    policy = _policy(hard_fraction_warmup=0.0)
    images, hardness = planted_batch(torch.Generator().manual_seed(0), 4)
    mask = policy.propose(images, 0.8)
    out = policy.observe(images, mask, toy_loss(hardness, mask, torch.Generator()), 0.8)
    for key in ("hardness_ratio", "critic_spearman", "policy_entropy", "mean_reward", "background_share",
                "transitions_dropped", "hard_fraction", "agent_loss"):
        assert isinstance(out.metrics[key], float), key
    assert out.metrics["transitions_dropped"] == 0.0
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    out.aux_loss.backward()
    assert policy.agent.actor.weight.grad is not None and float(policy.agent.actor.weight.grad.abs().sum()) > 0
    assert policy.agent.critic.weight.grad is not None and float(policy.agent.critic.weight.grad.abs().sum()) > 0
    # the background (flat) covers most of each toy image: random-ish first masks land mostly on it
    assert 0.3 < out.metrics["background_share"] <= 1.0


def test_agent_learns_planted_hard_patches_sync() -> None:
    policy = _policy()
    history = _train(policy, steps=80, batch=8)
    last = history[-25:]
    hardness = mean_metric(last, "hardness_ratio")
    assert hardness > 2.0, hardness
    assert mean_metric(last, "critic_spearman") > 0.5
    assert mean_metric(last, "background_share_actor") < 0.5 * mean_metric(history[:5], "background_share")
    assert mean_metric(last, "policy_entropy") < mean_metric(history[:5], "policy_entropy")


def test_pairwise_critic_learns() -> None:
    policy = _policy(critic_loss="pairwise")
    history = _train(policy, steps=60, batch=8)
    assert all(torch.isfinite(torch.tensor(m["agent_loss"])) for m in history)
    assert mean_metric(history[-15:], "critic_spearman") > 0.3


def test_sync_mode_is_reproducible() -> None:
    masks = []
    for _ in range(2):
        policy = _policy(seed=3)
        _train(policy, steps=4, batch=4)
        images, _ = planted_batch(torch.Generator().manual_seed(9), 4)
        masks.append(policy.propose(images, 0.6))
    assert torch.equal(masks[0], masks[1])


def _roundtrip(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_gives_identical_next_masks() -> None:
    trained = _policy(seed=2)
    _train(trained, steps=6, batch=4)
    state, extra = _roundtrip((trained.state_dict(), trained.extra_state()))
    resumed = _policy(seed=2)
    fresh = _policy(seed=2)
    resumed.load_state_dict(state)
    resumed.load_extra_state(extra)
    images, _ = planted_batch(torch.Generator().manual_seed(4), 4)
    expected = trained.propose(images, 0.9)
    assert torch.equal(resumed.propose(images, 0.9), expected)
    assert torch.equal(resumed._draw.logits, trained._draw.logits)
    assert not torch.equal(fresh.propose(images, 0.9), expected)  # without the checkpoint it differs


def test_incompatible_checkpoint_raises_one_line() -> None:
    state = _policy(agent_dim=32).state_dict()
    with pytest.raises(AhmError, match="--agent-dim") as info:
        _policy(agent_dim=16, agent_heads=4).load_state_dict(state)
    message = str(info.value)
    assert "\n" not in message and "agent.pos_embed is [1, 64, 32] in the checkpoint but [1, 64, 16] here" in message
    assert len(message) <= 160  # the loop quotes the first 160 characters after the checkpoint's path
    other_grid = AHMPolicy(MaskingConfig(policy="ahm", agent_dim=32),
                           PolicyContext(grid=(4, 4), patch_size=16, in_channels=1, total_steps=10))
    with pytest.raises(RuntimeError, match="checkpoint"):  # also a RuntimeError: the loop adds the path
        other_grid.load_state_dict(state)
    with pytest.raises(AhmError, match="missing"):
        _policy().load_state_dict({})


def test_agent_weights_do_not_depend_on_rank_or_global_rng() -> None:
    cfg = MaskingConfig(policy="ahm", agent_dim=32)
    torch.manual_seed(1)
    a = AHMPolicy(cfg, PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=10, seed=5, rank=0))
    torch.manual_seed(2)
    b = AHMPolicy(cfg, PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=10, seed=5, rank=1,
                                     world_size=2))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(AhmError, match="agent_workers"):
        build_config(PretrainConfig, overrides={"masking": {"agent_workers": 100_000}})
    with pytest.raises(AhmError, match="--agent-heads"):
        _policy(agent_dim=30, agent_heads=4)
    with pytest.raises(AhmError, match="--temperature"):
        _policy(temperature=0.0)
    with pytest.raises(AhmError, match="DDP"):
        AHMPolicy(MaskingConfig(policy="ahm", agent_workers=1),
                  PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=10, world_size=2))


def test_eval_propose_alone_and_non_finite_loss_skipped() -> None:
    policy = _policy()
    images, hardness = planted_batch(torch.Generator().manual_seed(0), 2)
    policy.eval()
    mask = policy.propose(images, 0.5)
    assert not policy._draw.logits.requires_grad
    probs, values = policy.agent_maps(images)
    assert probs.shape == values.shape == (2, 64)
    assert torch.allclose(probs.sum(1), torch.ones(2))
    policy.train()
    mask = policy.propose(images, 0.5)
    loss = toy_loss(hardness, mask, torch.Generator())
    loss[0, mask[0].nonzero()[0, 0]] = float("nan")
    out = policy.observe(images, mask, loss, 0.5)
    assert out.aux_loss is None and out.metrics["agent_skipped"] == 1.0
    with pytest.raises(RuntimeError, match="propose"):
        policy.observe(images, mask, loss, 0.5)


def test_patch_std_matches_direct_computation() -> None:
    from ahm.masking.ahm.policy import patch_std

    x = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    x[0, :, :16, :16] = 0.5  # one constant (background-like) patch
    direct = x.reshape(3, 2, 2, 16, 2, 16).permute(0, 2, 4, 1, 3, 5).reshape(3, 4, -1).std(-1, unbiased=False)
    got = patch_std(x, 16)
    assert torch.allclose(got, direct, atol=1e-4)
    assert float(got[0, 0]) < 1e-3
