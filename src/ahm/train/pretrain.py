"""Masked-image-modeling pretraining on Lightning Fabric, driven by any masking policy.

The loop never branches on a policy's name: `propose` -> model -> `observe` (see ahm.masking.base).
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ahm.config import PretrainConfig, load_config, model_input_size, save_config
from ahm.errors import AhmError
from ahm.io import save_safetensors, write_json
from ahm.masking import PolicyContext, build_policy
from ahm.train.checkpoint import checkpoint_path, load_checkpoint, restore_state
from ahm.train.checkpoint import save_checkpoint as write_checkpoint
from ahm.train.loop import (
    Interrupted,
    StepGuard,
    Throughput,
    adamw_kernel,
    decay_param_groups,
    gather_objects,
    launch,
    launch_rank,
    make_fabric,
    optimizer_step,
    progress_bar,
    read_scalars,
    stop_on_sigint,
    stop_requested,
    sync_batchnorm,
)
from ahm.train.rundir import MetricsLog, RunLock, prepare_run_dir, read_metrics, unstarted_run
from ahm.train.schedule import lr_factor, set_lr

SUMMARY_WINDOW = 50  # steps: summary.json averages each metric over what was logged in the run's last 50 steps
MAX_SEEN = 4096  # entries per rank kept as evidence of disjoint DDP shards (rank_samples.json)


def load_pretrain_data(cfg: PretrainConfig):
    """The corpus (listed from headers; pixels are read while training) and the first source's splits."""
    from ahm.data.corpus import open_corpus
    from ahm.data.splits import make_splits

    corpus = open_corpus(cfg)
    first = corpus.sources[0]
    splits = make_splits(first.index, first.data_cfg) if first.index.has_labels else {"train": list(first.ids)}
    return corpus, splits


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
    if cfg.data.spatial_dims == 3:
        from ahm.data.volumes import check_crop
        from ahm.models.backbones import get_backbone

        # the crop is the model's input: whole patches, and for the UNet whole feature maps at every stride
        multiple = math.lcm(cfg.model.patch_size, get_backbone(cfg.model.backbone).crop_multiple(cfg.model))
        check_crop(cfg.data, multiple, why=f"--patch-size {cfg.model.patch_size} (and the backbone's strides)")
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
             progress: bool = True, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) pretraining into run directory `out`; returns the summary written to summary.json.

    `stop_at`: end this session after that many steps with a checkpoint, as an interruption would (time-sliced jobs).
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
        return launch(fabric, _run, cfg, out, resume, progress, stop_at)
    finally:
        lock.release()


def _run(fabric, cfg: PretrainConfig, out: Path, resume: bool, progress: bool, stop_at: Optional[int] = None) -> dict[str, Any]:
    from ahm.data.corpus import describe
    from ahm.models import build_mim_model

    rank, world = fabric.global_rank, fabric.world_size
    if world > 1:
        cfg, resume = fabric.broadcast((cfg, resume), src=0)
    is_main = rank == 0
    corpus, splits = load_pretrain_data(cfg)
    if is_main and not resume:
        write_json(out / "splits.json", splits)
        write_json(out / "corpus.json", describe(corpus))
    n_items = corpus.epoch_size
    in_channels = corpus.channels
    per_step = cfg.train.batch_size * world
    if n_items < per_step:
        raise AhmError(
            f"{cfg.data.path}: {n_items} training images, fewer than --batch-size {cfg.train.batch_size}"
            + (f" x {world} devices" if world > 1 else "")
        )
    steps_per_epoch = corpus.steps_per_epoch(cfg.train.batch_size, world)
    total = (cfg.train.steps if cfg.train.steps is not None
             else max((cfg.train.epochs or 1) * steps_per_epoch, cfg.min_steps or 0))

    torch.manual_seed(cfg.train.seed)
    model = build_mim_model(cfg.model, model_input_size(cfg.data), in_channels, spatial_dims=cfg.data.spatial_dims)
    ctx = PolicyContext(
        grid=model.patch_grid, in_channels=in_channels, total_steps=total,
        seed=cfg.train.seed, device=fabric.device, model=model, world_size=world, rank=rank, autocast=fabric.autocast,
    )
    policy = build_policy(cfg.masking, ctx)
    try:
        return _train(fabric, cfg, out, resume, progress, model, policy, corpus, total, steps_per_epoch, is_main, stop_at)
    finally:
        policy.close()


