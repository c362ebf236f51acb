"""Masked-image-modeling pretraining on Lightning Fabric, driven by any masking policy.

The loop never branches on a policy's name: `propose` -> model -> `observe` (see ahm.masking.base).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ahm import __version__
from ahm.config import PretrainConfig, load_config, save_config
from ahm.errors import AhmError
from ahm.io import load_torch, save_safetensors, save_torch, write_json
from ahm.masking import PolicyContext, build_policy
from ahm.train.loop import (
    Interrupted,
    NonFiniteLoss,
    Throughput,
    all_reduce_grads,
    batch_order,
    decay_param_groups,
    grads_finite,
    make_fabric,
    nonfinite_loss_reason,
    restore_state,
    stop_on_sigint,
)
from ahm.train.rundir import CHECKPOINT_DIR, LAST, MetricsLog, prepare_run_dir, read_metrics, unstarted_run
from ahm.train.schedule import lr_factor, set_lr

SUMMARY_WINDOW = 50


def load_pretrain_data(cfg: PretrainConfig, progress: bool = False):
    """The training split's images as normalised arrays (labels are not needed), plus the splits."""
    from ahm.data import load_arrays, make_splits, open_dataset

    if not cfg.data.path:
        raise AhmError("DATA: no dataset path given")
    index = open_dataset(cfg.data.path, cfg.data)
    splits = make_splits(index, cfg.data)
    train_ids = splits["train"]
    if not train_ids:
        raise AhmError(f"{cfg.data.path}: no training images after splitting")
    arrays = load_arrays(index, train_ids, cfg.data, labels=False)
    return arrays, splits, index


def forward_step(model, policy, images: torch.Tensor, progress: float):
    """One MIM step's forward: the policy proposes, the model reconstructs, the policy observes.

    Returns (total loss to backpropagate, MIMOutput, PolicyStep). Shared by the loop and `ahm bench speed`.
    """
    mask = policy.propose(images, progress)
    out = model(images, mask)
    pstep = policy.observe(images, mask, out.per_patch_loss.detach().float(), progress)
    loss = out.loss if pstep.aux_loss is None else out.loss + pstep.aux_loss
    return loss, out, pstep


