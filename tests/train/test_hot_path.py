"""The pretraining hot path: the fused AdamW kernel takes the same steps as the foreach one."""

from __future__ import annotations

import torch

from ahm.config import PretrainConfig, build_config
from ahm.masking import PolicyContext, build_policy
from ahm.models import build_mim_model
from ahm.train.pretrain import build_optimizer

TINY = {"preset": "custom", "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "patch_size": 8,
        "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def _built(fused: bool):
    cfg = build_config(PretrainConfig, overrides={"model": TINY, "masking": {"policy": "ahm", "agent_dim": 16,
                                                                             "agent_heads": 2}})
    torch.manual_seed(0)
    model = build_mim_model(cfg.model, 32, 1)
    policy = build_policy(cfg.masking, PolicyContext(grid=model.grid, patch_size=8, in_channels=1, total_steps=5,
                                                     seed=0, device=torch.device("cpu"), model=model))
    optimizer, policy_params = build_optimizer(model, policy, cfg)
    assert optimizer.defaults["fused"] is True and policy_params  # on the CPU the fused kernel is used
    if not fused:
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = False, True
    return optimizer, [p for g in optimizer.param_groups for p in g["params"]]


def test_fused_adamw_takes_the_foreach_steps() -> None:
    (opt_a, params_a), (opt_b, params_b) = _built(True), _built(False)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # the same gradients for both, with weight decay and the policy's own group
        for a, b in zip(params_a, params_b):
            a.grad = torch.randn(a.shape, generator=g) * 0.1
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    moved = [(a, b, a0) for a, b, a0 in zip(params_a, params_b, _built(True)[1])]
    for a, b, start in moved:
        assert not torch.equal(a, start)  # the steps did move every parameter
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

