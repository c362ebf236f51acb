"""The pretraining hot path: the fused AdamW kernel takes the same steps as the foreach one, and a step that is
not logged reads nothing from the device."""

from __future__ import annotations

import sys

import pytest
import torch
from train_helpers import make_blob_folder, tiny_pretrain_overrides

import ahm.train.engine as engine
import ahm.train.pretrain as pretrain_module
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



# ---------------------------------------------------------------------------------------------------------------
# Host reads on the step path. A read of a device value on the host (`.item()`, `float(t)`, `bool(t)`, `.tolist()`,
# a boolean-mask index, `torch.equal`, ...) waits for every kernel queued before it: one such read per step keeps
# a GPU idle while the host catches up. On CPU the same calls are made, so counting them here is exact.

READ_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")
READ_FUNCTIONS = ("equal", "allclose", "nonzero", "is_nonzero")
# Code whose reads are not the step's: the data pipeline (CPU tensors only). The NaN/inf safety net of
# optimizer_step is counted: with a fused AdamW it skips a bad step on the device and is read with the log.
NOT_COUNTED = ("ahm.data",)


def _reader(frame) -> str | None:
    """The first ahm module up the stack from a read: the code that asked for it."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("ahm."):
            return name
        frame = frame.f_back
    return None


def _boolean_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostReads:
    """Counts the host reads the pretraining step's own code makes, per step, while `step` is set and `mode` is
    entered. A TorchFunctionMode sees every tensor method and torch function a Python caller makes, so nothing of
    torch is replaced (assigning Tensor.__getitem__ and taking it back leaves CPython's sequence slot behind, and
    every 0-d tensor then counts as a sequence for the rest of the process)."""

    def __init__(self, monkeypatch) -> None:
        self.step: int | None = None
        self.reads: dict[int, list[str]] = {}
        owner = self
        reads = set(READ_METHODS) | set(READ_FUNCTIONS)

        class Watch(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in reads:
                    owner.note(f"{'Tensor' if func is getattr(torch.Tensor, name, None) else 'torch'}.{name}",
                               sys._getframe(1))
                elif func is torch.Tensor.__getitem__ and _boolean_index(args[1]):  # its size is a count of True
                    owner.note("boolean index", sys._getframe(1))
                return func(*args, **(kwargs or {}))

        self.mode = Watch()

    def note(self, what: str, frame) -> None:
        reader = _reader(frame) if self.step is not None else None
        if reader is not None and not reader.startswith(NOT_COUNTED):
            self.reads.setdefault(self.step, []).append(f"{what} in {reader}")

    def per_step(self, steps: range) -> list[int]:
        return [len(self.reads.get(s, [])) for s in steps]


def _count_reads(tmp_path, monkeypatch, policy: str, steps: int, log_every: int) -> HostReads:
    """Pretrain `steps` steps, counting the host reads of each (a step runs from one forward to the next)."""
    over = tiny_pretrain_overrides(make_blob_folder(tmp_path / "data", n=6), policy=policy, steps=steps)
    over["train"].update(log_every=log_every, checkpoint_every=1000)
    over["masking"]["hard_fraction_warmup"] = 0.0  # ahm: the actor draws from the first step on
    cfg = build_config(PretrainConfig, overrides=over)
    reads = HostReads(monkeypatch)
    forward = engine.forward_step

    def step_start(*args, **kwargs):
        reads.step = 1 if reads.step is None else reads.step + 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_step", step_start)
    try:
        with reads.mode:
            pretrain_module.pretrain(cfg, tmp_path / "run", progress=False)
    finally:
        reads.step = None
    return reads


@pytest.mark.parametrize("policy", ["random", "ahm"])
def test_steps_that_are_not_logged_read_nothing_from_the_device(tmp_path, monkeypatch, policy) -> None:
    # 12 steps, only the last logged: steps 1-10 run from their forward to the next one without a log
    reads = _count_reads(tmp_path, monkeypatch, policy, steps=12, log_every=1000)
    counts = reads.per_step(range(1, 11))
    assert counts == [0] * 10, {s: r for s, r in reads.reads.items() if s <= 10}


@pytest.mark.parametrize("policy", ["random", "ahm"])
def test_a_logged_step_reads_its_loss_and_metrics_at_once(tmp_path, monkeypatch, policy) -> None:
    # every step logged: the counter sees the loop's one read of the step's loss and metrics
    reads = _count_reads(tmp_path, monkeypatch, policy, steps=4, log_every=1)
    assert reads.per_step(range(1, 4)) == [1] * 3, reads.reads
