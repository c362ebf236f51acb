"""Pieces every training loop here shares: Fabric set-up and launch, seeded batch order, interruption, the
backward/NaN-check/clip/step block, the progress bar."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ahm.config import TrainConfig
from ahm.errors import AhmError


class Interrupted(AhmError):
    """Ctrl-C: the run stopped after its current step and saved a checkpoint."""

    exit_code = 130


class NonFiniteLoss(AhmError):
    """A NaN or infinite loss/gradient stopped the run."""


def make_fabric(train: TrainConfig):
    """Lightning Fabric for the configured accelerator, devices and precision (DDP when devices > 1 or torchrun)."""
    from lightning.fabric import Fabric

    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    under_torchrun = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    devices, num_nodes = train.devices, 1
    if under_torchrun:
        # torchrun decides: LOCAL_WORLD_SIZE processes on each of WORLD_SIZE / LOCAL_WORLD_SIZE nodes.
        world = int(os.environ["WORLD_SIZE"])
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        num_nodes = max(1, world // max(devices, 1))
    strategy = "auto"
    if devices * num_nodes > 1:
        strategy = "ddp" if under_torchrun else "ddp_spawn"
    precision = "32-true" if train.precision == "32" else train.precision
    if precision == "16-mixed" and accelerator == "cpu":
        raise AhmError("--precision 16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true")
    if train.sync_batchnorm and devices * num_nodes > 1 and accelerator == "cpu":
        raise AhmError("train.sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only; on the CPU leave it unset "
                       "(each process then normalises its own batch)")
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        precision=precision)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise AhmError(f"--accelerator/--devices/--precision: {str(exc).splitlines()[0]}") from exc
    if fabric.device.type == "cuda":
        # process-wide settings, recorded in the run's config as train.tf32 and train.cudnn_benchmark
        torch.set_float32_matmul_precision("high" if train.tf32 else "highest")
        torch.backends.cudnn.benchmark = train.cudnn_benchmark
    return fabric


def sync_batchnorm(fabric, model: nn.Module, train: TrainConfig) -> nn.Module:
    """Under DDP on a GPU (or when asked), batch-norm layers become SyncBatchNorm: statistics over the global
    batch, as one process would compute them. The state-dict keys stay the same."""
    wanted = train.sync_batchnorm if train.sync_batchnorm is not None else (
        fabric.world_size > 1 and fabric.device.type != "cpu")
    if not wanted or fabric.world_size == 1:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def epoch_permutation(num_items: int, epoch: int, seed: int) -> list[int]:
    """The order of `num_items` items in one epoch: a permutation seeded by (seed, epoch) only."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)
    return torch.randperm(num_items, generator=g).tolist()


