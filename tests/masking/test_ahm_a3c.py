"""The AHM policy in asynchronous (A3C) mode: shared optimiser, worker processes, learning, clean shut-down."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ahm_toy import GRID, PATCH, mean_metric, planted_batch, toy_loss

from ahm.config import MaskingConfig
from ahm.errors import AhmError
from ahm.masking.ahm import AHMPolicy
from ahm.masking.ahm.a3c import SharedAdam
from ahm.masking.base import PolicyContext, build_policy

REPO = Path(__file__).resolve().parents[2]


def _async_policy(workers: int = 2, **overrides: object) -> AHMPolicy:
    cfg = MaskingConfig(**{"policy": "ahm", "mask_ratio": 0.5, "agent_dim": 32, "policy_lr": 3e-3,
                           "agent_workers": workers, **overrides})
    policy = build_policy(cfg, PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=100, seed=0))
    assert isinstance(policy, AHMPolicy) and policy.owns_optimizer
    return policy


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie waiting for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return all(_gone(pid) for pid in pids)


def test_shared_adam_matches_torch_adam() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen)
    ours = start.clone().share_memory_()
    ref = torch.nn.Parameter(start.clone())
    shared = SharedAdam([ours], lr=0.01)
    torch_adam = torch.optim.Adam([ref], lr=0.01)
    for _ in range(5):
        grad = torch.randn(5, 3, generator=gen)
        shared.step([grad])
        ref.grad = grad.clone()
        torch_adam.step()
    assert torch.allclose(ours, ref.detach(), atol=1e-6)
    assert int(shared.step_count) == 5 and shared.exp_avg[0].is_shared()


def test_async_state_round_trip_and_agent_stays_shared() -> None:
    policy = _async_policy()
    opt = policy.workers.optimizer
    for t in opt.exp_avg + opt.exp_avg_sq:
        t.uniform_()
    opt.step_count.fill_(17)
    policy.workers.dropped = 3
    buf = io.BytesIO()
    torch.save((policy.state_dict(), policy.extra_state()), buf)
    buf.seek(0)
    state, extra = torch.load(buf, weights_only=True)
    other = _async_policy()
    other.load_state_dict(state)
    other.load_extra_state(extra)
    assert other.workers.updates == 17 and other.workers.dropped == 3
    for a, b in zip(opt.exp_avg_sq, other.workers.optimizer.exp_avg_sq):
        assert torch.equal(a, b) and b.is_shared()
    assert all(p.is_shared() for p in other.agent.parameters())  # loading copies into shared memory
    other.to(torch.float64)  # the loop may move the policy: the global agent stays in CPU shared memory
    assert all(p.is_shared() and p.dtype == torch.float32 for p in other.agent.parameters())
    small = _async_policy(agent_dim=16)
    with pytest.raises(AhmError, match="optimiser state does not fit"):
        small.workers.load_state_dict(extra["a3c"])
    assert not policy.workers.started  # workers start on the first transition, not at construction
    for p in (policy, other, small):
        p.close()


@pytest.mark.slow
def test_async_agent_learns_planted_hard_patches_and_closes() -> None:
    policy = _async_policy(workers=2)
    gen = torch.Generator().manual_seed(1)
    history = []
    steps = 80
    try:
        for step in range(steps):
            progress = step / steps
            images, hardness = planted_batch(gen, 8)
            mask = policy.propose(images, progress)
            out = policy.observe(images, mask, toy_loss(hardness, mask, gen), progress)
            assert out.aux_loss is None  # A3C trains itself
            history.append(out.metrics)
            if step % 2 == 1:
                policy.flush(timeout=180)  # keeps the toy's updates in step with its pushes
        pids = policy.workers.pids
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
        assert policy.workers.updates == steps - int(history[-1]["transitions_dropped"])
    finally:
        policy.close()
    assert all(_gone(pid) for pid in pids)
    policy.close()  # twice is fine
    last = history[-25:]
    assert mean_metric(last, "hardness_ratio") > 2.0
    assert mean_metric(last, "critic_spearman") > 0.5
    assert any("agent_loss" in m for m in history)  # loss parts came back from the workers
    with pytest.raises(AhmError, match="stopped"):
        images, hardness = planted_batch(gen, 2)
        mask = policy.propose(images, 0.5)
        policy.observe(images, mask, toy_loss(hardness, mask, gen), 0.5)


@pytest.mark.slow
def test_crashing_worker_stops_every_worker_with_its_error() -> None:
    policy = _async_policy(workers=2)
    images, hardness = planted_batch(torch.Generator().manual_seed(0), 2)
    try:
        mask = policy.propose(images, 0.5)
        policy.observe(images, mask, toy_loss(hardness, mask, torch.Generator()), 0.5)
        pids = policy.workers.pids
        policy.workers.inject_fault("disk on fire")
        with pytest.raises(AhmError, match=r"A3C worker [01] failed: RuntimeError: disk on fire"):
            policy.flush(timeout=180)
        assert all(_gone(pid) for pid in pids)
        with pytest.raises(AhmError, match="disk on fire"):
            policy.propose(images, 0.5)
    finally:
        policy.close()


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from ahm.config import MaskingConfig
    from ahm.masking.base import PolicyContext, build_policy
    from ahm_toy import GRID, PATCH, planted_batch, toy_loss

    if __name__ == "__main__":
        torch.set_num_threads(1)
        cfg = MaskingConfig(policy="ahm", agent_dim=16, agent_workers=2)
        policy = build_policy(cfg, PolicyContext(grid=GRID, patch_size=PATCH, in_channels=1, total_steps=10))
        try:
            images, hardness = planted_batch(torch.Generator(), 2)
            mask = policy.propose(images, 0.5)
            policy.observe(images, mask, toy_loss(hardness, mask, torch.Generator()), 0.5)
            policy.flush(timeout=180)
            print(" ".join(str(pid) for pid in policy.workers.pids), flush=True)
            mode = sys.argv[1]
            if mode == "interrupt":
                os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C reaches the whole process group
                time.sleep(60)
            elif mode == "vanish":
                os._exit(3)  # the parent dies without any clean-up
            else:
                raise ValueError("the training loop failed")
        finally:
            policy.close()
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["error", "interrupt", "vanish"])
def test_no_worker_outlives_its_run(mode: str, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300,
                          env=env, start_new_session=True, check=False)
    assert proc.returncode != 0
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    if mode == "interrupt":
        assert "KeyboardInterrupt" in proc.stderr
    assert _wait_gone(pids), f"workers still running after the run ended ({mode})"