def _train(fabric, cfg, out, resume, progress, model, policy, corpus, total, steps_per_epoch, is_main, stop_at=None):
    from ahm.data.corpus import pretraining_loader

    rank, world = fabric.global_rank, fabric.world_size
    optimizer, policy_params = build_optimizer(model, policy, cfg)

    start_step = 0
    skipped_before = 0
    ckpt = None
    policy.to(fabric.device)  # before its state is restored: a policy's own optimiser state then lands on the device
    if resume:
        path = checkpoint_path(out)
        ckpt = load_checkpoint(path, "pretrain")
        restore_state(model, ckpt["model"], "model", path)
        restore_state(policy, ckpt["policy"], f"{cfg.masking.policy} masking policy", path)
        policy.load_extra_state(ckpt["policy_extra"])
        start_step = int(ckpt["step"])
        skipped_before = int(ckpt["skipped_batches"])
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

    end = total if stop_at is None else min(total, stop_at)
    dataset, loader, problems = pretraining_loader(corpus, cfg, start_step, end, rank, world,
                                                   pin_memory=fabric.device.type == "cuda")
    batches = iter(loader)
    seen: list[int] = []
    log = MetricsLog(out, resume_step=start_step if resume else None, tensorboard=is_main) if is_main else None
    # (step, value) of each metric's recent values; a metric logged every step fills it with the last 50 steps
    window: dict[str, deque] = defaultdict(lambda: deque(maxlen=SUMMARY_WINDOW))
    if resume and is_main:
        # The summary averages recent steps; after a resume near the end those are in the log, not in memory.
        for record in read_metrics(out)[-SUMMARY_WINDOW:]:
            for key, value in record.items():
                if key not in ("step", "lr", "images_per_s", "skipped_batches") and isinstance(value, (int, float)):
                    window[key].append((int(record["step"]), float(value)))
    # the losses of the steps since the last log, summed on the device with their count ([sum, count]) and read
    # once per log; and this session's recent step losses, read for the summary's final loss
    exact = torch.float32 if fabric.device.type == "mps" else torch.float64
    loss_sum = torch.zeros(2, dtype=exact, device=fabric.device)
    recent_losses: deque = deque(maxlen=SUMMARY_WINDOW)
    meter = Throughput()
    skipped = skipped_before
    last_loss = float("nan")
    step = start_step
    bar = progress_bar(progress and is_main, "pretrain", total, start_step,
                       [("loss", "loss {task.fields[loss]:.4f}", float("nan")),
                        ("rate", "{task.fields[rate]:.0f} img/s", 0.0)])

    saved: dict[str, int | None] = {"step": start_step if resume else None}
    stages = policy.stages()
    staged = len(stages) > 1

    def save_checkpoint(next_step: int) -> None:
        if not is_main:
            return
        try:
            write_checkpoint(checkpoint_path(out), "pretrain", {
                "step": next_step,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "policy": policy.state_dict(), "policy_extra": policy.extra_state(),
                "config": cfg.model_dump(mode="json"), "skipped_batches": skipped,
            })
        except AhmError as exc:  # disk full, quota: atomic_write kept the old file; say which step it holds
            reason = getattr(exc.__cause__, "strerror", None) or str(exc)
            kept = (f"the previous checkpoint (step {saved['step']}) is kept" if saved["step"] is not None
                    else "no checkpoint was written yet")
            raise AhmError(f"{checkpoint_path(out)}: could not save the checkpoint of step {next_step} ({reason}); "
                           f"{kept}; run stopped, continue with --resume once there is room") from exc
        saved["step"] = next_step

    def stopped_by(bad: str, at: Optional[int] = None) -> str:
        good = checkpoint_path(out)
        return (f"step {step + 1 if at is None else at + 1}: {bad}; run stopped. Last good checkpoint: "
                + (f"{good} (step {saved['step']})" if saved["step"] is not None and good.is_file() else "none yet")
                + " (lower --lr, or set train.nan_policy: skip to skip bad batches)")

    try:
        with stop_on_sigint() as sig:
            while step < end:
                meter.start()
                batch = next(batches)
                problems.extend(p for p in batch["problems"] if p not in problems)  # distinct files
                if batch["error"] is not None:
                    good = checkpoint_path(out)
                    raise AhmError(f"{batch['error']}; run stopped at step {step}. Last checkpoint: "
                                   + (f"{good} (step {saved['step']})" if saved["step"] is not None and good.is_file()
                                      else "none yet") + " (set data.skip_bad to skip unreadable files)")
                idx = batch["entry"]
                if len(seen) < MAX_SEEN:
                    seen.extend(idx)
                images = batch["image"].to(fabric.device, non_blocking=True)
                progress_frac = step / total
                # each stage starts its own warm-up and cosine (MAE's schedule per MIM stage); one stage: the run's
                stage = policy.stage_at(step)
                model.train(stage.trains_model)
                lr = set_lr(optimizer, lr_factor(step - stage.start, stage.steps, cfg.train.warmup_steps,
                                                 cfg.train.min_lr / max(cfg.train.lr, 1e-12)))

                # a stage's last step is always logged, so every stage has final diagnostics in metrics.jsonl;
                # every rank computes them, and rank 0 logs their mean over the ranks
                logged = (step + 1) % cfg.train.log_every == 0 or step + 1 in (total, stage.end)
                loss, out_mim, pstep = forward_step(model, policy, images, progress_frac, stage.trains_model, logged)
                if stage.trains_model:
                    bad = optimizer_step(fabric, model, optimizer, loss, cfg.train, list(raw_model.parameters()),
                                         stopped_by, extra_params=policy_params, guard=guard, step=step)
                    if bad is not None:
                        skipped += 1
                else:  # a frozen-model stage has nothing to backpropagate (the policy stepped its own optimiser)
                    optimizer.zero_grad(set_to_none=True)
                    bad = None
                rate = meter.stop(len(idx) * world)
                step += 1
                if bad is None:
                    step_loss = out_mim.loss.detach().to(exact)
                    finite = torch.isfinite(step_loss)
                    if guard is not None and stage.trains_model:  # a step the guard skipped is not a loss to log
                        finite = finite & ~guard.last_bad
                    loss_sum += torch.stack([torch.where(finite, step_loss, 0.0), finite.to(exact)])
                    recent_losses.append(torch.where(finite, step_loss, torch.nan))
                # the device-side NaN guard is read where the step reads the device anyway: with the log, and
                # before a checkpoint (none is written after a bad step under nan_policy stop)
                guarded = guard.state() if guard is not None else []
                if guarded and not logged and (step % cfg.train.checkpoint_every == 0 or step == end):
                    skipped += guard.settle(read_scalars(guarded), cfg.train.nan_policy, stopped_by)
                if logged:
                    metrics = {k: v for k, v in pstep.metrics.items() if v is not None} if bad is None else {}
                    loss_total, loss_count, *values = read_scalars([loss_sum[0], loss_sum[1], *guarded,
                                                                    *metrics.values()])
                    if guarded:
                        skipped += guard.settle(values[:len(guarded)], cfg.train.nan_policy, stopped_by)
                        values = values[len(guarded):]
                    loss_sum.zero_()
                    loss_total, loss_count, values = mean_over_ranks(fabric, list(metrics), loss_total, loss_count,
                                                                     values)
                    mean_loss = loss_total / loss_count if loss_count else math.nan
                if logged and log is not None:
                    record = {"step": step, "lr": lr, "images_per_s": rate}
                    if staged:
                        record["stage"] = stages.index(stage)
                    if math.isfinite(mean_loss):  # not when every step since the last log was skipped
                        last_loss = record["loss"] = mean_loss
                    for key, value in zip(metrics, values):
                        if math.isfinite(value):  # NaN: undefined this step (e.g. a correlation over ties)
                            record[key] = value
                            window[key].append((step, value))
                    if skipped:
                        record["skipped_batches"] = skipped
                    log.log(record)
                if bar is not None:
                    bar.update(step, loss=last_loss, rate=rate)
                if step % cfg.train.checkpoint_every == 0 and step < total:
                    save_checkpoint(step)
                if stop_requested(fabric, sig, step, cfg.train.log_every):
                    save_checkpoint(step)
                    raise Interrupted(
                        f"interrupted at step {step}/{total}; checkpoint saved to {checkpoint_path(out)}. "
                        f"Resume with: ahm pretrain {cfg.data.path} --out {out} --resume"
                    )
        save_checkpoint(step)
    finally:
        del batches  # stops the loader's workers
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    if step < total:  # stopped by `stop_at`: a checkpoint, no final artefacts yet
        return {"policy": cfg.masking.policy, "backbone": cfg.model.backbone, "steps": step, "finished": False}
    # the last 10 finite step losses: those logged before a resume, then this session's
    losses = [v for _, v in window["loss"]] + [v for v in read_scalars(list(recent_losses)) if math.isfinite(v)]
    summary: dict[str, Any] = {
        "policy": cfg.masking.policy,
        "backbone": cfg.model.backbone,
        "steps": step,
        "final_loss": float(np.mean(losses[-10:])) if losses else last_loss,
        "images_per_s": meter.median(),
        "skipped_batches": skipped,
        "world_size": world,
        "seed": cfg.train.seed,
        "corpus_images": corpus.n_entries,
        "loader_workers": loader.num_workers,
        "preloaded": dataset.preloaded,
        "cache": None if dataset.cache is None else {"path": str(dataset.cache.data_path),
                                                     "filled": dataset.cache.filled(),
                                                     "entries": len(corpus)},
        "agent_parameters": int(policy.agent_parameters),
    }
    if problems:
        summary["skipped_files"] = {"count": len(problems), "first": problems[:5]}
    for key, values in window.items():
        if key != "loss" and values:
            summary[key] = recent_mean(values, step)
    if world > 1:
        # Evidence that ranks stayed in lock-step: model (DDP) and policy (all-reduced grads) weights agree.
        prints = fabric.all_gather(_fingerprint(raw_model, policy).to(fabric.device)).cpu()
        # The entries each rank trained on (the first MAX_SEEN): evidence that the ranks read disjoint shards.
        shown = torch.full((MAX_SEEN,), -1, dtype=torch.long)
        shown[:min(len(seen), MAX_SEEN)] = torch.tensor(seen[:MAX_SEEN], dtype=torch.long)
        entries = fabric.all_gather(shown.to(fabric.device)).cpu()
        if is_main:
            write_json(out / "rank_fingerprints.json", {str(r): prints[r].tolist() for r in range(world)})
            write_json(out / "rank_samples.json", {str(r): [int(k) for k in entries[r] if k >= 0]
                                                   for r in range(world)})
            summary["ranks_agree"] = bool((prints == prints[0]).all())
    if staged and is_main:
        summary["stages"] = stage_summaries(read_metrics(out), stages)
    if is_main:
        save_safetensors(out / "encoder.safetensors", raw_model.export_encoder(),
                         metadata={**raw_model.encoder_metadata(), "policy": cfg.masking.policy,
                                   "normalization": corpus.normalization()})
        _write_reconstructions(raw_model, policy, dataset, out / "reconstructions.png", fabric.device)
        write_json(out / "summary.json", summary)
    return summary


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


def _fingerprint(model: torch.nn.Module, policy: torch.nn.Module) -> torch.Tensor:
    """Order-sensitive sums of every parameter, float64: equal across ranks iff they trained in lock-step."""
    values = []
    for module in (model, policy):
        for i, p in enumerate(module.parameters()):
            flat = p.detach().double().reshape(-1)
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
            values.append(flat.sum() + (flat * weights * 1e-6).sum() * (i + 1))
    return torch.stack(values)


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
