"""Gumbel-top-k sampling and the exact Plackett-Luce log-probability of the AHM actor."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ahm.masking.ahm.policy import row_spearman
from ahm.masking.ahm.sampling import gumbel_noise, gumbel_topk, plackett_luce_log_prob, plackett_luce_steps
from ahm.masking.base import spearman


def _brute_force(logits: list[float], draw: tuple[int, ...], tau: float) -> float:
    weights = [math.exp(z / tau) for z in logits]
    prob, pool = 1.0, set(range(len(logits)))
    for i in draw:
        prob *= weights[i] / sum(weights[m] for m in pool)
        pool.remove(i)
    return prob


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("length,k", [(4, 2), (5, 3)])
def test_plackett_luce_matches_enumeration(length: int, k: int, tau: float) -> None:
    logits = [1.0, 0.0, -0.5, 2.0, 0.3][:length]
    draws = list(itertools.permutations(range(length), k))
    idx = torch.tensor(draws)
    z = torch.tensor([logits] * len(draws))
    logp = plackett_luce_log_prob(z, idx, tau)
    probs = logp.exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    for draw, p in zip(draws, probs.tolist()):
        assert p == pytest.approx(_brute_force(logits, draw, tau), rel=1e-5)


def test_plackett_luce_pools_are_renormalised_and_differentiable() -> None:
    z = torch.randn(3, 6, requires_grad=True)
    idx = torch.tensor([[0, 1], [5, 2], [3, 4]])
    step_logp, pools = plackett_luce_steps(z, idx)
    assert torch.allclose(pools.sum(-1), torch.ones(3, 2))
    assert float(pools[0, 1, 0].detach()) == 0.0  # the first draw leaves the pool of the second
    step_logp.sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())


def test_gumbel_topk_frequencies_follow_plackett_luce() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    n = 40_000
    gen = torch.Generator().manual_seed(123)
    z = logits.expand(n, 4)
    idx = gumbel_topk(z, 2, gumbel_noise((n, 4), gen), temperature=0.7)
    counts: dict[tuple[int, int], int] = {}
    for a, b in idx.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    for draw in itertools.permutations(range(4), 2):
        expected = _brute_force(logits.tolist(), draw, 0.7)
        assert counts.get(draw, 0) / n == pytest.approx(expected, abs=0.01), draw


def test_gumbel_topk_zero_and_reproducible() -> None:
    z = torch.randn(2, 8)
    assert gumbel_topk(z, 0, gumbel_noise((2, 8), None)).shape == (2, 0)
    a = gumbel_topk(z, 3, gumbel_noise((2, 8), torch.Generator().manual_seed(5)))
    b = gumbel_topk(z, 3, gumbel_noise((2, 8), torch.Generator().manual_seed(5)))
    assert torch.equal(a, b)
    assert all(len(set(row)) == 3 for row in a.tolist())


def test_row_spearman_matches_base_spearman() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, generator=gen)
    b = a + 0.8 * torch.randn(5, 12, generator=gen)
    rho = row_spearman(a, b)
    for i in range(5):
        assert float(rho[i]) == pytest.approx(spearman(a[i], b[i]), abs=1e-9)
    assert float(row_spearman(a, a)[0]) == pytest.approx(1.0)
