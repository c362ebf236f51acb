"""`python -m ahm` with the `RankEvidence` hook installed: what tests/train/test_torchrun.py runs under torchrun, so
that each rank's pretraining leaves the evidence of DDP semantics the test reads."""

from train_helpers import RankEvidence

from ahm.cli import main
from ahm.train.engine import add_hook

add_hook(RankEvidence())
main()
