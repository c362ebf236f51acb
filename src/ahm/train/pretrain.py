"""Masked-image-modeling pretraining on Lightning Fabric, driven by any masking policy.

The loop never branches on a policy's name: `propose` -> model -> `observe` (see ahm.masking.base).
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.config import PretrainConfig, load_config, save_config
from ahm.errors import AhmError
from ahm.io import save_safetensors, write_json
from ahm.masking import PolicyContext, build_policy
from ahm.pipeline import model_input_size
from ahm.runformat import migrate
from ahm.train.checkpoint import checkpoint_path, load_checkpoint, restore_state
from ahm.train.engine import (
    PretrainRun,
    TrainHook,
    installed_hooks,
    run_pretraining,
    slice_end,
)
from ahm.train.engine import forward_step as forward_step  # where `ahm bench speed` takes it from
from ahm.train.engine import mean_over_ranks as mean_over_ranks
from ahm.train.loop import (
    StepGuard,
    adamw_kernel,
    decay_param_groups,
    launch,
    launch_rank,
    make_fabric,
    progress_bar,
    read_scalars,
    sync_batchnorm,
)
from ahm.train.rundir import MetricsLog, RunLock, prepare_run_dir, read_metrics, unstarted_run
from ahm.train.state import Checkpoints, DeviceLoss, RunState, metric_window

SUMMARY_WINDOW = 50  # steps: summary.json averages each metric over what was logged in the run's last 50 steps


def load_pretrain_data(cfg: PretrainConfig):
    """The corpus (listed from headers; pixels are read while training) and the first source's splits."""
    from ahm.data.corpus import open_corpus
    from ahm.data.splits import make_splits

    corpus = open_corpus(cfg)
    first = corpus.sources[0]
    splits = make_splits(first.index, first.data_cfg) if first.index.has_labels else {"train": list(first.ids)}
    return corpus, splits


