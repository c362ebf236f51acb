"""The training engine: a pretraining step and a fine-tuning step, the bookkeeping after each, and the loops that
run them (in the manner of MAE's `engine_pretrain.train_one_epoch`).

Set-up (model, optimiser, loader, Fabric) is `ahm.train.pretrain` and `ahm.train.finetune`; what changes from
step to step is a `RunState`; checkpoints, logs, validation and the Ctrl-C stop are handlers called between steps.
A step that is neither logged, validated nor checkpointed reads nothing from the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ahm.config import FinetuneConfig, PretrainConfig
from ahm.errors import AhmError
from ahm.train.loop import (
    Interrupted,
    ProgressBar,
    StepGuard,
    Throughput,
    gather_objects,
    optimizer_step,
    read_scalars,
    stop_on_sigint,
    stop_requested,
)
from ahm.train.rundir import MetricsLog
from ahm.train.schedule import lr_factor, pretrained_lr_factor, set_lr
from ahm.train.state import Checkpoints, DeviceLoss, RunState


class TrainHook:
    """The engine's extension point: called on every rank with each pretraining batch and once with the summary,
    before it is written. Pass hooks to `pretrain(..., hooks=...)` or install them with `add_hook`; `--devices N`
    pickles them into the processes it spawns."""

    def on_batch(self, run: PretrainRun, batch: dict[str, Any]) -> None:
        """A batch as the loader gave it, before the step."""

    def on_end(self, run: PretrainRun, summary: dict[str, Any]) -> None:
        """The finished run; every rank calls it, so a hook may gather across ranks."""


_HOOKS: list[TrainHook] = []


def add_hook(hook: TrainHook) -> None:
    """Install `hook` for every later `pretrain` call in this process (e.g. a wrapper around the command line)."""
    _HOOKS.append(hook)


def installed_hooks() -> list[TrainHook]:
    return list(_HOOKS)


def slice_end(total: int, stop_at: int | None) -> int:
    """The step this call stops at: the run's end, or a time slice's (`stop_at`) with a checkpoint as a Ctrl-C."""
    return total if stop_at is None else min(total, stop_at)


def stop_if_requested(fabric, checkpoints: Checkpoints, state: RunState, sig: dict, cfg: Any, total: int,
                      out: Path, command: str) -> None:
    """After a step: a Ctrl-C (agreed by every rank) saves a checkpoint and ends the run with `Interrupted`."""
    if stop_requested(fabric, sig, state.step, cfg.train.log_every):
        checkpoints.save(state)
        raise Interrupted(f"interrupted at step {state.step}/{total}; checkpoint saved to {checkpoints.path}. "
                          f"Resume with: ahm {command} {cfg.data.path} --out {out} --resume")


# --- pretraining -------------------------------------------------------------------------------------------------


@dataclass
class PretrainRun:
    """What the pretraining steps read; built once by `ahm.train.pretrain`."""

    fabric: Any
    cfg: PretrainConfig
    out: Path
    model: nn.Module  # as Fabric set it up (DDP, compiled): the forward and backward
    raw_model: nn.Module  # the plain module: its parameters, checkpoints, export
    policy: Any
    optimizer: torch.optim.Optimizer
    policy_params: list[nn.Parameter]
    guard: StepGuard | None
    checkpoints: Checkpoints
    losses: DeviceLoss
    total: int
    end: int
    stages: list
    batches: Iterator | None
    log: MetricsLog | None
    bar: ProgressBar | None
    hooks: Sequence[TrainHook] = ()
    problems: list[str] = field(default_factory=list)  # unreadable files passed over (data.skip_bad)
    loader_workers: int = 0
    meter: Throughput = field(default_factory=Throughput)

    def close(self) -> None:
        self.batches = None  # stops the loader's workers
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


@dataclass
class PretrainStep:
    """What the bookkeeping after a pretraining step needs of it."""

    stage: Any
    lr: float
    logged: bool
    metrics: dict[str, Any]


def forward_step(model, policy, images: torch.Tensor, progress: float, trains_model: bool = True,
                 logged: bool = True):
    """One MIM step's forward: the policy proposes, the model reconstructs, the policy observes.

    Returns (total loss to backpropagate, MIMOutput, PolicyStep). Shared by the loop and `ahm bench speed`.
    `trains_model` False (a staged policy's frozen-model stage): the model runs without gradient, and the
    returned loss is only for logging (the policy learnt inside `observe_output`).
    `logged`: whether the caller logs this step; only then does the policy compute its diagnostics. The policy
    reads nothing from the device for them (`host_reads` off): its metrics may be tensors, for the caller to read
    (`read_scalars`), and a non-finite loss is the caller's to catch.
    """
    policy.host_reads = False
    policy.wants_metrics = logged
    mask = policy.propose(images, progress)
    with torch.set_grad_enabled(trains_model and torch.is_grad_enabled()):
        out = model(images, mask, num_masked=policy.num_masked(progress))
    pstep = policy.observe_output(images, mask, out, progress)
    loss = out.loss if pstep.aux_loss is None else out.loss + pstep.aux_loss
    return loss, out, pstep


def mean_over_ranks(fabric, keys: list[str], loss_total: float, loss_count: float,
                    values: list[float]) -> tuple[float, float, list[float]]:
    """A logged step's loss (pooled sum and count) and metrics (mean of the ranks where defined) over every rank,
    gathered as host numbers: the step reads the device for its log anyway, and ranks may differ in which
    metrics are defined."""
    if fabric.world_size == 1:
        return loss_total, loss_count, values
    shares = gather_objects(fabric, (loss_total, loss_count, dict(zip(keys, values))))
    pooled = []
    for key in keys:
        defined = [share[2][key] for share in shares if math.isfinite(share[2].get(key, math.nan))]
        pooled.append(float(np.mean(defined)) if defined else math.nan)
    return sum(share[0] for share in shares), sum(share[1] for share in shares), pooled


def run_pretraining(run: PretrainRun, state: RunState) -> None:
    """Step to the run's end (or its time slice's), then checkpoint; a Ctrl-C stops after a step with one."""
    with stop_on_sigint() as sig:
        while state.step < run.end:
            run.meter.start()
            batch = next_pretrain_batch(run, state)
            done = pretrain_step(run, state, batch)
            after_pretrain_step(run, state, done)
            stop_if_requested(run.fabric, run.checkpoints, state, sig, run.cfg, run.total, run.out, "pretrain")
    run.checkpoints.save(state)


def next_pretrain_batch(run: PretrainRun, state: RunState) -> dict[str, Any]:
    batch = next(run.batches)
    run.problems.extend(p for p in batch["problems"] if p not in run.problems)  # distinct files
    if batch["error"] is not None:
        raise AhmError(f"{batch['error']}; run stopped at step {state.step}. Last checkpoint: "
                       f"{run.checkpoints.last_good(state)} (set data.skip_bad to skip unreadable files)")
    for hook in run.hooks:
        hook.on_batch(run, batch)
    return batch


def pretrain_step(run: PretrainRun, state: RunState, batch: dict[str, Any]) -> PretrainStep:
    """The policy masks, the model reconstructs, the optimiser steps; the loss is summed on the device."""
    train = run.cfg.train
    images = batch["image"].to(run.fabric.device, non_blocking=True)
    # each stage starts its own warm-up and cosine (MAE's schedule per MIM stage); one stage: the run's
    stage = run.policy.stage_at(state.step)
    run.model.train(stage.trains_model)
    lr = set_lr(run.optimizer, lr_factor(state.step - stage.start, stage.steps, train.warmup_steps,
                                         train.min_lr / max(train.lr, 1e-12)))
    # a stage's last step is always logged, so every stage has final diagnostics in metrics.jsonl;
    # every rank computes them, and rank 0 logs their mean over the ranks
    logged = (state.step + 1) % train.log_every == 0 or state.step + 1 in (run.total, stage.end)
    loss, out, pstep = forward_step(run.model, run.policy, images, state.step / run.total, stage.trains_model,
                                    logged)
    bad = None
    if stage.trains_model:
        bad = optimizer_step(run.fabric, run.model, run.optimizer, loss, train, list(run.raw_model.parameters()),
                             run.checkpoints.stopped_by(state), extra_params=run.policy_params, guard=run.guard,
                             step=state.step)
        if bad is not None:
            state.skipped += 1
    else:  # a frozen-model stage has nothing to backpropagate (the policy stepped its own optimiser)
        run.optimizer.zero_grad(set_to_none=True)
    state.rate = run.meter.stop(len(batch["entry"]) * run.fabric.world_size)
    state.step += 1
    if bad is None:
        skipped = run.guard.last_bad if run.guard is not None and stage.trains_model else None
        state.recent_losses.append(run.losses.add(out.loss, skipped))
    metrics = {k: v for k, v in pstep.metrics.items() if v is not None} if bad is None else {}
    return PretrainStep(stage, lr, logged, metrics)


def after_pretrain_step(run: PretrainRun, state: RunState, done: PretrainStep) -> None:
    """Settle the NaN guard, log, move the bar, checkpoint."""
    train = run.cfg.train
    guarded = run.guard.state() if run.guard is not None else []
    # the device-side NaN guard is read where the step reads the device anyway: with the log, and before a
    # checkpoint (none is written after a bad step under nan_policy stop)
    if guarded and not done.logged and (state.step % train.checkpoint_every == 0 or state.step == run.end):
        state.skipped += run.guard.settle(read_scalars(guarded), train.nan_policy, run.checkpoints.stopped_by(state))
    if done.logged:
        log_pretrain_step(run, state, done, guarded)
    if run.bar is not None:
        run.bar.update(state.step, loss=state.last_loss, rate=state.rate)
    if state.step % train.checkpoint_every == 0 and state.step < run.total:
        run.checkpoints.save(state)


def log_pretrain_step(run: PretrainRun, state: RunState, done: PretrainStep, guarded: list[torch.Tensor]) -> None:
    """One read of the device for the loss since the last log, the guard and the policy's metrics; rank 0 logs
    their means over the ranks."""
    metrics = done.metrics
    loss_total, loss_count, *values = read_scalars([run.losses.total[0], run.losses.total[1], *guarded, *metrics.values()])
    if guarded:
        state.skipped += run.guard.settle(values[:len(guarded)], run.cfg.train.nan_policy,
                                          run.checkpoints.stopped_by(state))
        values = values[len(guarded):]
    run.losses.zero()
    loss_total, loss_count, values = mean_over_ranks(run.fabric, list(metrics), loss_total, loss_count, values)
    if run.log is None:
        return
    record: dict[str, Any] = {"step": state.step, "lr": done.lr, "images_per_s": state.rate}
    if len(run.stages) > 1:
        record["stage"] = run.stages.index(done.stage)
    mean_loss = loss_total / loss_count if loss_count else math.nan
    if math.isfinite(mean_loss):  # not when every step since the last log was skipped
        state.last_loss = record["loss"] = mean_loss
    for key, value in zip(metrics, values):
        if math.isfinite(value):  # NaN: undefined this step (e.g. a correlation over ties)
            record[key] = value
            state.window[key].append((state.step, value))
    if state.skipped:
        record["skipped_batches"] = state.skipped
    run.log.log(record)


# --- fine-tuning -------------------------------------------------------------------------------------------------


@dataclass
class FinetuneRun:
    """What the fine-tuning steps read; built once by `ahm.train.finetune`."""

    fabric: Any
    cfg: FinetuneConfig
    out: Path
    model: nn.Module  # as Fabric set it up (DDP, compiled)
    raw_model: nn.Module
    frozen: list[nn.Module]  # the frozen encoder's modules: they stay in eval mode
    optimizer: torch.optim.Optimizer
    guard: StepGuard | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    checkpoints: Checkpoints
    validate: Callable[[RunState, int], float]  # scores the validation set, keeps best.ckpt
    losses: DeviceLoss
    total: int
    steps_per_epoch: int
    val_every: int
    head_steps: int  # steps in which only the new layers train (LP-FT)
    loader: Any
    batches: Iterator | None
    log: MetricsLog | None
    bar: ProgressBar | None
    meter: Throughput = field(default_factory=Throughput)

    def close(self) -> None:
        self.batches = self.loader = None  # stops the loader's workers, also when the run stops with an exception
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Training mode, except for the frozen encoder: its normalisation statistics stay those it came with."""
    model.train()
    for module in frozen:
        module.eval()