def batch_order(num_items: int, epoch: int, seed: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The batches of one epoch for one rank: a permutation seeded by (seed, epoch), sharded by rank, last partial dropped."""
    perm = epoch_permutation(num_items, epoch, seed)
    per_step = batch_size * world_size
    batches = []
    for start in range(0, num_items - per_step + 1, per_step):
        chunk = perm[start:start + per_step]
        batches.append(chunk[rank * batch_size:(rank + 1) * batch_size])
    return batches


class ShuffledItems:
    """`num_items` items in the order of `batch_order`, as the epoch plan `ahm.data.corpus.StepBatches` reads it:
    the step batches it plans are those of `batch_order`, so a loader over them trains exactly like the loop
    that called `batch_order` itself."""

    def __init__(self, num_items: int, draws: int | None = None) -> None:
        self.num_items = int(num_items)
        # `draws`: an epoch of that many items, permutations chained (crops drawn with replacement, 3D)
        self.epoch_size = int(draws) if draws else self.num_items

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        if self.epoch_size == self.num_items:
            return epoch_permutation(self.num_items, epoch, seed)
        rounds = -(-self.epoch_size // self.num_items)
        order = [k for r in range(rounds) for k in epoch_permutation(self.num_items, epoch * rounds + r, seed)]
        return order[:self.epoch_size]

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return self.epoch_size // (batch_size * world_size)


def adamw_kernel(model) -> dict[str, bool]:
    """AdamW's fastest exact implementation for where the model lives: `fused` (one kernel for every tensor;
    3.7% of a CPU MAE step over `foreach`, which itself saved about 9% over the per-parameter loop) on CPU and
    CUDA, `foreach` elsewhere."""
    kinds = {p.device.type for p in model.parameters()}
    return {"fused": True} if kinds <= {"cpu", "cuda"} else {"foreach": True}


def read_scalars(values: list) -> list[float]:
    """Floats of numbers and 0-d tensors, the tensors of each device read in one transfer: a read waits for all
    the work queued on the device, so a logged step pays for one."""
    floats = [None if isinstance(v, torch.Tensor) else float(v) for v in values]
    on_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            on_device[value.device].append(i)
    for device, where in on_device.items():
        exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        read = torch.stack([values[i].detach().reshape(()).to(exact) for i in where]).tolist()
        for i, value in zip(where, read):
            floats[i] = value
    return floats


def decay_param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings and tokens (1-D or named *_embed*/token)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or "embed" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "base_lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0})
    return groups


def all_reduce_grads(fabric, params: list[nn.Parameter]) -> None:
    """Mean-reduce gradients of parameters that DDP does not wrap (the masking policy's), in one collective."""
    if fabric.world_size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = fabric.all_reduce(flat, reduce_op="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


@contextmanager
def stop_on_sigint() -> Iterator[dict]:
    """Turn the first Ctrl-C into a flag the loop checks after each step; a second one interrupts at once."""
    state = {"stop": False}
    previous = None

    def handler(signum, frame):
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not in the main thread (e.g. a spawned DDP worker): leave default handling
        previous = None
    try:
        yield state
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def stop_requested(fabric, sig: dict, step: int, every: int) -> bool:
    """Whether the run stops after `step`: the Ctrl-C flag of `stop_on_sigint`, agreed by every rank under DDP (a
    rank that stopped alone would leave the others waiting in a collective). The agreement is one small all-reduce
    on every `every`-th step (the logging steps), so a stop under DDP waits for the next of those."""
    if fabric.world_size == 1:
        return bool(sig["stop"])
    if step % every:
        return False
    flag = torch.tensor([1.0 if sig["stop"] else 0.0], device=fabric.device)
    return bool(fabric.all_reduce(flag, reduce_op="sum").item() > 0)


class Throughput:
    """Images/s over recent steps; the median of per-step rates after a warm-up is the reported figure."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.rates: list[float] = []
        self._t: float | None = None
        self._seen = 0

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, images: int) -> float:
        assert self._t is not None
        dt = max(time.perf_counter() - self._t, 1e-9)
        rate = images / dt
        self._seen += 1
        if self._seen > self.warmup:
            self.rates.append(rate)
        return rate

    def median(self) -> float:
        if not self.rates:
            return 0.0
        s = sorted(self.rates)
        return s[len(s) // 2]


def grads_finite(params: list[nn.Parameter]) -> bool:
    """True if no gradient holds inf or NaN (one device sync for all of them)."""
    peaks = [p.grad.detach().abs().amax() for p in params if p.grad is not None and p.grad.numel()]
    if not peaks:
        return True
    return bool(torch.isfinite(torch.stack([x.float() for x in peaks])).all())


def nonfinite_loss_reason(fabric, loss: torch.Tensor) -> str | None:
    """Why this step's loss must not be backpropagated (None if it may), agreed across all ranks.

    Every rank must take the same branch, or the others wait forever in backward's all-reduce.
    """
    bad = None if bool(torch.isfinite(loss.detach()).all()) else f"the loss is {float(loss.detach())}"
    if fabric.world_size > 1:
        flag = fabric.all_reduce(torch.tensor(float(bad is not None), device=fabric.device), reduce_op="sum")
        if bad is None and float(flag) > 0:
            bad = "the loss is not finite on another device"
    return bad


def gather_objects(fabric, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` in one process. For results of
    uneven size (a rank's share of the validation cases), which `fabric.all_gather` of tensors cannot take."""
    if fabric.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def launch_rank() -> int:
    """This process's global rank before `launch`: torchrun's RANK, else 0 (one process, or the parent that
    spawns the processes of --devices N after it has made the run directory)."""
    return int(os.environ.get("RANK", 0)) if "LOCAL_RANK" in os.environ else 0


def launch(fabric, run: Callable[..., Any], *args: Any) -> Any:
    """`run(fabric, *args)` on every device; rank 0's result comes back.

    --devices N without torchrun: Fabric spawns N processes that each run it, and a failure in one of them
    becomes one AhmError line. Under torchrun (or on one device) this process is its rank and runs it itself.
    """
    if fabric.world_size > 1 and "LOCAL_RANK" not in os.environ:
        try:
            return fabric.launch(run, *args)
        except torch.multiprocessing.ProcessRaisedException as exc:
            last = [ln for ln in str(exc).strip().splitlines() if ln.strip()][-1]
            raise AhmError(f"rank {exc.error_index}: {last}") from exc
    fabric.launch()
    return run(fabric, *args)


class StepGuard:
    """The NaN/inf safety net of `optimizer_step` without a host read per step.

    A fused AdamW skips a step on the device when its `found_inf` flag is set (the mechanism PyTorch's GradScaler
    uses): the weights, moments and step count stay as they were. The guard sets that flag from the step's loss and
    gradients, and keeps on the device how many steps were skipped and the first of them (its loss, and whether only
    a gradient was at fault). `read` brings that to the host: the loop calls it on the steps that read the device
    anyway (logging, checkpoints), where train.nan_policy stop ends the run naming the first bad step."""

    def __init__(self, device: torch.device) -> None:
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.first_grads_only = torch.zeros((), dtype=torch.bool, device=device)
        self.last_bad = torch.zeros((), dtype=torch.bool, device=device)

    @staticmethod
    def usable(optimizer: torch.optim.Optimizer, train: TrainConfig) -> bool:
        """Fused AdamW takes `found_inf`; 16-mixed has its own grad scaler, which sets that flag itself."""
        inner = getattr(optimizer, "optimizer", optimizer)
        return (train.precision != "16-mixed" and isinstance(inner, torch.optim.AdamW)
                and all(group.get("fused") for group in inner.param_groups))

    def note(self, step: int, bad_loss: torch.Tensor, bad: torch.Tensor, loss: torch.Tensor) -> None:
        take = bad & (self.first < 0)
        self.first = torch.where(take, step, self.first)
        self.first_loss = torch.where(take, loss.detach().float(), self.first_loss)
        self.first_grads_only = torch.where(take, ~bad_loss, self.first_grads_only)
        self.skipped += bad
        self.last_bad = bad

    def state(self) -> list[torch.Tensor]:
        """What `settle` reads, as tensors, so that a logged step reads them with its loss in one transfer."""
        return [self.skipped, self.first, self.first_loss, self.first_grads_only]

    def settle(self, read: Sequence[float], nan_policy: str, stopped: Callable[..., str]) -> int:
        """From the host values of `state()`: the steps skipped since the last settle; with nan_policy stop,
        NonFiniteLoss naming the first of them (`stopped(why, at=step)`)."""
        skipped, first, loss, grads_only = read
        if not skipped:
            return 0
        why = f"the loss is {loss:.4g} but a gradient is not finite" if grads_only else f"the loss is {loss}"
        if nan_policy != "skip":
            raise NonFiniteLoss(stopped(why, at=int(first)))
        self.skipped.zero_()
        self.first.fill_(-1)
        return int(skipped)


def grads_all_finite(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """A 0-d bool on the device: no gradient holds inf or NaN."""
    peaks = [p.grad.detach().abs().amax().float() for p in params if p.grad is not None and p.grad.numel()]
    if not peaks:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(peaks)).all()


def optimizer_step(fabric, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   train: TrainConfig, params: Sequence[nn.Parameter], stopped: Callable[[str], str],
                   extra_params: Sequence[nn.Parameter] = (), guard: StepGuard | None = None,
                   step: int = 0) -> str | None:
    """Backpropagate `loss` and step, unless the loss or a gradient is not finite.

    `params`: the model's own parameters (checked for finite gradients); `extra_params`: parameters DDP does not
    wrap (a masking policy's), whose gradients are all-reduced and clipped here. Returns None after a step, or
    why the batch was skipped (train.nan_policy skip); otherwise raises NonFiniteLoss(`stopped(reason)`).
    With a `guard`, the check and the skip happen on the device (see `StepGuard`) and None is returned.
    """
    if guard is not None:
        return _guarded_step(fabric, model, optimizer, loss, train, params, extra_params, guard, step)
    optimizer.zero_grad(set_to_none=True)
    bad = nonfinite_loss_reason(fabric, loss)
    if bad is None:
        fabric.backward(loss)
        all_reduce_grads(fabric, list(extra_params))
        # A finite loss with inf/NaN gradients would poison the weights and every later checkpoint.
        # (16-mixed is exempt: its grad scaler expects inf gradients now and then and skips those steps.)
        if train.precision != "16-mixed" and not grads_finite(list(params) + list(extra_params)):
            bad = f"the loss is {float(loss.detach()):.4g} but a gradient is not finite"
    if bad is not None:
        if train.nan_policy != "skip":
            raise NonFiniteLoss(stopped(bad))
        optimizer.zero_grad(set_to_none=True)
        return bad
    if train.clip_grad > 0:
        fabric.clip_gradients(model, optimizer, max_norm=train.clip_grad, error_if_nonfinite=False)
        if extra_params:
            torch.nn.utils.clip_grad_norm_(list(extra_params), train.clip_grad)
    optimizer.step()
    return None


def _guarded_step(fabric, model, optimizer, loss, train, params, extra_params, guard: StepGuard, step: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    # every rank backpropagates, finite or not (the same branch on every rank); a bad step is skipped below
    fabric.backward(loss)
    all_reduce_grads(fabric, list(extra_params))
    bad_loss = ~torch.isfinite(loss.detach()).all()
    bad = bad_loss | ~grads_all_finite(list(params) + list(extra_params)).to(bad_loss.device)
    if fabric.world_size > 1:  # skipped on every rank if on any
        bad = fabric.all_reduce(bad.float(), reduce_op="sum") > 0
    if train.clip_grad > 0:
        fabric.clip_gradients(model, optimizer, max_norm=train.clip_grad, error_if_nonfinite=False)
        if extra_params:
            torch.nn.utils.clip_grad_norm_(list(extra_params), train.clip_grad)
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = bad.float()
    try:
        optimizer.step()
    finally:
        del inner.found_inf
    guard.note(step, bad_loss, bad, loss)


class ProgressBar:
    """A rich progress bar over training steps: label, bar, step/total, the given fields, ETA.

    `fields`: (name, column template such as "loss {task.fields[loss]:.4f}", initial value), in column order.
    """

    def __init__(self, label: str, total: int, start: int, fields: Sequence[tuple[str, str, Any]]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            *(TextColumn(template) for _, template, _ in fields), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(label, total=total, completed=start,
                                           **{name: initial for name, _, initial in fields})
        self.progress.start()

    def update(self, step: int, **fields: Any) -> None:
        """Move to `step`; a field given as None keeps its last value."""
        self.progress.update(self.task, completed=step, **{k: v for k, v in fields.items() if v is not None})

    def note(self, **fields: Any) -> None:
        """Show `fields` without moving the bar (what a long pause between steps is doing)."""
        self.progress.update(self.task, **fields)

    def close(self) -> None:
        self.progress.stop()


def progress_bar(enabled: bool, label: str, total: int, start: int,
                 fields: Sequence[tuple[str, str, Any]]) -> ProgressBar | None:
    """A `ProgressBar`, or None when disabled (quiet, or not rank 0)."""
    return ProgressBar(label, total, start, fields) if enabled else None
