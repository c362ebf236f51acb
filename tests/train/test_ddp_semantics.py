"""What several processes must agree on: when to stop after Ctrl-C, what every rank gathers."""

from __future__ import annotations

import pytest


def _stop_steps(fabric) -> list[int]:
    from ahm.train.loop import gather_objects, stop_requested

    # only rank 0 was interrupted, after step 3: every rank must stop after the same step, the next agreed one
    stops = [step for step in range(1, 9)
             if stop_requested(fabric, {"stop": fabric.global_rank == 0 and step >= 3}, step, every=2)]
    return gather_objects(fabric, (fabric.global_rank, stops[:1]))


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step() -> None:
    from lightning.fabric import Fabric

    got = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_stop_steps)
    assert got == [(0, [4]), (1, [4])]


def test_one_process_stops_at_once() -> None:
    from types import SimpleNamespace

    from ahm.train.loop import stop_requested

    fabric = SimpleNamespace(world_size=1)
    assert stop_requested(fabric, {"stop": True}, 3, every=10)
    assert not stop_requested(fabric, {"stop": False}, 10, every=10)


def test_a_logged_step_pools_the_loss_and_averages_the_metrics_over_ranks(monkeypatch) -> None:
    import math
    from types import SimpleNamespace

    import ahm.train.engine as engine

    shares = [(3.0, 2.0, {"hardness_ratio": 1.5, "critic_spearman": math.nan}),  # rank 0: two steps' losses
              (1.0, 1.0, {"hardness_ratio": 2.5, "critic_spearman": 0.4})]  # rank 1: one (one skipped)
    monkeypatch.setattr(engine, "gather_objects", lambda fabric, obj: shares)
    total, count, values = engine.mean_over_ranks(SimpleNamespace(world_size=2), ["hardness_ratio", "critic_spearman"],
                                               3.0, 2.0, [1.5, math.nan])
    assert (total, count) == (4.0, 3.0)  # the mean loss is over steps, 4/3, not the mean of the ranks' means
    assert values == [2.0, 0.4]  # a metric undefined on one rank is the mean of the others
    one = engine.mean_over_ranks(SimpleNamespace(world_size=1), ["x"], 1.0, 1.0, [0.5])
    assert one == (1.0, 1.0, [0.5])