def build_optimizer(model, policy, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, list]:
    """AdamW over the model (decay groups) and, unless the policy trains itself, the policy's parameters."""
    groups = decay_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    policy_params = [p for p in policy.parameters() if p.requires_grad] if not policy.owns_optimizer else []
    if policy_params:
        groups.append({"params": policy_params, "lr": cfg.masking.policy_lr, "base_lr": cfg.masking.policy_lr,
                       "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), **adamw_kernel(model)), policy_params


def check_config(cfg: PretrainConfig) -> None:
    """Refuse what can be refused before any work starts or any file is written."""
    from ahm.masking.base import policy_names
    from ahm.models import get_backbone

    if cfg.masking.policy not in policy_names():
        raise AhmError(f"--policy: unknown masking policy {cfg.masking.policy!r}; choose one of {', '.join(policy_names())}")
    get_backbone(cfg.model.backbone).check_config(cfg.model)
    from ahm.pipeline import pipeline_for

    # where the crop is the model's input (3D): whole patches, and for the UNet whole feature maps at every stride
    pipeline_for(cfg).check_model_input(
        cfg.data, lambda: math.lcm(cfg.model.patch_size, get_backbone(cfg.model.backbone).crop_multiple(cfg.model)),
        why=f"--patch-size {cfg.model.patch_size} (and the backbone's strides)")
    paths = [s.path for s in cfg.sources] or ([cfg.data.path] if cfg.data.path else [])
    if not paths:
        raise AhmError("DATA: no dataset path given")
    for path in paths:
        if not Path(path).exists():
            raise AhmError(f"{path}: dataset folder not found")


def check_agent_workers(cfg: PretrainConfig, fabric) -> None:
    """Asynchronous agent workers (A3C) are for CPU runs: they hold the agent in CPU shared memory, so on a GPU each
    step would copy its batch to the host and through /dev/shm, and they cannot follow DDP's all-reduce."""
    workers = cfg.masking.agent_workers
    if workers and fabric.device.type != "cpu":
        raise AhmError(f"masking.agent_workers {workers}: asynchronous agent workers run the agent on the CPU "
                       f"(each step's batch copied to the host); on {fabric.device.type} use agent_workers: 0, the "
                       f"synchronous agent on the device")
    if workers and fabric.world_size > 1:
        raise AhmError(f"masking.agent_workers {workers}: asynchronous agent workers cannot be combined with "
                       f"{fabric.world_size} processes (DDP); use agent_workers: 0 (the agent's gradients are "
                       f"all-reduced like the model's)")


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, force: bool = False,
             progress: bool = True, stop_at: int | None = None,
             hooks: Sequence[TrainHook] = ()) -> dict[str, Any]:
    """Run (or resume) pretraining into run directory `out`; returns the summary written to summary.json.

    `stop_at`: stop this call after that many steps with a checkpoint, as an interruption would (time-sliced jobs).
    `hooks`: `TrainHook`s called with every batch and the summary, after those installed by `add_hook`.
    """
    out = Path(out)
    check_config(cfg)
    lock = RunLock(out)
    try:
        restart = resume and unstarted_run(out, "pretrain")
        if resume:
            # The run's own config decides everything but its length.
            saved = out / "config.yaml"
            if saved.is_file():
                steps = cfg.train.steps
                migrate(out)  # a resumed run is written to: upgraded in place, or refused when it cannot be written
                cfg = load_config(PretrainConfig, saved)
                if steps is not None and steps != cfg.train.steps:
                    cfg.train.steps = steps
            elif not restart:  # killed before config.yaml was written: the options given now are the run's
                raise AhmError(f"--resume: {saved} not found")
        fabric = make_fabric(cfg.train)  # an unusable accelerator/precision is refused before the run dir is made
        check_agent_workers(cfg, fabric)
        if launch_rank() == 0:
            # Global rank 0 alone makes and writes the run directory. Under torchrun the other ranks start beside it
            # and take its decisions (config, resume) once the process group exists (`_run`).
            lock.acquire()  # before --force clears anything, and again for a folder made just now
            prepare_run_dir(out, "pretrain", cfg.train.seed, resume=resume, force=force)
            lock.acquire()
            if restart:
                resume = False  # killed before its first checkpoint: start again from step 0 in the same folder
            if not resume:
                save_config(cfg, out / "config.yaml")
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        return launch(fabric, _run, cfg, out, resume, progress, stop_at, [*installed_hooks(), *hooks])
    finally:
        lock.release()


def _run(fabric, cfg: PretrainConfig, out: Path, resume: bool, progress: bool, stop_at: int | None,
         hooks: Sequence[TrainHook]) -> dict[str, Any]:
    from ahm.data.corpus import describe
    from ahm.models import build_mim_model

    rank, world = fabric.global_rank, fabric.world_size
    if world > 1:
        cfg, resume = fabric.broadcast((cfg, resume), src=0)
    corpus, splits = load_pretrain_data(cfg)
    if rank == 0 and not resume:
        write_json(out / "splits.json", splits)
        write_json(out / "corpus.json", describe(corpus))
    total = _run_length(cfg, corpus, world)
    torch.manual_seed(cfg.train.seed)
    model = build_mim_model(cfg.model, model_input_size(cfg.data), corpus.channels, spatial_dims=cfg.data.spatial_dims)
    ctx = PolicyContext(
        grid=model.patch_grid, in_channels=corpus.channels, total_steps=total,
        seed=cfg.train.seed, device=fabric.device, model=model, world_size=world, rank=rank, autocast=fabric.autocast,
    )
    policy = build_policy(cfg.masking, ctx)
    try:
        run, state, dataset = _set_up(fabric, cfg, out, resume, progress, model, policy, corpus, total, stop_at)
        run.hooks = list(hooks)
        try:
            run_pretraining(run, state)
        finally:
            run.close()
        return _finish(run, state, corpus, dataset)
    finally:
        policy.close()


def _run_length(cfg: PretrainConfig, corpus, world: int) -> int:
    """The run's total steps; AhmError when the corpus cannot fill one global batch."""
    steps_per_epoch = corpus.steps_per_epoch(cfg.train.batch_size, world)
    if steps_per_epoch < 1:  # 2D: a batch needs distinct images (3D crops are drawn with replacement)
        raise AhmError(
            f"{cfg.data.path}: {corpus.epoch_size} training images, fewer than --batch-size {cfg.train.batch_size}"
            + (f" x {world} devices" if world > 1 else "")
        )
    return (cfg.train.steps if cfg.train.steps is not None
            else max((cfg.train.epochs or 1) * steps_per_epoch, cfg.min_steps or 0))


def _restore(cfg: PretrainConfig, out: Path, model, policy) -> tuple[dict[str, Any], RunState]:
    """The checkpoint a resume continues from, with the model's and policy's weights put back."""
    path = checkpoint_path(out)
    ckpt = load_checkpoint(path, "pretrain")
    restore_state(model, ckpt["model"], "model", path)
    restore_state(policy, ckpt["policy"], f"{cfg.masking.policy} masking policy", path)
    policy.load_extra_state(ckpt["policy_extra"])
    step = int(ckpt["step"])
    return ckpt, RunState(step=step, skipped=int(ckpt["skipped_batches"]), saved_step=step)


def _set_up(fabric, cfg: PretrainConfig, out: Path, resume: bool, progress: bool, model, policy, corpus,
            total: int, stop_at: int | None) -> tuple[PretrainRun, RunState, Any]:
    """Optimiser, restored state, Fabric, loader, log and bar: everything the engine's steps read."""
    from ahm.data.corpus import pretraining_loader

    rank, world, is_main = fabric.global_rank, fabric.world_size, fabric.global_rank == 0
    optimizer, policy_params = build_optimizer(model, policy, cfg)
    policy.to(fabric.device)  # before its state is restored: a policy's own optimiser state then lands on the device
    ckpt, state = _restore(cfg, out, model, policy) if resume else (None, RunState())
    model = sync_batchnorm(fabric, model, cfg.train)
    raw_model = model
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, optimizer)
    guard = StepGuard(fabric.device) if StepGuard.usable(optimizer, cfg.train) else None
    if ckpt is not None:
        # after the model is on its device: Optimizer.load_state_dict puts each state tensor on its parameter's
        # device and dtype (loaded before, AdamW's moments would stay on the CPU beside CUDA parameters)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise AhmError(f"{checkpoint_path(out)}: optimiser state does not match this run ({exc})") from exc
    end = slice_end(total, stop_at)
    dataset, loader, problems = pretraining_loader(corpus, cfg, state.step, end, rank, world,
                                                   pin_memory=fabric.device.type == "cuda")
    batches = iter(loader)
    log = MetricsLog(out, resume_step=state.step if resume else None, tensorboard=True) if is_main else None
    _summary_window(state, out, resume and is_main)
    # the losses of the steps since the last log ([sum, count]); MPS has no float64
    losses = DeviceLoss(fabric.device, torch.float32 if fabric.device.type == "mps" else torch.float64)
    bar = progress_bar(progress and is_main, "pretrain", total, state.step,
                       [("loss", "loss {task.fields[loss]:.4f}", float("nan")),
                        ("rate", "{task.fields[rate]:.0f} img/s", 0.0)])
    checkpoints = Checkpoints(checkpoint_path(out), "pretrain", _payload(cfg, raw_model, optimizer, policy),
                              enabled=is_main,
                              nan_hint="lower --lr, or set train.nan_policy: skip to skip bad batches")
    run = PretrainRun(fabric, cfg, out, model, raw_model, policy, optimizer, policy_params, guard, checkpoints,
                      losses, total, end, policy.stages(), batches, log, bar, problems=problems,
                      loader_workers=loader.num_workers)
    return run, state, dataset