def run_finetuning(run: FinetuneRun, state: RunState) -> None:
    """Step to the run's end, validating and checkpointing on the way; a Ctrl-C stops after a step with one."""
    with stop_on_sigint() as sig:
        while state.step < run.total:
            epoch = state.step // run.steps_per_epoch
            lr = finetune_step(run, state, next(run.batches))
            after_finetune_step(run, state, epoch, lr)
            stop_if_requested(run.fabric, run.checkpoints, state, sig, run.cfg, run.total, run.out, "finetune")


def finetune_step(run: FinetuneRun, state: RunState, batch: dict[str, Any]) -> float:
    """One supervised step on a batch of images and masks; the loss is summed on the device. Returns the lr."""
    train, device, step = run.cfg.train, run.fabric.device, state.step
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].unsqueeze(1).to(device, non_blocking=True)
    min_ratio = train.min_lr / max(train.lr, 1e-12)
    lr = set_lr(run.optimizer, lr_factor(step, run.total, train.warmup_steps, min_ratio),
                pretrained_lr_factor(step, run.total, train.warmup_steps, min_ratio, run.head_steps))
    run.meter.start()
    set_train_mode(run.model, run.frozen)
    loss = run.loss_fn(run.model(images), labels)
    bad = optimizer_step(run.fabric, run.model, run.optimizer, loss, train, list(run.raw_model.parameters()),
                         run.checkpoints.stopped_by(state), guard=run.guard, step=step)
    if bad is not None:
        state.skipped += 1
    else:
        run.losses.add(loss, run.guard.last_bad if run.guard is not None else None)
    state.rate = run.meter.stop(len(images) * run.fabric.world_size)
    state.step = step + 1
    return lr


