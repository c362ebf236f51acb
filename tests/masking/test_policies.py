"""The baseline masking policies: exact counts, reproducibility, block shape, HPM's schedule and teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from masking_helpers import fake_loss, images_for, make_policy, tiny_model

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking import PolicyContext, build_policy, num_masked
from ahm.masking.base import iter_policy_params
from ahm.masking.hpm import pairwise_rank_loss

BASELINES = ["random", "block", "hpm", "adamae"]


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("backbone,grid,patch", [("vit", (4, 4), 16), ("vit", (8, 8), 8), ("unet", (4, 4), 16),
                                                 ("unet", (8, 8), 8)])
def test_every_row_has_exactly_k(name, backbone, grid, patch):
    policy = make_policy(name, grid=grid, patch_size=patch, backbone=backbone)
    images = images_for(grid, patch)
    length = grid[0] * grid[1]
    for ratio in (0.1, 0.4, 0.75, 0.95):
        policy.cfg = MaskingConfig(policy=name, mask_ratio=ratio)
        for progress in (0.0, 0.5, 1.0):
            mask = policy.propose(images, progress)
            assert mask.dtype == torch.bool and mask.shape == (3, length)
            assert mask.sum(dim=1).tolist() == [num_masked(ratio, length)] * 3
            policy.observe(images, mask, fake_loss(mask), progress)


@pytest.mark.parametrize("name", ["random", "block", "adamae"])
@pytest.mark.parametrize("grid", [(2, 2), (4, 6), (16, 16)])
def test_exact_k_on_other_grids_and_a_ratio_schedule(name, grid):
    policy = make_policy(name, grid=grid, patch_size=4, mask_ratio=0.3, mask_ratio_end=0.9)
    images = images_for(grid, 4, batch=4)
    length = grid[0] * grid[1]
    seen = []
    for progress in (0.0, 0.25, 0.5, 0.75, 1.0):
        k = num_masked(0.3 + 0.6 * progress, length)
        mask = policy.propose(images, progress)
        assert mask.sum(dim=1).tolist() == [k] * 4
        seen.append(k)
    assert seen == sorted(seen) and seen[0] < seen[-1]


def test_hpm_exact_k_under_the_ratio_schedule():
    policy = make_policy("hpm", grid=(8, 8), patch_size=8, mask_ratio=0.5, mask_ratio_end=0.9)
    images = images_for((8, 8), 8)
    for progress in (0.0, 0.3, 0.6, 1.0):
        mask = policy.propose(images, progress)
        assert mask.sum(dim=1).tolist() == [num_masked(0.5 + 0.4 * progress, 64)] * 3


def _run(policy, images, progresses, step_fn=None):
    masks = []
    for i, progress in enumerate(progresses):
        mask = policy.propose(images, progress)
        step = policy.observe(images, mask, fake_loss(mask, seed=i), progress)
        if step_fn is not None:
            step_fn(policy, step, i)
        masks.append(mask.clone())
    return masks


def _sgd_step(policy, step, i):
    """A stateless update so two copies of a policy fed the same data stay identical."""
    if step.aux_loss is None:
        return
    params = list(iter_policy_params(policy))
    grads = torch.autograd.grad(step.aux_loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(0.5 * g)
    if policy.name == "hpm":
        # stands in for the loop's optimiser moving the student, so the EMA teacher drifts too
        with torch.no_grad():
            for p in policy.ctx.model.parameters():
                p.add_(0.05 * torch.sin(p + i))


@pytest.mark.parametrize("name", BASELINES)
def test_same_seed_same_masks_and_different_seed_differs(name):
    progresses = [0.2, 0.6, 1.0]
    images = images_for((4, 4))
    a = _run(make_policy(name, seed=3), images, progresses)
    b = _run(make_policy(name, seed=3), images, progresses)
    c = _run(make_policy(name, seed=4), images, progresses)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("name", BASELINES)
def test_resume_from_saved_state_continues_the_same_masks(name):
    images = images_for((4, 4), batch=4)
    first, rest = [0.5, 0.6], [0.7, 0.8, 0.9, 1.0]
    policy = make_policy(name, seed=1, ema_decay=0.5)
    _run(policy, images, first, _sgd_step)
    state = copy.deepcopy(policy.state_dict())
    extra = copy.deepcopy(policy.extra_state())
    student = copy.deepcopy(policy.ctx.model)
    expected = _run(policy, images, rest, _sgd_step)

    # a fresh run: new policy (new teacher copied from the resumed student), then the checkpoint loaded
    resumed = make_policy(name, seed=99, ema_decay=0.5, model=student)
    resumed.load_state_dict(state)
    resumed.load_extra_state(extra)
    got = _run(resumed, images, rest, _sgd_step)
    assert all(torch.equal(x, y) for x, y in zip(expected, got))


def _boundary_edges(mask: torch.Tensor, grid) -> float:
    """Mean number of neighbouring patch pairs with one masked and one visible patch: low for compact regions."""
    m = mask.view(-1, *grid)
    horizontal = (m[:, :, 1:] != m[:, :, :-1]).sum()
    vertical = (m[:, 1:, :] != m[:, :-1, :]).sum()
    return float(horizontal + vertical) / m.shape[0]


@pytest.mark.parametrize("grid,ratio", [((8, 8), 0.4), ((14, 14), 0.4), ((16, 16), 0.75), ((16, 16), 0.9)])
def test_block_masks_are_more_contiguous_than_random(grid, ratio):
    images = images_for(grid, 2, batch=64)
    block = make_policy("block", grid=grid, patch_size=2, mask_ratio=ratio).propose(images, 0.0)
    rand = make_policy("random", grid=grid, patch_size=2, mask_ratio=ratio).propose(images, 0.0)
    assert _boundary_edges(block, grid) < 0.7 * _boundary_edges(rand, grid)


def test_hpm_hard_fraction_schedule_and_hard_patches_are_predicted_top():
    policy = make_policy("hpm", grid=(8, 8), patch_size=8)
    images = images_for((8, 8), 8)
    k = num_masked(0.75, 64)

    mask = policy.propose(images, 0.0)
    step = policy.observe(images, mask, fake_loss(mask), 0.0)
    assert step.metrics["hard_fraction"] == 0.0
    assert "hardness_ratio" not in step.metrics  # no hard-chosen patches yet

    mask = policy.propose(images, 1.0)
    predicted = policy.predict_hardness(images)
    step = policy.observe(images, mask, fake_loss(mask), 1.0)
    assert step.metrics["hard_fraction"] == pytest.approx(0.5)
    top = predicted.topk(round(0.5 * k), dim=1).indices
    assert bool(mask.gather(1, top).all())
    assert {"hpm_pred_loss", "hardness_ratio", "critic_spearman"} <= set(step.metrics)
    assert step.aux_loss is not None and step.aux_loss.requires_grad


def test_hpm_teacher_is_frozen_saved_and_tracks_the_student_by_ema():
    policy = make_policy("hpm", ema_decay=0.75)
    trainable = {id(p) for p in iter_policy_params(policy)}
    assert trainable == {id(p) for p in policy.predictor.parameters()}
    assert any(key.startswith("teacher.") for key in policy.state_dict())
    policy.train()
    assert not policy.teacher.training

    student = policy.ctx.model
    before = [p.detach().clone() for p in policy.teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    images = images_for((4, 4))
    mask = policy.propose(images, 0.5)
    policy.observe(images, mask, fake_loss(mask), 0.5)
    for old, new, s in zip(before, policy.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * s)


def test_hpm_needs_a_model_with_features():
    with pytest.raises(AhmError, match="hpm"):
        build_policy(MaskingConfig(policy="hpm"), PolicyContext(grid=(4, 4), patch_size=16, in_channels=1,
                                                                 total_steps=10))


def test_pairwise_rank_loss_ignores_ties_and_rewards_correct_order():
    target = torch.tensor([[3.0, 2.0, 1.0, 1.0]])
    right = pairwise_rank_loss(torch.tensor([[30.0, 20.0, 10.0, -99.0]]), target)
    wrong = pairwise_rank_loss(torch.tensor([[10.0, 20.0, 30.0, 99.0]]), target)
    assert float(right) < 1e-3
    assert float(wrong) > 1.0
    # only the tied pair differs between these two predictions, so the loss must not move
    a = pairwise_rank_loss(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), target)
    b = pairwise_rank_loss(torch.tensor([[3.0, 2.0, 0.0, 1.0]]), target)
    torch.testing.assert_close(a, b)


def test_adamae_rejects_bad_agent_width():
    with pytest.raises(AhmError, match="--agent-dim"):
        make_policy("adamae", agent_dim=30, agent_heads=4)


@pytest.mark.parametrize("name", ["hpm", "adamae"])
def test_learned_policy_init_follows_the_seed_not_the_global_rng(name):
    model = tiny_model("standin", 64, 16)
    torch.manual_seed(1)
    a = make_policy(name, seed=5, model=model)
    after_a = torch.rand(3)
    torch.manual_seed(2)
    b = make_policy(name, seed=5, model=model)
    torch.manual_seed(1)
    expected = torch.rand(3)
    assert torch.equal(after_a, expected)  # building a policy leaves the global RNG where it was
    for (key, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), key


def test_block_mask_tops_up_to_exactly_k_when_blocks_run_out():
    import numpy as np

    from ahm.masking.block import block_mask

    rng = np.random.default_rng(0)
    fill = rng.random(24)
    no_blocks = block_mask((4, 6), 10, np.empty((0, 4)), fill, 2)
    assert no_blocks.sum() == 10 and set(np.flatnonzero(no_blocks)) == set(np.argsort(-fill)[:10])
    one_block = block_mask((4, 6), 10, np.array([[1.0, 0.5, 0.0, 0.0]]), fill, 2)
    assert one_block.sum() == 10 and one_block.reshape(4, 6)[:3, :3].all()  # a 3x3 block, then 1 random


def test_each_settings_model_names_the_module_that_registers_its_policy():
    import importlib

    from ahm.config import POLICY_CONFIGS, RandomMaskingConfig
    from ahm.masking.base import _REGISTRY, policy_names

    assert policy_names() == list(POLICY_CONFIGS)
    for name, model in POLICY_CONFIGS.items():
        importlib.import_module(model.policy_module)
        assert _REGISTRY[name].name == name, model.policy_module
    assert "policy_module" not in MaskingConfig(policy="hpm").model_dump()  # a class fact, not a setting
    with pytest.raises(AhmError, match="unknown masking policy 'nope'; choose one of random, block, hpm"):
        build_policy(RandomMaskingConfig.model_construct(policy="nope"),
                     PolicyContext(grid=(4, 4), patch_size=16, in_channels=1, total_steps=1))
