"""Every masking policy, the agents and the diagnostics on a 3D patch grid.

Volumes of 32^3 voxels cut into 8^3 patches: a 4x4x4 grid, L = 64, patches numbered row-major like PatchGrid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ahm_toy import GRID_3D, mean_metric, planted_volume_batch, toy_loss
from masking_helpers import PatchFeatures

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.grid import PatchGrid
from ahm.masking import PolicyContext, build_policy, num_masked, policy_names
from ahm.masking.ahm.agent import AhmAgent, ConvAgent
from ahm.masking.base import check_mask, iter_policy_params
from ahm.masking.block import block_mask, place_blocks
from ahm.masking.diagnostics import BACKGROUND_STD, background_share, hardness_ratio, patch_std
from ahm.masking.official.reward import patch_reward_terms
from ahm.models.mae import MIMOutput

ANISOTROPIC = PatchGrid.of((16, 32, 32), (4, 8, 8))  # 4x4x4 patches, thinner along the first axis


def _context(grid: PatchGrid, total_steps: int = 100, model=None) -> PolicyContext:
    return PolicyContext(grid=grid, in_channels=1, total_steps=total_steps, seed=0, model=model)


def _policy(name: str, grid: PatchGrid = GRID_3D, total_steps: int = 100, **masking):
    model = PatchFeatures(0, 0, 1, grid=grid) if name == "hpm" else None
    defaults = {"agent_dim": 16, "agent_heads": 4} if name in ("adamae", "ahm", "ahm-official") else {}
    cfg = MaskingConfig(policy=name, **{**defaults, **masking})
    return build_policy(cfg, _context(grid, total_steps, model))


class BackgroundReconstructor3D(torch.nn.Module):
    """A frozen reconstructor that only knows the toy's flat background: it fills every masked patch with 0.2."""

    def __init__(self, grid: PatchGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, volumes: torch.Tensor, mask: torch.Tensor) -> MIMOutput:
        pixel = self.grid.upsample(mask.float()).bool()
        prediction = torch.where(pixel, torch.full_like(volumes, 0.2), volumes)
        error = self.grid.pool((prediction - volumes).square()) * mask
        return MIMOutput(loss=error[mask].mean(), per_patch_loss=error, prediction=prediction)


def test_a_tuple_grid_becomes_the_patch_grid() -> None:
    ctx = PolicyContext(grid=(4, 4, 4), patch_size=8, in_channels=1, total_steps=10)
    assert ctx.grid == GRID_3D and ctx.num_patches == 64 and ctx.spatial_dims == 3 and ctx.patch_size == 8
    assert PolicyContext(grid=ANISOTROPIC, in_channels=1, total_steps=10).patch_size == (4, 8, 8)
    with pytest.raises(ValueError, match="disagrees"):
        PolicyContext(grid=GRID_3D, patch_size=16, in_channels=1, total_steps=10)


@pytest.mark.parametrize("grid", [GRID_3D, ANISOTROPIC], ids=["cubic", "anisotropic"])
@pytest.mark.parametrize("name", policy_names())
def test_every_policy_masks_exactly_k_patches_of_a_volume(name: str, grid: PatchGrid) -> None:
    policy = _policy(name, grid, total_steps=10, mask_ratio=0.6, hard_fraction_max=0.5, hard_fraction_warmup=0.0)
    gen = torch.Generator().manual_seed(0)
    volumes = torch.rand(3, 1, *grid.spatial_shape, generator=gen)
    k = num_masked(0.6, 64)
    # ahm-official: steps 0-2 reconstructor warm-up, 3-5 the learning agent, 6-9 MIM with the frozen agent
    for step in (0, 4, 8):
        mask = policy.propose(volumes, step / 10)
        assert mask.shape == (3, 64) and mask.dtype == torch.bool
        check_mask(mask, k)
        if name == "ahm-official":
            if step > 0:
                out = BackgroundReconstructor3D(grid)(volumes, mask)
                metrics = policy.observe_output(volumes, mask, out, step / 10).metrics
                assert 0.0 <= metrics["background_share"] <= 1.0
            else:
                policy.observe_output(volumes, mask, None, step / 10)
        else:
            step_out = policy.observe(volumes, mask, torch.rand(3, 64, generator=gen) * mask, step / 10)
            if step_out.aux_loss is not None:
                step_out.aux_loss.backward()
    policy.close()