def _summary_window(state: RunState, out: Path, from_log: bool) -> None:
    """The recent values summary.json averages: each metric's (step, value) logs, and this run's step losses."""
    state.window = defaultdict(metric_window(SUMMARY_WINDOW))
    state.recent_losses = deque(maxlen=SUMMARY_WINDOW)
    if from_log:
        # after a resume near the end the recent steps are in the log, not in memory
        for record in read_metrics(out)[-SUMMARY_WINDOW:]:
            for key, value in record.items():
                if key not in ("step", "lr", "images_per_s", "skipped_batches") and isinstance(value, (int, float)):
                    state.window[key].append((int(record["step"]), float(value)))


def _payload(cfg: PretrainConfig, raw_model, optimizer, policy) -> Callable[[RunState], dict[str, Any]]:
    def payload(state: RunState) -> dict[str, Any]:
        return {"step": state.step,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "policy": policy.state_dict(), "policy_extra": policy.extra_state(),
                "config": cfg.model_dump(mode="json"), "skipped_batches": state.skipped}

    return payload


def _finish(run: PretrainRun, state: RunState, corpus, dataset) -> dict[str, Any]:
    """summary.json, the encoder and the reconstructions of a finished run; a time slice returns a short summary."""
    cfg, fabric = run.cfg, run.fabric
    if state.step < run.total:  # stopped by `stop_at`: a checkpoint, no final artefacts yet
        return {"policy": cfg.masking.policy, "backbone": cfg.model.backbone, "steps": state.step, "finished": False}
    # the last 10 finite step losses: those logged before a resume, then this run's
    losses = [v for _, v in state.window["loss"]] + [v for v in read_scalars(list(state.recent_losses))
                                                     if math.isfinite(v)]
    summary: dict[str, Any] = {
        "policy": cfg.masking.policy,
        "backbone": cfg.model.backbone,
        "steps": state.step,
        "final_loss": float(np.mean(losses[-10:])) if losses else state.last_loss,
        "images_per_s": run.meter.median(),
        "skipped_batches": state.skipped,
        "world_size": fabric.world_size,
        "seed": cfg.train.seed,
        "corpus_images": corpus.n_entries,
        "loader_workers": run.loader_workers,
        "preloaded": dataset.preloaded,
        "cache": None if dataset.cache is None else {"path": str(dataset.cache.data_path),
                                                     "filled": dataset.cache.filled(),
                                                     "entries": len(corpus)},
        "agent_parameters": int(run.policy.agent_parameters),
    }
    if run.problems:
        summary["skipped_files"] = {"count": len(run.problems), "first": run.problems[:5]}
    for key, values in state.window.items():
        if key != "loss" and values:
            summary[key] = recent_mean(values, state.step)
    for hook in run.hooks:
        hook.on_end(run, summary)
    if fabric.global_rank == 0:
        if len(run.stages) > 1:
            summary["stages"] = stage_summaries(read_metrics(run.out), run.stages)
        _write_artefacts(run, corpus, dataset, summary)
    return summary


