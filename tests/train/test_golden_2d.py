"""2D training is pinned: the first 20 logged losses of seeded pretraining and fine-tuning runs, recorded before
the backbone / patch-grid refactor of issue 16, must come out the same (float tolerance for reordered sums)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_runs import GOLDEN, STEPS, run_all


@pytest.fixture(scope="module")
def losses(tmp_path_factory) -> dict[str, list[float]]:
    return run_all(tmp_path_factory.mktemp("golden"))


def test_golden_losses_unchanged(losses: dict[str, list[float]]) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert set(losses) == set(golden)
    for name, expected in golden.items():
        assert len(expected) == STEPS, name
        np.testing.assert_allclose(losses[name], expected, rtol=2e-4, atol=1e-6, err_msg=name)
