"""Fine-tune a segmenter on a labelled subset, from a pretraining run's encoder or from scratch.

The run directory follows the pretraining conventions (config.yaml, run.json, checkpoints/last.ckpt,
metrics.jsonl, summary.json) and adds splits.json, labelled.json (the labelled subset drawn by subject),
checkpoints/best.ckpt (best validation Dice), eval/val/ and report.html.

On volumes (`data.spatial_dims: 3`) the segmenter is the backbone's 3D network built on the training crop
(`data.crop_size`, drawn around foreground by `ahm.data.volumes`); validation predicts whole preprocessed volumes
by Gaussian-blended sliding windows of that crop and scores each volume as one case, HD95 in millimetres.

Resume is exact: batch order and augmentation are functions of (seed, epoch, index), the model has no dropout,
and the checkpoint holds the model, optimiser and step; a resumed run ends with the same weights as one that
never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ahm.config import FinetuneConfig, load_config, save_config
from ahm.config.runs import is_scratch_init
from ahm.errors import AhmError
from ahm.io import write_json
from ahm.pipeline import model_input_size, pipeline_for
from ahm.runformat import migrate
from ahm.train.checkpoint import BEST, checkpoint_path, load_checkpoint
from ahm.train.engine import FinetuneRun, run_finetuning
from ahm.train.finetune_data import FinetuneData, prepare_data
from ahm.train.init_check import check_init_matches, check_spatial_dims
from ahm.train.loop import (
    ShuffledItems,
    StepGuard,
    adamw_kernel,
    launch,
    launch_rank,
    make_fabric,
    progress_bar,
    sync_batchnorm,
)
from ahm.train.pretrained import PretrainedEncoder, apply_init, check_freeze, load_init
from ahm.train.rundir import MetricsLog, RunLock, prepare_run_dir, run_entries, unstarted_run
from ahm.train.state import Checkpoints, DeviceLoss, RunState
from ahm.train.validation import BestCheckpoint, evaluate_best, validation_interval

__all__ = ["PretrainedEncoder", "finetune", "is_scratch_init", "load_init", "run_length", "train_crop_size"]


def train_crop_size(cfg: FinetuneConfig) -> int | None:
    """Side of the fine-tuning crop in pixels (None: no crop), a multiple of the segmenter's `crop_multiple` (a
    UNet trains on the crop itself: the product of its strides; UNETR gets the crop padded back to its grid)."""
    from ahm.models import backbone_of_segmenter

    size = cfg.data.image_size
    if cfg.crop_fraction >= 1.0:
        return None
    step = backbone_of_segmenter(cfg.segmenter).crop_multiple(cfg.model)
    side = max(step, int(cfg.crop_fraction * size) // step * step)
    return side if side < size else None


def _side(cfg: FinetuneConfig) -> int:
    # the contract's `image_size` of a 3D checkpoint: the crop's first side (`roi_size` holds all three)
    size = model_input_size(cfg.data)
    return size if isinstance(size, int) else size[0]


def check_volume_crop(cfg: FinetuneConfig) -> None:
    """Where the crop is the segmenter's input (3D), each side must suit the backbone (strides, UNETR's patches)."""
    from ahm.models import backbone_of_segmenter

    pipeline_for(cfg).check_model_input(cfg.data, lambda: backbone_of_segmenter(cfg.segmenter).input_multiple(cfg.model),
                                        why=f"the {cfg.segmenter} segmenter's input")


def protocol_of(cfg: FinetuneConfig) -> str:
    """`frozen` (only the new layers train) or `finetune` (every weight trains), as summaries and tables name it."""
    return "frozen" if cfg.freeze_encoder else "finetune"


def _check_out(out: Path, resume: bool, force: bool) -> None:
    # The cheap refusal first, before any data is read; prepare_run_dir repeats it when creating the folder.
    if resume or force:
        return
    if out.is_dir() and run_entries(out):
        raise AhmError(f"--out {out}: directory is not empty; use --resume to continue it or --force to replace it")


def _param_groups(model, cfg: FinetuneConfig, pretrained: bool) -> list[dict]:
    from ahm.models import encoder_param_groups

    if pretrained:
        groups = encoder_param_groups(model, cfg.segmenter, cfg.train.lr, cfg.encoder_lr_scale, cfg.layer_decay)
    else:
        # Layer decay and an encoder lr scale only make sense for weights that were learned before.
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.train.lr}]
    for g in groups:
        g.setdefault("base_lr", g["lr"])
    return groups


def finetune(cfg: FinetuneConfig, out: str | Path, resume: bool = False, force: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or resume) into run directory `out`; returns the summary written to summary.json.

    `cfg` is taken as given; `ahm.train.resolve.resolve_finetune_config` builds it as `ahm finetune` does, with
    the pretraining run's image size (and in 3D its spacing and crop) where nothing else sets them."""
    out = Path(out)
    if launch_rank() != 0:
        # under torchrun: global rank 0 alone checks, makes and writes the run directory; this rank follows it
        return launch(make_fabric(cfg.train), _follow, out, progress)
    lock = RunLock(out)
    try:
        cfg, resume, data, enc = _set_up(cfg, out, resume, force, lock)
        return launch(make_fabric(cfg.train), _lead, cfg, out, resume, progress, data, enc)
    finally:
        lock.release()


