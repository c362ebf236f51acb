"""What a training run carries from one step to the next, and the small handlers the engine calls between steps:
checkpoints, the device-side loss sum, the log window."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ahm.errors import AhmError
from ahm.train.checkpoint import save_checkpoint

# the fine-tuning checkpoint's "state" entry: RunState field -> key in last.ckpt
FINETUNE_STATE_KEYS = {"step": "step", "best_score": "best_val_dice", "best_epoch": "best_epoch",
                       "skipped": "skipped", "loss_sum": "loss_sum", "loss_n": "loss_n"}


@dataclass
class RunState:
    """The counters a run changes as it steps; a checkpoint keeps what a resume needs of them."""

    step: int = 0
    skipped: int = 0  # batches skipped under train.nan_policy skip, over the whole run
    saved_step: int | None = None  # the step the checkpoint on disk holds (None: none written yet)
    last_loss: float = math.nan  # the latest logged mean loss: progress bar, and a summary without a window
    rate: float = 0.0  # images/s of the latest step
    # fine-tuning: the best validation figure so far, and the training loss since the last validation
    best_score: float = -1.0
    best_epoch: int = 0
    loss_sum: float = 0.0
    loss_n: float = 0
    # fine-tuning: the pooled training loss since the last log line ([sum, count])
    log_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # pretraining: (step, value) of each metric's recent logs, and this run's recent step losses (on the device)
    window: dict[str, deque] = field(default_factory=dict)
    recent_losses: deque = field(default_factory=deque)

    def finetune_record(self) -> dict[str, Any]:
        """The `state` entry of a fine-tuning last.ckpt."""
        return {key: getattr(self, name) for name, key in FINETUNE_STATE_KEYS.items()}

    def restore_finetune(self, record: dict[str, Any]) -> None:
        for name, key in FINETUNE_STATE_KEYS.items():
            setattr(self, name, record[key])


class DeviceLoss:
    """Step losses summed on the device as [sum, count], so a step that is not logged reads nothing; a step that
    does read the device (log, validation, checkpoint) takes the sum with its other reads."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.total = torch.zeros(2, dtype=dtype, device=device)

    def add(self, loss: torch.Tensor, skipped: torch.Tensor | None = None) -> torch.Tensor:
        """Add a finite loss (one the guard did not skip); returns it as kept, NaN where it was not."""
        value = loss.detach().to(self.dtype)
        kept = torch.isfinite(value)
        if skipped is not None:  # a step the guard skipped is not a loss to log
            kept = kept & ~skipped
        self.total += torch.stack([torch.where(kept, value, 0.0), kept.to(self.dtype)])
        return torch.where(kept, value, torch.nan)

    def zero(self) -> None:
        self.total.zero_()


@dataclass
class Checkpoints:
    """Writes last.ckpt on the main rank and says which step a stopped run can continue from."""

    path: Path
    kind: str  # "pretrain" or "finetune"
    payload: Callable[[RunState], dict[str, Any]]
    enabled: bool  # global rank 0 writes; the other ranks hold the same weights
    nan_hint: str
    names_step: bool = True  # messages name the step the checkpoint holds
    explains_failure: bool = True  # a failed write says which checkpoint is kept

    def save(self, state: RunState) -> None:
        if not self.enabled:
            return
        try:
            save_checkpoint(self.path, self.kind, self.payload(state))
        except AhmError as exc:
            if not self.explains_failure:
                raise
            # disk full, quota: atomic_write kept the old file; say which step it holds
            reason = getattr(exc.__cause__, "strerror", None) or str(exc)
            kept = (f"the previous checkpoint (step {state.saved_step}) is kept" if state.saved_step is not None
                    else "no checkpoint was written yet")
            raise AhmError(f"{self.path}: could not save the checkpoint of step {state.step} ({reason}); "
                           f"{kept}; run stopped, continue with --resume once there is room") from exc
        state.saved_step = state.step

    def last_good(self, state: RunState) -> str:
        if not self.names_step:
            return str(self.path) if self.path.is_file() else "none yet"
        if state.saved_step is not None and self.path.is_file():
            return f"{self.path} (step {state.saved_step})"
        return "none yet"

    def stopped_by(self, state: RunState) -> Callable[..., str]:
        """The message of a run stopped by a non-finite loss, for `optimizer_step` and `StepGuard.settle`."""

        def message(bad: str, at: int | None = None) -> str:
            return (f"step {state.step + 1 if at is None else at + 1}: {bad}; run stopped. Last good checkpoint: "
                    f"{self.last_good(state)} ({self.nan_hint})")

        return message


def metric_window(size: int) -> Callable[[], deque]:
    """A factory of (step, value) windows for `collections.defaultdict`, each keeping the last `size`."""
    return lambda: deque(maxlen=size)