def _boundary_faces(mask: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Mean number of masked/visible neighbour pairs per volume along every axis: low for compact masks."""
    m = mask.view(-1, *shape).int()
    total = sum((m.diff(dim=axis) != 0).sum() for axis in range(1, m.dim()))
    return float(total) / m.shape[0]


def test_block_masks_of_a_volume_are_unions_of_cuboids() -> None:
    shape, k = (6, 6, 6), 100
    rng = np.random.default_rng(0)
    for _ in range(20):
        uniforms = rng.random((4 * 216 + 16, 6))
        mask, blocks = place_blocks(shape, k, uniforms, min_block=18)
        union = np.zeros(shape, dtype=bool)
        for block in blocks:
            assert len(block.size) == 3 and all(s >= 0 and s + n <= g for s, n, g in zip(block.start, block.size, shape))
            union[block.slices()] = True
        assert np.array_equal(union, mask)
        assert 0 < mask.sum() <= k
        assert any(min(block.size) > 1 for block in blocks)  # solid cuboids, not lines of patches
        full = block_mask(shape, k, uniforms, rng.random(216), min_block=18)
        assert full.sum() == k and full[mask.reshape(-1)].all()  # topping up keeps every cuboid


@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_block_masks_of_a_volume_are_more_compact_than_random(ratio: float) -> None:
    grid = PatchGrid.of((16, 16, 16), 2)  # 8x8x8 patches
    volumes = torch.zeros(32, 1, 16, 16, 16)
    block = _policy("block", grid, mask_ratio=ratio).propose(volumes, 0.0)
    rand = _policy("random", grid, mask_ratio=ratio).propose(volumes, 0.0)
    check_mask(block, num_masked(ratio, 512))
    assert _boundary_faces(block, grid.shape) < 0.7 * _boundary_faces(rand, grid.shape)


def test_3d_diagnostics() -> None:
    gen = torch.Generator().manual_seed(0)
    volumes, hardness = planted_volume_batch(gen, 2, cuboid=(16, 16, 16))
    # a per-patch std: the std of PatchGrid's patch vectors (up to the float32 cancellation of pooled moments)
    expected = GRID_3D.patchify(volumes).std(dim=-1, unbiased=False)
    torch.testing.assert_close(patch_std(volumes, 8), expected, atol=2e-3, rtol=1e-3)
    flat = hardness == 0
    assert bool((patch_std(volumes, 8)[flat] < BACKGROUND_STD).all())
    assert background_share(volumes, 8, flat) == 1.0
    assert background_share(volumes, (8, 8, 8), ~flat) == 0.0
    loss = toy_loss(hardness, torch.ones_like(flat), gen)
    ratio = hardness_ratio(loss, hardness > 0.5, torch.ones_like(flat))
    assert ratio is not None and ratio > 5.0
    # the official reward sums every patch's voxels: error only where the reconstruction differs
    prediction = volumes.clone()
    prediction[:, :, :8, :8, :8] += 1.0
    error, balance = patch_reward_terms(volumes, prediction, GRID_3D.shape, GRID_3D.patch_size)
    assert error.shape == balance.shape == (2, 64)
    assert bool((error[:, 0] > 0).all()) and bool((error[:, 1:] == 0).all())
    torch.testing.assert_close(error[:, 0], torch.full((2,), 255.0 / 64 * 512))


def test_3d_agents_give_one_value_per_patch() -> None:
    volumes = torch.rand(2, 1, 16, 32, 32)
    for agent in (AhmAgent(1, (4, 8, 8), (4, 4, 4), dim=16), ConvAgent(1, (4, 8, 8), (4, 4, 4), width=8),
                  ConvAgent(1, 8, (2, 4, 4), width=8)):
        logits, values = agent(volumes)
        assert logits.shape == values.shape == (2, 64 if agent.grid == (4, 4, 4) else 32)


def _train_ahm(policy, steps: int, batch: int, seed: int = 1) -> list[dict[str, float]]:
    opt = torch.optim.Adam(list(iter_policy_params(policy)), lr=policy.cfg.policy_lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        volumes, hardness = planted_volume_batch(gen, batch)
        mask = policy.propose(volumes, step / steps)
        out = policy.observe(volumes, mask, toy_loss(hardness, mask, gen), step / steps)
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
        history.append(out.metrics)
    return history


def test_3d_ahm_agent_learns_a_planted_hard_cuboid() -> None:
    policy = _policy("ahm", mask_ratio=0.5, agent_dim=32, policy_lr=3e-3)
    history = _train_ahm(policy, steps=80, batch=8)
    last = history[-25:]
    assert mean_metric(last, "hardness_ratio") > 2.0
    assert mean_metric(last, "critic_spearman") > 0.5
    assert mean_metric(last, "background_share_actor") < 0.5 * mean_metric(history[:5], "background_share")


def test_3d_official_agent_learns_a_planted_hard_cuboid() -> None:
    model = BackgroundReconstructor3D(GRID_3D)
    cfg = MaskingConfig(policy="ahm-official", mask_ratio=0.25, official_recon_fraction=0.0,
                        official_agent_fraction=0.5, official_agent_lr=1e-3, official_probe_every=1, agent_dim=16)
    policy = build_policy(cfg, _context(GRID_3D, total_steps=60, model=model))
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(25):
        volumes, _ = planted_volume_batch(gen, 6)
        mask = policy.propose(volumes, step / 60)
        with torch.no_grad():
            out = model(volumes, mask)
        history.append(policy.observe_output(volumes, mask, out, step / 60).metrics)
    late = history[-8:]
    assert history[0]["hardness_ratio"] < 2.0  # an untrained agent's top-k is about as hard as random
    assert sum(m["hardness_ratio"] for m in late) / len(late) > 2.0
    assert sum(m["critic_spearman"] for m in late) / len(late) > 0.5


def test_3d_a3c_workers_train_the_shared_agent() -> None:
    policy = _policy("ahm", mask_ratio=0.5, agent_dim=16, agent_workers=1, policy_lr=3e-3, hard_fraction_warmup=0.0)
    gen = torch.Generator().manual_seed(1)
    before = [p.detach().clone() for p in policy.agent.parameters()]
    try:
        for _step in range(4):
            volumes, hardness = planted_volume_batch(gen, 4)
            mask = policy.propose(volumes, 0.5)
            check_mask(mask, 32)
            out = policy.observe(volumes, mask, toy_loss(hardness, mask, gen), 0.5)
            assert out.aux_loss is None  # A3C trains itself, in its worker process
        policy.flush(timeout=180)
        assert policy.workers.updates == 4
    finally:
        policy.close()
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.agent.parameters()))


def test_3d_official_resume_refuses_another_patch_grid() -> None:
    saved = _policy("ahm-official", total_steps=10).extra_state()
    _policy("ahm-official", total_steps=10).load_extra_state(saved)  # the same grid resumes
    with pytest.raises(AhmError, match="patch-size"):
        _policy("ahm-official", ANISOTROPIC, total_steps=10).load_extra_state(saved)
