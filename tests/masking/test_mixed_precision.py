"""The networks a policy runs besides the model take the run's mixed precision (`PolicyContext.autocast`), with
their output layers in float32: HPM's EMA teacher, ahm-official's agent and hardness probes."""

from __future__ import annotations

import torch
from masking_helpers import fake_loss, images_for, tiny_model

from ahm.config import MaskingConfig
from ahm.masking import PolicyContext, build_policy


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _record_dtypes(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))


def test_hpm_teacher_runs_in_the_runs_precision_and_its_predictor_in_float32() -> None:
    policy = build_policy(MaskingConfig(policy="hpm"), PolicyContext(
        grid=(4, 4), patch_size=16, in_channels=1, total_steps=10, model=tiny_model("standin", 64), autocast=_bf16))
    seen: list = []
    _record_dtypes(policy.teacher.mix, seen)
    images = images_for((4, 4))
    mask = policy.propose(images, 1.0)
    step = policy.observe(images, mask, fake_loss(mask), 1.0)
    assert seen and set(seen) == {torch.bfloat16}
    assert policy.predict_hardness(images).dtype == torch.float32 and step.aux_loss.dtype == torch.float32


def test_official_agent_and_probe_run_in_the_runs_precision_with_float32_outputs() -> None:
    model = tiny_model("unet", 64)
    cfg = MaskingConfig(policy="ahm-official", official_recon_fraction=0.2, official_agent_fraction=0.3, agent_dim=8)
    policy = build_policy(cfg, PolicyContext(grid=(4, 4), patch_size=16, in_channels=1, total_steps=10, model=model,
                                             autocast=_bf16))
    agent_seen: list = []
    model_seen: list = []
    _record_dtypes(policy.agent.stem[0], agent_seen)
    _record_dtypes(next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), model_seen)
    images = images_for((4, 4), batch=2)
    mask = policy.propose(images, 0.3)  # the agent stage
    assert agent_seen == [torch.bfloat16]
    assert policy._draw.logits.dtype == policy._draw.values.dtype == torch.float32  # the top-k sees float32
    with torch.no_grad():
        out = model(images, mask)
    model_seen.clear()
    step = policy.observe_output(images, mask, out, 0.3)
    assert "hardness_ratio" in step.metrics and model_seen == [torch.bfloat16]  # the probe's random-mask forward