def _lead(fabric, cfg: FinetuneConfig, out: Path, resume: bool, progress: bool, data: FinetuneData,
          enc: PretrainedEncoder | None) -> dict[str, Any]:
    if fabric.world_size > 1:
        fabric.broadcast((cfg, resume), src=0)  # what `_follow` needs from rank 0's set-up
    return _train(fabric, cfg, out, resume, progress, data, enc)


def _follow(fabric, out: Path, progress: bool) -> dict[str, Any]:
    """A torchrun rank other than 0: rank 0's resolved config and resume decision, then the labelled subset and
    splits it wrote into the run directory. No encoder is loaded here: DDP's set-up copies rank 0's weights."""
    cfg, resume = fabric.broadcast(None, src=0)
    data = prepare_data(cfg, out, resume=True)
    return _train(fabric, cfg, out, resume, progress, data, None)


def _set_up(cfg: FinetuneConfig, out: Path, resume: bool, force: bool,
            lock: RunLock) -> tuple[FinetuneConfig, bool, FinetuneData, PretrainedEncoder | None]:
    """Everything before training, on global rank 0: resolve the config (a resumed run's own), refuse bad input,
    read the data, make the run directory and write its config, splits and labelled subset."""
    out = Path(out)
    # Killed before its first checkpoint: nothing was trained, so --resume starts it again (same config if saved).
    restart = resume and unstarted_run(out, "finetune")
    if resume:
        # The run's own config decides everything but its length.
        saved = out / "config.yaml"
        epochs = cfg.train.epochs
        if saved.is_file():
            migrate(out)  # a resumed run is written to: upgraded in place, or refused when it cannot be written
            cfg = load_config(FinetuneConfig, saved)
        elif not restart:
            raise AhmError(f"--resume: {saved} not found; nothing to resume")
        else:
            cfg = cfg.model_copy(deep=True)
        if epochs is not None:
            cfg.train.epochs = epochs
        elif cfg.train.epochs is None and not cfg.train.steps:  # a run that counts steps keeps counting them
            cfg.train.epochs = FinetuneConfig().train.epochs
        resume = not restart
    else:
        cfg = cfg.model_copy(deep=True)
    _check_out(out, resume or restart, force)
    make_fabric(cfg.train)  # an unusable accelerator, precision or process count: refused before any work

    enc = None
    if not resume:
        check_freeze(cfg)
    if is_scratch_init(cfg.init):
        cfg.init = None
    elif not resume:  # a resumed run has its weights in its checkpoint; the pretraining run may be gone
        enc = load_init(cfg.init)
        check_spatial_dims(enc, cfg)
        apply_init(cfg, enc)
    from ahm.models import backbone_of_segmenter

    # an unknown name, or model settings the segmenter refuses (nnunet without plans), before any data is read
    backbone_of_segmenter(cfg.segmenter).check_config(cfg.model)
    check_volume_crop(cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = prepare_data(cfg, out, resume)
    if enc is not None:
        check_init_matches(enc, cfg, data.in_channels, data.normalization)
        cfg.data.channels = data.in_channels
    total = run_length(cfg, data.n_train, max(1, cfg.train.devices)).total
    if cfg.init is not None and cfg.head_warmup_steps >= total:
        raise AhmError(f"head_warmup_steps: {cfg.head_warmup_steps} leaves none of the run's {total} steps to "
                       f"fine-tune the pretrained weights")

    # prepare_run_dir clears an unstarted run when asked to resume it
    lock.acquire()  # before --force clears anything, and again for a folder made just now
    prepare_run_dir(out, "finetune", cfg.train.seed, resume=resume or restart, force=force)
    lock.acquire()
    if not resume:
        save_config(cfg, out / "config.yaml")
        write_json(out / "splits.json", data.splits)
        write_json(out / "labelled.json", {"fraction": cfg.labels_fraction, "subjects_count": cfg.labels_subjects,
                                           "seed": cfg.train.seed,
                                           "subjects": data.subjects, "ids": data.labelled})
    return cfg, resume, data, enc


class RunLength(NamedTuple):
    batch_size: int
    steps_per_epoch: int
    epochs: int
    total: int


def run_length(cfg: FinetuneConfig, n_train: int, world: int) -> RunLength:
    """(batch size, steps per epoch, epochs, total steps) of a run on `n_train` labelled images."""
    if cfg.iterations_per_epoch:  # crops drawn with replacement: any number of volumes fills a batch
        batch_size, steps_per_epoch = cfg.train.batch_size, cfg.iterations_per_epoch
    else:
        # A labelled subset smaller than one batch still trains: the batch shrinks to what is there.
        batch_size = max(1, min(cfg.train.batch_size, n_train // world))
        steps_per_epoch = max(1, n_train // (batch_size * world))
    if cfg.train.epochs is None and cfg.train.steps:  # a config that counts steps instead of epochs
        total = cfg.train.steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = cfg.train.epochs or 1
        if cfg.min_steps and epochs * steps_per_epoch < cfg.min_steps:
            epochs = math.ceil(cfg.min_steps / steps_per_epoch)
        total = epochs * steps_per_epoch
    return RunLength(batch_size, steps_per_epoch, epochs, total)


def _meta(cfg: FinetuneConfig, data: FinetuneData, enc: PretrainedEncoder | None) -> dict[str, Any]:
    from ahm.eval.metrics import class_names
    from ahm.models import backbone_of_segmenter

    return {"segmenter": cfg.segmenter, "num_classes": data.num_classes, "in_channels": data.in_channels,
            "image_size": _side(cfg), "slice_axis": cfg.data.slice_axis,
            "index_modality": data.index.modality, "layout": data.index.layout,
            "init": str(enc.run_dir) if enc is not None else "none",
            "init_policy": enc.policy if enc is not None else None, "select_by": cfg.select_by,
            "protocol": protocol_of(cfg),
            "class_names": class_names(data.num_classes, data.index.class_names),
            **backbone_of_segmenter(cfg.segmenter).segmenter_record(cfg.model, cfg.data.spatial_dims),
            **pipeline_for(cfg).checkpoint_meta(cfg)}


def _train(fabric, cfg: FinetuneConfig, out: Path, resume: bool, progress: bool, data: FinetuneData,
           enc: PretrainedEncoder | None) -> dict[str, Any]:
    world = fabric.world_size
    if data.n_train < world:
        raise AhmError(f"{cfg.data.path}: {data.n_train} labelled training images, fewer than {world} devices")
    length = run_length(cfg, data.n_train, world)
    meta = _meta(cfg, data, enc)
    torch.manual_seed(cfg.train.seed)
    built = _build(cfg, data, enc if not resume else None)
    state, ckpt = RunState(), None
    if resume:
        ckpt = _restore(checkpoint_path(out), built.model, meta, state)
        built = built._replace(encoder_loaded=ckpt.get("encoder_loaded", {}))
    run = _set_up_run(fabric, cfg, out, progress, data, length, built, ckpt, state, meta)
    t_start = time.perf_counter()
    try:
        run_finetuning(run, state)
    finally:
        run.close()
    summary = _summary(cfg, state, data, meta, run, built.encoder_loaded, length)
    summary["train_s"] = time.perf_counter() - t_start
    if fabric.global_rank == 0:
        from ahm.eval.report import write_report

        summary["val"] = evaluate_best(run.raw_model, cfg, data, fabric.device, meta, out,
                                       max(length.batch_size, 16))
        write_json(out / "summary.json", summary)
        write_report(out)
    return summary


class _Built(NamedTuple):
    model: torch.nn.Module
    frozen: list[torch.nn.Module]  # a frozen encoder's modules
    optimizer: torch.optim.Optimizer
    encoder_loaded: dict[str, Any]  # what load_pretrained took from the encoder file


def _build(cfg: FinetuneConfig, data: FinetuneData, enc: PretrainedEncoder | None) -> _Built:
    """The segmenter with the encoder of `enc` loaded, and its optimiser (a frozen encoder's weights left out)."""
    from ahm.models import backbone_of_segmenter, build_segmenter, load_pretrained

    model = build_segmenter(cfg.segmenter, cfg.model, model_input_size(cfg.data), data.in_channels, data.num_classes,
                            spatial_dims=cfg.data.spatial_dims)
    encoder_loaded: dict[str, Any] = {}
    if enc is not None:
        loaded = load_pretrained(model, cfg.segmenter, enc.weights, {**enc.metadata, "path": str(enc.path)})
        encoder_loaded = {"loaded": int(loaded.get("loaded", 0)), "skipped": list(loaded.get("skipped", []))}
    frozen = backbone_of_segmenter(cfg.segmenter).encoder_modules(model) if cfg.freeze_encoder else []
    for module in frozen:
        module.requires_grad_(False)  # out of the optimiser (its groups keep trainable weights only) and of DDP
    optimizer = torch.optim.AdamW(_param_groups(model, cfg, cfg.init is not None), lr=cfg.train.lr,
                                  **adamw_kernel(model), weight_decay=cfg.train.weight_decay)
    return _Built(model, frozen, optimizer, encoder_loaded)


def _restore(last_path: Path, model: torch.nn.Module, meta: dict[str, Any], state: RunState) -> dict[str, Any]:
    """The checkpoint a resume continues from: its weights into `model`, its counters into `state`."""
    ckpt = load_checkpoint(last_path, "finetune")
    saved_meta = ckpt.get("meta", {})
    for key in ("num_classes", "in_channels", "segmenter", "select_by"):
        if saved_meta.get(key) != meta[key]:
            raise AhmError(f"--resume: {key} is {meta[key]} for this data but {saved_meta.get(key)} in {last_path}")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AhmError(f"{last_path}: does not match the configured model "
                       f"({str(exc).strip().splitlines()[0][:160]})") from exc
    state.restore_finetune(ckpt["state"])
    meta["init"], meta["init_policy"] = saved_meta.get("init", meta["init"]), saved_meta.get("init_policy")
    return ckpt


def _payload(raw_model: torch.nn.Module, optimizer, meta: dict[str, Any],
             encoder_loaded: dict[str, Any]) -> Callable[[RunState], dict[str, Any]]:
    def payload(state: RunState) -> dict[str, Any]:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": state.finetune_record(), "meta": meta, "encoder_loaded": encoder_loaded}

    return payload


def _set_up_run(fabric, cfg: FinetuneConfig, out: Path, progress: bool, data: FinetuneData, length: RunLength,
                built: _Built, ckpt: dict[str, Any] | None, state: RunState, meta: dict[str, Any]) -> FinetuneRun:
    """Fabric, the restored optimiser, the loader, log, bar and handlers: everything the engine's steps read."""
    from monai.losses import DiceCELoss

    is_main = fabric.global_rank == 0
    model = sync_batchnorm(fabric, built.model, cfg.train)
    raw_model = model
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, built.optimizer)
    guard = StepGuard(fabric.device) if StepGuard.usable(optimizer, cfg.train) else None
    if ckpt is not None:
        # after the model is on its device: Optimizer.load_state_dict puts each state tensor on its parameter's
        # device and dtype (loaded before, AdamW's moments would stay on the CPU beside CUDA parameters)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AhmError(f"{checkpoint_path(out)}: does not match the configured model "
                           f"({str(exc).strip().splitlines()[0][:160]})") from exc
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    loader = _loader(fabric, cfg, data, length.batch_size, state.step, length.total)
    log = MetricsLog(out, resume_step=state.step if ckpt is not None else None, tensorboard=True) if is_main else None
    bar = progress_bar(progress and is_main, "finetune", length.total, state.step,
                       [("loss", "loss {task.fields[loss]:.4f}", math.nan), ("val", "val Dice {task.fields[val]}", "-"),
                        ("rate", "{task.fields[rate]:.0f} img/s", 0.0)])
    checkpoints = Checkpoints(checkpoint_path(out), "finetune",
                              _payload(raw_model, optimizer, meta, built.encoder_loaded), enabled=is_main,
                              nan_hint="lower --lr, or set train.nan_policy: skip", names_step=False,
                              explains_failure=False)
    validate = BestCheckpoint(raw_model, cfg, data, fabric, max(length.batch_size, 16), checkpoint_path(out, BEST),
                              meta, enabled=is_main, progress=None if bar is None else (lambda text: bar.note(val=text)))
    return FinetuneRun(fabric, cfg, out, model, raw_model, built.frozen, optimizer, guard, loss_fn, checkpoints,
                       validate, DeviceLoss(fabric.device, torch.float64), length.total, length.steps_per_epoch,
                       validation_interval(cfg.val_every, length.steps_per_epoch, length.total),
                       cfg.head_warmup_steps if cfg.init is not None else 0, loader, iter(loader), log, bar)


def _loader(fabric, cfg: FinetuneConfig, data: FinetuneData, batch_size: int, start: int, total: int):
    """The training batches from step `start` on: each carries its (epoch, position, index) keys, so the samples
    are the same in any number of loader workers and from any start step; the seeded generator keeps the loader
    off torch's global random stream."""
    from ahm.data.corpus import StepBatches, make_loader
    from ahm.models import backbone_of_segmenter

    pipeline = pipeline_for(cfg)
    dataset = pipeline.training_set(cfg, data.train, train_crop_size(cfg), backbone_of_segmenter(cfg.segmenter).pads_crop)
    draws = cfg.iterations_per_epoch * batch_size * fabric.world_size if cfg.iterations_per_epoch else None
    plan = StepBatches(ShuffledItems(data.n_train, draws), cfg.train.seed, batch_size, start, total, fabric.global_rank,
                       fabric.world_size)
    loader = make_loader(dataset, plan, cfg.train.workers, collate_fn=None, pin_memory=fabric.device.type == "cuda",
                         persistent=True, generator=torch.Generator().manual_seed(cfg.train.seed))
    if loader.num_workers > 0:
        pipeline.before_workers(dataset)
    return loader


def _summary(cfg: FinetuneConfig, state: RunState, data: FinetuneData, meta: dict[str, Any], run: FinetuneRun,
             encoder_loaded: dict[str, Any], length: RunLength) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "best_val_dice": state.best_score, "best_epoch": state.best_epoch, "epochs": length.epochs,
        "steps": state.step, "batch_size": length.batch_size, "segmenter": cfg.segmenter,
        "num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": _side(cfg),
        "labels_fraction": cfg.labels_fraction, "labels_subjects": cfg.labels_subjects,
        "labelled_subjects": len(data.subjects),
        "labelled_images": len(data.train_ids), "val_images": len(data.val_ids), "validation_on": data.val_source,
        "init": meta["init"], "init_policy": meta["init_policy"], "encoder_loaded": encoder_loaded,
        "images_per_s": run.meter.median() or state.rate, "train_s": None,
        "skipped_batches": state.skipped, "seed": cfg.train.seed, "val_every": run.val_every,
        "selection_metric": f"validation {cfg.select_by} (best_val_dice is this figure)",
        "protocol": meta["protocol"],
        "trainable_parameters": sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad),
    }
    summary.update(pipeline_for(cfg).summary_fields(cfg, meta))
    return summary
