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


def set_lr(optimizer, factor: float, pretrained_factor: float | None = None) -> float:
    """Apply `factor` to every group's `base_lr` (set when the optimiser is built), or `pretrained_factor` to the
    groups marked `"pretrained": True` when it is given; returns the lr of the first group on `factor`."""
    shown = None
    for group in optimizer.param_groups:
        own = pretrained_factor is not None and group.get("pretrained")
        group["lr"] = group.setdefault("base_lr", group["lr"]) * (pretrained_factor if own else factor)
        if shown is None and not own:
            shown = group["lr"]
    return optimizer.param_groups[0]["lr"] if shown is None else shown


def pretrained_lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float,
                         head_steps: int) -> float | None:
    """Multiplier on pretrained weights when only the new layers train for the first `head_steps` steps
    (linear probing, then fine-tuning): 0 until then, then its own warm-up and cosine over the steps left.
    None when `head_steps` is 0 (pretrained weights follow the common schedule)."""
    if head_steps <= 0:
        return None
    if step < head_steps:
        return 0.0
    return lr_factor(step - head_steps, total_steps - head_steps, warmup_steps, min_ratio)