def after_finetune_step(run: FinetuneRun, state: RunState, epoch: int, lr: float) -> None:
    """Log, validate (keeping the best checkpoint), checkpoint, move the bar."""
    train, step = run.cfg.train, state.step
    logged = step % train.log_every == 0 or step == run.total
    validated = step % run.val_every == 0 or step == run.total
    if logged or validated or step % train.checkpoint_every == 0:
        flush_loss(run, state)
    if run.log is not None and logged and state.log_loss[1]:
        run.log.log({"epoch": epoch + 1, "step": step, "loss": state.log_loss[0] / state.log_loss[1], "lr": lr,
                     "images_per_s": state.rate})
    if logged:
        state.log_loss = [0.0, 0.0]
    val_dice = None
    if validated:
        val_dice = run.validate(state, epoch + 1)
        if run.log is not None:
            run.log.log({"epoch": epoch + 1, "step": step, "train_loss": state.loss_sum / max(state.loss_n, 1),
                         "val_dice": val_dice, "lr": lr, "images_per_s": run.meter.median() or state.rate,
                         **({"skipped_batches": state.skipped} if state.skipped else {})})
        state.loss_sum, state.loss_n = 0.0, 0
        run.checkpoints.save(state)
    elif step % train.checkpoint_every == 0:
        run.checkpoints.save(state)
    if run.bar is not None:
        run.bar.update(step, loss=state.last_loss, val=None if val_dice is None else f"{val_dice:.3f}",
                       rate=state.rate)


def flush_loss(run: FinetuneRun, state: RunState) -> None:
    """The training loss summed on the device (and the guard's skipped steps) to the host, pooled over the ranks:
    the logged loss is over the global batch."""
    guarded = run.guard.state() if run.guard is not None else []
    total_loss, count, *rest = read_scalars([run.losses.total[0], run.losses.total[1], *guarded])
    run.losses.zero()
    if guarded:
        state.skipped += run.guard.settle(rest, run.cfg.train.nan_policy, run.checkpoints.stopped_by(state))
    if run.fabric.world_size > 1:
        shares = gather_objects(run.fabric, (total_loss, count))
        total_loss, count = sum(s[0] for s in shares), sum(s[1] for s in shares)
    state.log_loss[0] += total_loss
    state.log_loss[1] += count
    state.loss_sum += total_loss
    state.loss_n += count
    if count:
        state.last_loss = total_loss / count