def _write_artefacts(run: PretrainRun, corpus, dataset, summary: dict[str, Any]) -> None:
    out, raw_model = run.out, run.raw_model
    save_safetensors(out / "encoder.safetensors", raw_model.export_encoder(),
                     metadata={**raw_model.encoder_metadata(), "policy": run.cfg.masking.policy,
                               "normalization": corpus.normalization()})
    _write_reconstructions(raw_model, run.policy, dataset, out / "reconstructions.png", run.fabric.device)
    write_json(out / "summary.json", summary)


def recent_mean(values: Iterable[tuple[int, float]], step: int) -> float:
    """The mean of the (step, value) pairs logged in the last `SUMMARY_WINDOW` steps up to `step`, or else the
    last value. By step, not by count: a metric probed every 10 steps (ahm-official's hardness ratio) would
    otherwise average its last 50 probes, 500 steps that reach back into an earlier stage."""
    values = list(values)
    recent = [v for s, v in values if s > step - SUMMARY_WINDOW]
    return float(np.mean(recent)) if recent else float(values[-1][1])


STAGE_DIAGNOSTICS = ("loss", "hardness_ratio", "critic_spearman", "background_share", "agent_loss", "mean_reward")
STAGE_TAIL = 5  # logged records averaged for a stage's final diagnostics


def stage_summaries(records: list[dict[str, Any]], stages: list) -> list[dict[str, Any]]:
    """Per stage: its steps and the mean of each diagnostic over its last few logged records (from metrics.jsonl,
    so a resumed run reports what an uninterrupted one does)."""
    result = []
    for stage in stages:
        entry: dict[str, Any] = {"name": stage.name, "start": stage.start, "end": stage.end, "steps": stage.steps,
                                 "trains_model": stage.trains_model}
        inside = [r for r in records if stage.start < int(r.get("step", -1)) <= stage.end]
        for key in STAGE_DIAGNOSTICS:
            values = [float(r[key]) for r in inside if isinstance(r.get(key), (int, float))][-STAGE_TAIL:]
            if values:
                entry[key] = float(np.mean(values))
        result.append(entry)
    return result


@torch.no_grad()
def _write_reconstructions(model, policy, dataset, path: Path, device, n: int = 6) -> None:
    """A PNG grid: image, mask (masked patches dimmed), reconstruction, for a few training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ahm.io import write_bytes

    # the first readable images (with skip_bad an unreadable one is passed over here too)
    read = [dataset.read(k) for k in range(min(n, len(dataset)))]
    picked = [image for image, _, _, failed in read if not failed]
    if not picked:
        return
    if picked[0].dim() == 4:  # whole volumes of different shapes: the centre crop of the model's input size
        from monai.transforms import CenterSpatialCrop

        crop = CenterSpatialCrop(roi_size=model.patch_grid.spatial_shape)
        picked = [torch.as_tensor(crop(image)) for image in picked]
    n = len(picked)
    images = torch.stack(picked).float().to(device)
    was_training = model.training
    model.eval()
    state = policy.generator.get_state()
    mask = policy.propose(images, 1.0)
    policy.generator.set_state(state)
    out = model(images, mask)
    model.train(was_training)
    pixel_mask = model.patch_grid.upsample(mask.float())[:, 0]
    prediction = out.prediction
    if images.dim() == 5:  # a volume: its middle slice along the first axis (`ahm visualize` shows all three)
        middle = images.shape[2] // 2
        images, pixel_mask, prediction = images[:, :, middle], pixel_mask[:, middle], prediction[:, :, middle]
    pixel_mask = pixel_mask.cpu().numpy()
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        img = images[i, 0].cpu().numpy() if images.shape[1] == 1 else images[i, :3].permute(1, 2, 0).cpu().numpy()
        rec = prediction[i].float()
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
