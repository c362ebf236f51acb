"""Learning-rate schedule shared by pretraining and fine-tuning: linear warm-up, then cosine to min_lr."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier on each param group's base lr at `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, factor: float) -> float:
    """Apply `factor` to every group's `base_lr` (set when the optimiser is built); returns the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
    return optimizer.param_groups[0]["lr"]