def build_optimizer(model, policy, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, list]:
    """AdamW over the model (decay groups) and, unless the policy trains itself, the policy's parameters."""
    groups = decay_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    policy_params = [p for p in policy.parameters() if p.requires_grad] if not policy.owns_optimizer else []
    if policy_params:
        groups.append({"params": policy_params, "lr": cfg.masking.policy_lr, "base_lr": cfg.masking.policy_lr,
                       "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), **adamw_kernel(model)), policy_params


def adamw_kernel(model) -> dict[str, bool]:
    """AdamW's fastest exact implementation for where the model lives: `fused` (one kernel for every tensor;
    3.7% of a CPU MAE step over `foreach`, which itself saved about 9% over the per-parameter loop) on CPU and
    CUDA, `foreach` elsewhere."""
    kinds = {p.device.type for p in model.parameters()}
    return {"fused": True} if kinds <= {"cpu", "cuda"} else {"foreach": True}


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / LAST


def _load_checkpoint(run_dir: Path) -> dict[str, Any]:
    ckpt = load_torch(_checkpoint_path(run_dir))
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "pretrain" or "model" not in ckpt:
        raise AhmError(f"{_checkpoint_path(run_dir)}: not an ahm pretraining checkpoint")
    return ckpt


def check_config(cfg: PretrainConfig) -> None:
    """Refuse what can be refused before any work starts or any file is written."""
    from ahm.masking.base import policy_names

    if cfg.masking.policy not in policy_names():
        raise AhmError(f"--policy: unknown masking policy {cfg.masking.policy!r}; choose one of {', '.join(policy_names())}")
    if cfg.model.backbone == "vit":
        cfg.model.vit_dims()
    if not cfg.data.path:
        raise AhmError("DATA: no dataset path given")
    if not Path(cfg.data.path).exists():
        raise AhmError(f"{cfg.data.path}: dataset folder not found")


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, force: bool = False,
             progress: bool = True, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) pretraining into run directory `out`; returns the summary written to summary.json.

    `stop_at`: end this session after that many steps with a checkpoint, as an interruption would (time-sliced jobs).
    """
    out = Path(out)
    check_config(cfg)
    restart = resume and unstarted_run(out, "pretrain")
    if resume:
        # The run's own config decides everything but its length.
        saved = out / "config.yaml"
        if saved.is_file():
            steps = cfg.train.steps
            cfg = load_config(PretrainConfig, saved)
            if steps is not None and steps != cfg.train.steps:
                cfg.train.steps = steps
        elif not restart:  # killed before config.yaml was written: the options given now are the run's
            raise AhmError(f"--resume: {saved} not found")
    fabric = make_fabric(cfg.train)  # an unusable accelerator/precision is refused before the run dir is made
    prepare_run_dir(out, "pretrain", cfg.train.seed, resume=resume, force=force)
    if restart:
        resume = False  # killed before its first checkpoint: start again from step 0 in the same folder
    if not resume:
        save_config(cfg, out / "config.yaml")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    if fabric.world_size > 1 and "LOCAL_RANK" not in os.environ:
        # --devices N without torchrun: spawn N processes that each run the loop; rank 0's summary comes back.
        try:
            return fabric.launch(_run, cfg, out, resume, progress, stop_at)
        except torch.multiprocessing.ProcessRaisedException as exc:
            last = [ln for ln in str(exc).strip().splitlines() if ln.strip()][-1]
            raise AhmError(f"a DDP process failed: {last}") from exc
    fabric.launch()
    return _run(fabric, cfg, out, resume, progress, stop_at)


def _run(fabric, cfg: PretrainConfig, out: Path, resume: bool, progress: bool, stop_at: Optional[int] = None) -> dict[str, Any]:
    from ahm.models import build_mim_model

    rank, world = fabric.global_rank, fabric.world_size
    is_main = rank == 0
    arrays, splits, index = load_pretrain_data(cfg)
    if is_main and not resume:
        write_json(out / "splits.json", splits)
    n_items = len(arrays.images)
    in_channels = int(arrays.images.shape[1])
    per_step = cfg.train.batch_size * world
    if n_items < per_step:
        raise AhmError(
            f"{cfg.data.path}: {n_items} training images, fewer than --batch-size {cfg.train.batch_size}"
            + (f" x {world} devices" if world > 1 else "")
        )
    steps_per_epoch = n_items // per_step
    total = cfg.train.steps if cfg.train.steps is not None else (cfg.train.epochs or 1) * steps_per_epoch

    torch.manual_seed(cfg.train.seed)
    model = build_mim_model(cfg.model, cfg.data.image_size, in_channels)
    ctx = PolicyContext(
        grid=model.grid, patch_size=model.patch_size, in_channels=in_channels, total_steps=total,
        seed=cfg.train.seed, device=fabric.device, model=model, world_size=world, rank=rank,
    )
    policy = build_policy(cfg.masking, ctx)
    try:
        return _train(fabric, cfg, out, resume, progress, model, policy, arrays, total, steps_per_epoch, is_main, stop_at)
    finally:
        policy.close()


def _train(fabric, cfg, out, resume, progress, model, policy, arrays, total, steps_per_epoch, is_main, stop_at=None):
    from ahm.data import ArrayDataset, pretrain_augment

    rank, world = fabric.global_rank, fabric.world_size
    optimizer, policy_params = build_optimizer(model, policy, cfg)

    start_step = 0
    skipped_before = 0
    if resume:
        ckpt = _load_checkpoint(out)
        path = _checkpoint_path(out)
        restore_state(model, ckpt["model"], "model", path)
        restore_state(policy, ckpt["policy"], f"{cfg.masking.policy} masking policy", path)
        policy.load_extra_state(ckpt.get("policy_extra", {}))
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise AhmError(f"{path}: optimiser state does not match this run ({exc})") from exc
        start_step = int(ckpt["step"])
        skipped_before = int(ckpt.get("skipped_batches", 0))
    policy.to(fabric.device)
    raw_model = model
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, optimizer)

    dataset = ArrayDataset(arrays.images, None, pretrain_augment(cfg.data.image_size) if cfg.train.augment else None,
                           seed=cfg.train.seed)
    log = MetricsLog(out, resume_step=start_step if resume else None, tensorboard=is_main) if is_main else None
    window: dict[str, deque] = defaultdict(lambda: deque(maxlen=SUMMARY_WINDOW))
    if resume and is_main:
        # The summary averages recent steps; after a resume near the end those are in the log, not in memory.
        for record in read_metrics(out)[-SUMMARY_WINDOW:]:
            for key, value in record.items():
                if key not in ("step", "lr", "images_per_s", "skipped_batches") and isinstance(value, (int, float)):
                    window[key].append(float(value))
    pending: dict[str, list[float]] = defaultdict(list)
    meter = Throughput()
    skipped = skipped_before
    last_loss = float("nan")
    step = start_step
    bar = _progress_bar(progress and is_main, total, start_step)

    saved: dict[str, int | None] = {"step": start_step if resume else None}

    def save_checkpoint(next_step: int) -> None:
        if not is_main:
            return
        try:
            save_torch(_checkpoint_path(out), {
                "kind": "pretrain", "version": __version__, "step": next_step,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "policy": policy.state_dict(), "policy_extra": policy.extra_state(),
                "config": cfg.model_dump(mode="json"), "skipped_batches": skipped,
            })
        except AhmError as exc:  # disk full, quota: atomic_write kept the old file; say which step it holds
            reason = getattr(exc.__cause__, "strerror", None) or str(exc)
            kept = (f"the previous checkpoint (step {saved['step']}) is kept" if saved["step"] is not None
                    else "no checkpoint was written yet")
            raise AhmError(f"{_checkpoint_path(out)}: could not save the checkpoint of step {next_step} ({reason}); "
                           f"{kept}; run stopped, continue with --resume once there is room") from exc
        saved["step"] = next_step

    epoch_cache: dict[int, list[list[int]]] = {}
    end = total if stop_at is None else min(total, stop_at)
    ahead = _BatchAhead(dataset)
    try:
        with stop_on_sigint() as sig:
            while step < end:
                epoch, within = divmod(step, steps_per_epoch)
                if epoch not in epoch_cache:
                    epoch_cache.clear()
                    epoch_cache[epoch] = batch_order(len(dataset), epoch, cfg.train.seed, cfg.train.batch_size, rank, world)
                    dataset.set_epoch(epoch)
                idx = epoch_cache[epoch][within]
                meter.start()
                images = ahead.take(step) if ahead.holds(step) else _stack_batch(dataset, idx)
                if within + 1 < steps_per_epoch and step + 1 < end:  # never across an epoch (set_epoch)
                    ahead.put(step + 1, epoch_cache[epoch][within + 1])
                images = images.to(fabric.device)
                progress_frac = step / total
                lr = set_lr(optimizer, lr_factor(step, total, cfg.train.warmup_steps, cfg.train.min_lr / max(cfg.train.lr, 1e-12)))

                loss, out_mim, pstep = forward_step(model, policy, images, progress_frac)
                optimizer.zero_grad(set_to_none=True)
                bad = nonfinite_loss_reason(fabric, loss)
                if bad is None:
                    fabric.backward(loss)
                    all_reduce_grads(fabric, policy_params)
                    # A finite loss with inf/NaN gradients would poison the weights and every later checkpoint.
                    # (16-mixed is exempt: its grad scaler expects inf gradients now and then and skips those steps.)
                    if cfg.train.precision != "16-mixed" and not grads_finite(list(raw_model.parameters()) + policy_params):
                        bad = f"the loss is {float(loss.detach()):.4g} but a gradient is not finite"
                if bad is not None:
                    if cfg.train.nan_policy != "skip":
                        good = _checkpoint_path(out)
                        raise NonFiniteLoss(
                            f"step {step + 1}: {bad}; run stopped. Last good checkpoint: "
                            + (f"{good} (step {saved['step']})" if saved["step"] is not None and good.is_file()
                               else "none yet")
                            + " (lower --lr, or set train.nan_policy: skip to skip bad batches)"
                        )
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                else:
                    if cfg.train.clip_grad > 0:
                        fabric.clip_gradients(model, optimizer, max_norm=cfg.train.clip_grad, error_if_nonfinite=False)
                        if policy_params:
                            torch.nn.utils.clip_grad_norm_(policy_params, cfg.train.clip_grad)
                    optimizer.step()
                rate = meter.stop(len(idx) * world)
                step += 1
                if bad is None:
                    last_loss = float(out_mim.loss.detach())
                    pending["loss"].append(last_loss)
                    window["loss"].append(last_loss)
                    for key, value in pstep.metrics.items():
                        if value is not None and not (isinstance(value, float) and math.isnan(value)):
                            pending[key].append(float(value))
                            window[key].append(float(value))
                if log is not None and (step % cfg.train.log_every == 0 or step == total):
                    record = {"step": step, "lr": lr, "images_per_s": rate}
                    record.update({k: float(np.mean(v)) for k, v in pending.items() if v})
                    if skipped:
                        record["skipped_batches"] = skipped
                    log.log(record)
                    pending.clear()
                if bar is not None:
                    bar.update(step, loss=last_loss, rate=rate)
                if step % cfg.train.checkpoint_every == 0 and step < total:
                    save_checkpoint(step)
                if sig["stop"]:
                    save_checkpoint(step)
                    raise Interrupted(
                        f"interrupted at step {step}/{total}; checkpoint saved to {_checkpoint_path(out)}. "
                        f"Resume with: ahm pretrain {cfg.data.path} --out {out} --resume"
                    )
        save_checkpoint(step)
    finally:
        ahead.close()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    if step < total:  # stopped by `stop_at`: a checkpoint, no final artefacts yet
        return {"policy": cfg.masking.policy, "backbone": cfg.model.backbone, "steps": step, "finished": False}
    summary: dict[str, Any] = {
        "policy": cfg.masking.policy,
        "backbone": cfg.model.backbone,
        "steps": step,
        "final_loss": float(np.mean(list(window["loss"])[-10:])) if window["loss"] else last_loss,
        "images_per_s": meter.median(),
        "skipped_batches": skipped,
        "world_size": world,
        "seed": cfg.train.seed,
    }
    for key, values in window.items():
        if key != "loss" and values:
            summary[key] = float(np.mean(values))
    if world > 1:
        # Evidence that ranks stayed in lock-step: model (DDP) and policy (all-reduced grads) weights agree.
        prints = fabric.all_gather(_fingerprint(raw_model, policy).to(fabric.device)).cpu()
        if is_main:
            write_json(out / "rank_fingerprints.json", {str(r): prints[r].tolist() for r in range(world)})
            summary["ranks_agree"] = bool((prints == prints[0]).all())
    if is_main:
        save_safetensors(out / "encoder.safetensors", raw_model.export_encoder(),
                         metadata={**raw_model.encoder_metadata(), "policy": cfg.masking.policy})
        _write_reconstructions(raw_model, policy, dataset, out / "reconstructions.png", fabric.device)
        write_json(out / "summary.json", summary)
    return summary


def _stack_batch(dataset, idx: list[int]) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in idx])


class _BatchAhead:
    """Assembles the next batch (augmentation included) in one background thread while the current step runs.

    The augmented samples on this CPU cost about a third of a ViT-Tiny MAE step (0.17 of 0.47 CPU s at batch 32,
    one thread); assembled in the step's shadow they stop adding to it. The samples are the same as without it:
    each is seeded by (seed, epoch, index), and a batch is never fetched ahead across an epoch boundary, where
    the dataset's epoch changes. (A DataLoader would need worker processes and a sampler for the same effect.)
    """

    def __init__(self, dataset) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.dataset = dataset
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahm-batch")
        self.step: int | None = None
        self.future = None

    def put(self, step: int, idx: list[int]) -> None:
        self.step, self.future = step, self.pool.submit(_stack_batch, self.dataset, idx)

    def holds(self, step: int) -> bool:
        return self.future is not None and self.step == step

    def take(self, step: int) -> torch.Tensor:
        future, self.step, self.future = self.future, None, None
        return future.result()  # an error while loading surfaces here, in the loop

    def close(self) -> None:
        if self.future is not None:
            self.future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _fingerprint(model: torch.nn.Module, policy: torch.nn.Module) -> torch.Tensor:
    """Order-sensitive sums of every parameter, float64: equal across ranks iff they trained in lock-step."""
    values = []
    for module in (model, policy):
        for i, p in enumerate(module.parameters()):
            flat = p.detach().double().reshape(-1)
            values.append(flat.sum() + (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64) * 1e-6).sum() * (i + 1))
    return torch.stack(values)


class _Bar:
    def __init__(self, total: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} img/s"),
            TextColumn("ETA"), TimeRemainingColumn(), transient=False,
        )
        self.task = self.progress.add_task("pretrain", total=total, completed=start, loss=float("nan"), rate=0.0)
        self.progress.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, rate=rate)

    def close(self) -> None:
        self.progress.stop()


def _progress_bar(enabled: bool, total: int, start: int) -> _Bar | None:
    return _Bar(total, start) if enabled else None


@torch.no_grad()
def _write_reconstructions(model, policy, dataset, path: Path, device, n: int = 6) -> None:
    """A PNG grid: image, mask (masked patches dimmed), reconstruction, for a few training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ahm.io import write_bytes

    n = min(n, len(dataset))
    images = torch.from_numpy(np.ascontiguousarray(dataset.images[:n])).float().to(device)
    was_training = model.training
    model.eval()
    state = policy.generator.get_state()
    mask = policy.propose(images, 1.0)
    policy.generator.set_state(state)
    out = model(images, mask)
    model.train(was_training)
    gh, gw = model.grid
    p = model.patch_size
    pixel_mask = mask.view(n, gh, gw).repeat_interleave(p, 1).repeat_interleave(p, 2).cpu().numpy()
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        img = images[i, 0].cpu().numpy() if images.shape[1] == 1 else images[i, :3].permute(1, 2, 0).cpu().numpy()
        rec = out.prediction[i].float()
        rec = rec[0].cpu().numpy() if rec.shape[0] == 1 else rec[:3].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        masked = img * np.where(pixel_mask[i][..., None] if img.ndim == 3 else pixel_mask[i], 0.25, 1.0)
        for ax, im, title in zip(axes[i], (img, masked, rec), ("image", "masked", "reconstruction")):
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
