"""Shared test set-up: one thread per test process (the machine has 2 cores), bounded hypothesis runs."""

from __future__ import annotations

import os
import signal

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("AHM_TEST", "1")

# A shell that starts a command in the background (`make test &`, nohup, some CI runners) makes it ignore
# SIGINT, and Python then never installs its Ctrl-C handler; the tests that send SIGINT to a run (in this
# process or in a child, which inherits the ignore) need the terminal's normal behaviour back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
    )
    settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("AHM_FUZZ_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def rng() -> object:
    import numpy as np

    return np.random.default_rng(0)
