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

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.config import FinetuneConfig, PretrainConfig, load_config, model_input_size, save_config
from ahm.errors import AhmError
from ahm.io import load_torch, write_json
from ahm.train.checkpoint import (
    BEST,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    save_model_checkpoint,
)
from ahm.train.loop import (
    Interrupted,
    ShuffledItems,
    StepGuard,
    Throughput,
    adamw_kernel,
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
from ahm.train.rundir import MetricsLog, RunLock, prepare_run_dir, run_entries, unstarted_run
from ahm.train.schedule import lr_factor, pretrained_lr_factor, set_lr


@dataclass
class PretrainedEncoder:
    """What `--init RUN` brings: the encoder weights, their metadata and the pretraining config."""

    run_dir: Path
    path: Path
    weights: dict[str, torch.Tensor]
    metadata: dict[str, str]
    pretrain_cfg: PretrainConfig
    segmenter: str
    policy: str | None = None


@dataclass
class _Data:
    index: Any
    splits: dict[str, list[str]]
    labelled: list[str]
    train: Any  # ahm.data.Arrays; 3D: a VolumeDataset of training crops
    val: Any  # 3D: a VolumeDataset of whole preprocessed volumes
    val_source: str
    num_classes: int
    in_channels: int
    subjects: list[str] = field(default_factory=list)
    normalization: str = "auto"

    @property
    def n_train(self) -> int:
        return len(self.train.images) if hasattr(self.train, "images") else len(self.train)

    @property
    def train_ids(self) -> list[str]:
        return list(self.train.ids) if hasattr(self.train, "ids") else [item.id for item in self.train.items]

    @property
    def val_ids(self) -> list[str]:
        return list(self.val.ids) if hasattr(self.val, "ids") else [item.id for item in self.val.items]


MAX_VALIDATIONS = 50


def validation_interval(val_every: int | None, steps_per_epoch: int, total: int) -> int:
    """Steps between validations: `val_every` when set, else one epoch but at most ~MAX_VALIDATIONS per run."""
    if val_every is not None:
        return val_every
    return max(steps_per_epoch, math.ceil(total / MAX_VALIDATIONS))


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
    """3D: the crop is the segmenter's input, so each side must suit the backbone (strides, UNETR's patches)."""
    if cfg.data.spatial_dims != 3:
        return
    from ahm.data.volumes import check_crop
    from ahm.models import backbone_of_segmenter

    multiple = backbone_of_segmenter(cfg.segmenter).input_multiple(cfg.model)
    check_crop(cfg.data, multiple, why=f"the {cfg.segmenter} segmenter's input")


RANDOM_INIT = "random"  # `init: random`: no pretrained weights, asked for as the frozen protocol's scratch arm


def is_scratch_init(init: str | None) -> bool:
    """True when `init` names no pretraining run: none, 'none', 'scratch' or 'random'."""
    return init is None or str(init).strip().lower() in ("", "none", "scratch", RANDOM_INIT)


def check_freeze(cfg: FinetuneConfig) -> None:
    """The frozen-encoder protocol needs something to freeze: a pretraining run, or an explicit random encoder."""
    if cfg.freeze_encoder and (cfg.init is None or str(cfg.init).strip().lower() in ("", "none", "scratch")):
        raise AhmError("--freeze-encoder: nothing pretrained to freeze; give --init RUN (or --init random for the "
                       "frozen protocol's scratch arm: the same network with a random frozen encoder)")


def protocol_of(cfg: FinetuneConfig) -> str:
    """`frozen` (only the new layers train) or `finetune` (every weight trains), as summaries and tables name it."""
    return "frozen" if cfg.freeze_encoder else "finetune"


def set_train_mode(model: torch.nn.Module, frozen: list[torch.nn.Module]) -> None:
    """Training mode, except for the frozen encoder: its normalisation statistics stay those it came with."""
    model.train()
    for module in frozen:
        module.eval()


def load_init(init: str | Path) -> PretrainedEncoder:
    """Read a pretraining run's encoder.safetensors and config; AhmError naming the file when anything is off."""
    from ahm.io import load_safetensors, safetensors_metadata
    from ahm.models import BACKBONES
    from ahm.runformat import migrate

    run = Path(init)
    if not run.is_dir():
        raise AhmError(f"--init {run}: not found; give a pretraining run directory (from `ahm pretrain`) or 'none'")
    migrate(run)
    path = run / "encoder.safetensors"
    if not path.is_file():
        raise AhmError(f"--init {run}: {path.name} not found; the pretraining did not finish "
                       f"(resume it with `ahm pretrain ... --out {run} --resume`) or this is not a pretraining run")
    weights = load_safetensors(path)
    try:
        metadata = safetensors_metadata(path)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise AhmError(f"{path}: unreadable encoder metadata ({str(exc)[:120]})") from exc
    backbone = metadata.get("backbone")
    if backbone not in BACKBONES:
        raise AhmError(f"{path}: no backbone ({' or '.join(BACKBONES)}) in its metadata; not an ahm encoder file")
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise AhmError(f"--init {run}: config.yaml not found; it is needed to rebuild the pretrained network")
    pre_cfg = load_config(PretrainConfig, cfg_path)
    if pre_cfg.model.backbone != backbone:
        raise AhmError(f"{path}: encoder backbone {backbone!r} does not match {cfg_path} "
                       f"(model.backbone {pre_cfg.model.backbone!r})")
    return PretrainedEncoder(run, path, weights, metadata, pre_cfg, BACKBONES[backbone].segmenter,
                             metadata.get("policy"))


def _apply_init(cfg: FinetuneConfig, enc: PretrainedEncoder) -> None:
    """The encoder decides the network: its backbone and sizes. Image size, channels and normalisation are
    checked against the data once it is read (`init_check`)."""
    from ahm.models import backbone_of_segmenter

    channels = enc.metadata.get("in_channels")
    if channels is not None:
        channels = int(channels)
        if cfg.data.channels is not None and cfg.data.channels != channels:
            raise AhmError(f"data.channels {cfg.data.channels} does not match the encoder in {enc.path} "
                           f"({channels} input channels)")
    cfg.model = backbone_of_segmenter(enc.segmenter).finetune_model_config(enc.pretrain_cfg.model, cfg.model)
    cfg.segmenter = enc.segmenter


def _check_out(out: Path, resume: bool, force: bool) -> None:
    # The cheap refusal first, before any data is read; prepare_run_dir repeats it when creating the folder.
    if resume or force:
        return
    if out.is_dir() and run_entries(out):
        raise AhmError(f"--out {out}: directory is not empty; use --resume to continue it or --force to replace it")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AhmError(f"{path}: unreadable ({exc})") from exc


def _prepare_data(cfg: FinetuneConfig, out: Path, resume: bool) -> _Data:
    from ahm.data import open_dataset

    if not cfg.data.path:
        raise AhmError("DATA: no dataset path given")
    index = open_dataset(cfg.data.path, cfg.data)
    if not index.has_labels:
        raise AhmError(f"{cfg.data.path}: no masks found ({index.layout} layout); fine-tuning needs labelled images "
                       f"(e.g. masks/ beside images/ with the same file names)")
    splits, labelled = _splits_and_subset(cfg, index, out, resume)
    if cfg.data.spatial_dims == 3:
        return _prepare_volumes(cfg, index, splits, labelled)
    return _prepare_arrays(cfg, index, splits, labelled)


def _splits_and_subset(cfg: FinetuneConfig, index, out: Path, resume: bool) -> tuple[dict, list[str]]:
    from ahm.data import label_subset, make_splits

    if resume and (out / "splits.json").is_file() and (out / "labelled.json").is_file():
        splits = _read_json(out / "splits.json")
        labelled = list(_read_json(out / "labelled.json").get("ids", []))
        known = {item.id for item in index.items}
        lost = [i for i in labelled + list(splits.get("val", [])) if i not in known]
        if lost:
            raise AhmError(f"--resume: {cfg.data.path} no longer holds {lost[0]} (and {len(lost) - 1} more) "
                           f"listed in {out / 'labelled.json'}; the dataset changed since the run started")
    else:
        splits = make_splits(index, cfg.data)
        if not splits.get("train"):
            raise AhmError(f"{cfg.data.path}: no training subjects after splitting")
        labelled = label_subset(index, splits["train"], cfg.labels_fraction, cfg.train.seed,
                                subjects_count=cfg.labels_subjects)
    if not labelled:
        raise AhmError(f"--labels-fraction {cfg.labels_fraction}: gives no labelled training subjects")
    return splits, labelled


def _num_classes(cfg: FinetuneConfig, found: int) -> int:
    if cfg.num_classes is not None:
        if cfg.num_classes < found:
            raise AhmError(f"num_classes {cfg.num_classes} is too small: labels in {cfg.data.path} go up to {found - 1}")
        return cfg.num_classes
    return max(2, found)


# Preprocessed volumes are kept in memory up to this many bytes as stored (resampling changes it by the spacing
# ratio): small sets read and resample each volume once, large ones read them again each time.
VOLUME_CACHE_BYTES = 4 << 30


def _prepare_volumes(cfg: FinetuneConfig, index, splits: dict, labelled: list[str]) -> _Data:
    from ahm.data.dataset import normalization_rule
    from ahm.data.volumes import raw_volume_bytes, read_volume_item, volume_dataset

    by_id = index.by_id()
    val_ids = list(splits.get("val", []))
    stored = sum(raw_volume_bytes(by_id[i]) for i in dict.fromkeys(labelled + val_ids))
    cache = stored <= VOLUME_CACHE_BYTES
    train = volume_dataset(index, labelled, cfg.data, labels=True, train=True, seed=cfg.train.seed, cache=cache)
    in_channels = int(train.prepared(0)["image"].shape[0])
    data_cfg = cfg.data.model_copy(update={"channels": in_channels})
    if cfg.data.channels != in_channels:  # the first volume decides the channels; the others are converted to it
        train = volume_dataset(index, labelled, data_cfg, labels=True, train=True, seed=cfg.train.seed, cache=cache)
    if val_ids:
        val_source = "val"
    else:
        val_ids, val_source = list(labelled), "train (no validation split)"
    val = volume_dataset(index, val_ids, data_cfg, labels=True, train=False, cache=cache)
    if index.label_values:
        found = max(index.label_values) + 1
    else:  # no declared label set: the largest label in the volumes as stored
        found = 1 + max(int(read_volume_item(by_id[i], index, data_cfg, labels=True)[1].max(initial=0))
                        for i in dict.fromkeys(labelled + val_ids))
    subjects = sorted({by_id[i].subject for i in labelled})
    return _Data(index, splits, labelled, train, val, val_source, _num_classes(cfg, found), in_channels, subjects,
                 normalization_rule(data_cfg, index))


def _prepare_arrays(cfg: FinetuneConfig, index, splits: dict, labelled: list[str]) -> _Data:
    from ahm.data import load_arrays

    train = load_arrays(index, labelled, cfg.data, labels=True)
    in_channels = int(train.images.shape[1])
    data_cfg = cfg.data.model_copy(update={"channels": in_channels})
    val_ids = list(splits.get("val", []))
    if val_ids:
        val, val_source = load_arrays(index, val_ids, data_cfg, labels=True), "val"
    else:
        # No validation subjects (a tiny dataset): the best epoch is chosen on the labelled training images.
        val, val_source = train, "train (no validation split)"
    found = max(int(train.labels.max(initial=0)), int(val.labels.max(initial=0)),
                max(index.label_values or [0])) + 1
    by_id = index.by_id()
    subjects = sorted({by_id[i].subject for i in train.ids})
    return _Data(index, splits, labelled, train, val, val_source, _num_classes(cfg, found), in_channels, subjects,
                 train.normalization)


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
    """Fine-tune (or resume) into run directory `out`; returns the summary written to summary.json."""
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


def _lead(fabric, cfg: FinetuneConfig, out: Path, resume: bool, progress: bool, data: "_Data",
          enc: PretrainedEncoder | None) -> dict[str, Any]:
    if fabric.world_size > 1:
        fabric.broadcast((cfg, resume), src=0)  # what `_follow` needs from rank 0's set-up
    return _train(fabric, cfg, out, resume, progress, data, enc)


def _follow(fabric, out: Path, progress: bool) -> dict[str, Any]:
    """A torchrun rank other than 0: rank 0's resolved config and resume decision, then the labelled subset and
    splits it wrote into the run directory. No encoder is loaded here: DDP's set-up copies rank 0's weights."""
    cfg, resume = fabric.broadcast(None, src=0)
    data = _prepare_data(cfg, out, resume=True)
    return _train(fabric, cfg, out, resume, progress, data, None)


def _set_up(cfg: FinetuneConfig, out: Path, resume: bool, force: bool,
            lock: RunLock) -> tuple[FinetuneConfig, bool, "_Data", PretrainedEncoder | None]:
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
        from ahm.train.init_check import check_spatial_dims

        check_spatial_dims(enc, cfg)
        _apply_init(cfg, enc)
    from ahm.models import backbone_of_segmenter

    backbone_of_segmenter(cfg.segmenter)  # an unknown name, refused before any data is read
    check_volume_crop(cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = _prepare_data(cfg, out, resume)
    if enc is not None:
        from ahm.train.init_check import check_init_matches

        check_init_matches(enc, cfg, data.in_channels, data.normalization)
        cfg.data.channels = data.in_channels
    total = run_length(cfg, data.n_train, max(1, cfg.train.devices))[3]
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


def run_length(cfg: FinetuneConfig, n_train: int, world: int) -> tuple[int, int, int, int]:
    """(batch size, steps per epoch, epochs, total steps) of a run on `n_train` labelled images."""
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
    return batch_size, steps_per_epoch, epochs, total


def _meta(cfg: FinetuneConfig, data: _Data, enc: PretrainedEncoder | None) -> dict[str, Any]:
    from ahm.eval.metrics import class_names

    return {"segmenter": cfg.segmenter, "num_classes": data.num_classes, "in_channels": data.in_channels,
            "image_size": _side(cfg), "slice_axis": cfg.data.slice_axis,
            "index_modality": data.index.modality, "layout": data.index.layout,
            "init": str(enc.run_dir) if enc is not None else "none",
            "init_policy": enc.policy if enc is not None else None, "select_by": cfg.select_by,
            "protocol": protocol_of(cfg),
            "class_names": class_names(data.num_classes, data.index.class_names),
            # the 3D contract (ahm.eval.evaluate.load_run): a checkpoint without spatial_dims is 2D
            **({"spatial_dims": 3, "roi_size": list(model_input_size(cfg.data))} if cfg.data.spatial_dims == 3 else {})}


def _train(fabric, cfg: FinetuneConfig, out: Path, resume: bool, progress: bool, data: _Data,
           enc: PretrainedEncoder | None) -> dict[str, Any]:
    from monai.losses import DiceCELoss

    from ahm.data import ArrayDataset, segment_augment
    from ahm.data.corpus import StepBatches, make_loader
    from ahm.eval.evaluate import predict_labels
    from ahm.models import backbone_of_segmenter, build_segmenter, load_pretrained

    rank, world = fabric.global_rank, fabric.world_size
    is_main = rank == 0
    n_train = data.n_train
    if n_train < world:
        raise AhmError(f"{cfg.data.path}: {n_train} labelled training images, fewer than {world} devices")
    batch_size, steps_per_epoch, epochs, total = run_length(cfg, n_train, world)
    val_every = validation_interval(cfg.val_every, steps_per_epoch, total)
    head_steps = cfg.head_warmup_steps if cfg.init is not None else 0
    meta = _meta(cfg, data, enc)

    torch.manual_seed(cfg.train.seed)
    model = build_segmenter(cfg.segmenter, cfg.model, model_input_size(cfg.data), data.in_channels, data.num_classes,
                            spatial_dims=cfg.data.spatial_dims)
    encoder_loaded: dict[str, Any] = {}
    if enc is not None and not resume:
        encoder_loaded = load_pretrained(model, cfg.segmenter, enc.weights, {**enc.metadata, "path": str(enc.path)})
        encoder_loaded = {"loaded": int(encoder_loaded.get("loaded", 0)),
                          "skipped": list(encoder_loaded.get("skipped", []))}
    frozen = backbone_of_segmenter(cfg.segmenter).encoder_modules(model) if cfg.freeze_encoder else []
    for module in frozen:
        module.requires_grad_(False)  # out of the optimiser (its groups keep trainable weights only) and of DDP
    optimizer = torch.optim.AdamW(_param_groups(model, cfg, cfg.init is not None), lr=cfg.train.lr, **adamw_kernel(model),
                                  weight_decay=cfg.train.weight_decay)

    state = {"step": 0, "best_val_dice": -1.0, "best_epoch": 0, "skipped": 0, "loss_sum": 0.0, "loss_n": 0}
    last_path = checkpoint_path(out)
    best_path = checkpoint_path(out, BEST)
    if resume:
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
        for key in state:
            state[key] = ckpt["state"][key]
        encoder_loaded = ckpt.get("encoder_loaded", {})
        meta["init"], meta["init_policy"] = saved_meta.get("init", meta["init"]), saved_meta.get("init_policy")
    model = sync_batchnorm(fabric, model, cfg.train)
    raw_model = model
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, optimizer)
    guard = StepGuard(fabric.device) if StepGuard.usable(optimizer, cfg.train) else None
    if resume:
        # after the model is on its device: Optimizer.load_state_dict puts each state tensor on its parameter's
        # device and dtype (loaded before, AdamW's moments would stay on the CPU beside CUDA parameters)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AhmError(f"{last_path}: does not match the configured model "
                           f"({str(exc).strip().splitlines()[0][:160]})") from exc
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    volumes = cfg.data.spatial_dims == 3
    transform = None if volumes else (segment_augment(cfg.data.image_size, cfg.min_crop_area, cfg.rotate_deg, cfg.intensity_jitter,
                                 cfg.gamma, cfg.bias_field, crop_size=train_crop_size(cfg), pad=backbone_of_segmenter(cfg.segmenter).pads_crop)
                 if cfg.train.augment else None)
    # 3D: the volume dataset draws its crops (and augments them) itself, seeded by (seed, epoch, index) too
    dataset = data.train if volumes else ArrayDataset(data.train.images, data.train.labels, transform,
                                                      seed=cfg.train.seed)
    # Each batch carries its (epoch, position, index) keys, so the samples are the same in any number of loader
    # workers and from any start step; the seeded generator keeps the loader off torch's global random stream.
    plan = StepBatches(ShuffledItems(n_train), cfg.train.seed, batch_size, state["step"], total, rank, world)
    loader = make_loader(dataset, plan, cfg.train.workers, collate_fn=None, pin_memory=fabric.device.type == "cuda",
                         persistent=True, generator=torch.Generator().manual_seed(cfg.train.seed))
    if volumes and loader.num_workers > 0:
        dataset.preload()  # before the workers fork, so that they share the cached volumes
    log = MetricsLog(out, resume_step=state["step"] if resume else None, tensorboard=is_main) if is_main else None
    meter = Throughput()
    bar = progress_bar(progress and is_main, "finetune", total, state["step"],
                       [("loss", "loss {task.fields[loss]:.4f}", math.nan), ("val", "val Dice {task.fields[val]}", "-"),
                        ("rate", "{task.fields[rate]:.0f} img/s", 0.0)])
    min_ratio = cfg.train.min_lr / max(cfg.train.lr, 1e-12)

    def save_last() -> None:
        if is_main:
            save_checkpoint(last_path, "finetune", {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                                    "state": dict(state), "meta": meta, "encoder_loaded": encoder_loaded})

    def validate(epoch: int) -> float:
        # the plain module: each rank predicts its own share, so DDP's forward (and its collectives) stays out
        dice = validation_score(raw_model, cfg, data, fabric, max(batch_size, 16))
        if dice > state["best_val_dice"]:
            state["best_val_dice"], state["best_epoch"] = dice, epoch
            if is_main:
                save_model_checkpoint(best_path, raw_model.state_dict(), meta, epoch, dice)
        return dice

    def stopped_by(bad: str, at: int | None = None) -> str:
        return (f"step {state['step'] + 1 if at is None else at + 1}: {bad}; run stopped. Last good checkpoint: "
                f"{last_path if last_path.is_file() else 'none yet'} (lower --lr, or set train.nan_policy: skip)")

    # the training loss is summed on the device ([sum, count]) and read where the step reads the device anyway
    # (logging, validation, checkpoints): `flush` moves it into `log_window` and the state a checkpoint keeps
    window = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    log_window = [0.0, 0.0]
    last_loss = math.nan

    def flush() -> None:
        nonlocal last_loss
        guarded = guard.state() if guard is not None else []
        total_loss, count, *rest = read_scalars([window[0], window[1], *guarded])
        window.zero_()
        if guarded:
            state["skipped"] += guard.settle(rest, cfg.train.nan_policy, stopped_by)
        if world > 1:  # every rank's steps: the logged loss is over the global batch
            shares = gather_objects(fabric, (total_loss, count))
            total_loss, count = sum(s[0] for s in shares), sum(s[1] for s in shares)
        log_window[0] += total_loss
        log_window[1] += count
        state["loss_sum"] += total_loss
        state["loss_n"] += count
        if count:
            last_loss = total_loss / count

    rate = 0.0
    t_start = time.perf_counter()
    batches = iter(loader)
    try:
        with stop_on_sigint() as sig:
            while state["step"] < total:
                step = state["step"]
                epoch = step // steps_per_epoch
                batch = next(batches)
                images = batch["image"].to(fabric.device, non_blocking=True)
                labels = batch["label"].unsqueeze(1).to(fabric.device, non_blocking=True)
                lr = set_lr(optimizer, lr_factor(step, total, cfg.train.warmup_steps, min_ratio),
                            pretrained_lr_factor(step, total, cfg.train.warmup_steps, min_ratio, head_steps))
                meter.start()
                set_train_mode(model, frozen)
                loss = loss_fn(model(images), labels)
                bad = optimizer_step(fabric, model, optimizer, loss, cfg.train, list(raw_model.parameters()),
                                     stopped_by, guard=guard, step=step)
                if bad is not None:
                    state["skipped"] += 1
                else:
                    kept = torch.isfinite(loss.detach())
                    if guard is not None:  # a step the guard skipped is not a loss to log
                        kept = kept & ~guard.last_bad
                    window += torch.stack([torch.where(kept, loss.detach().double(), 0.0), kept.double()])
                rate = meter.stop(len(images) * world)
                state["step"] = step = step + 1
                logged = step % cfg.train.log_every == 0 or step == total
                validated = step % val_every == 0 or step == total
                if logged or validated or step % cfg.train.checkpoint_every == 0:
                    flush()
                if log is not None and logged and log_window[1]:
                    log.log({"epoch": epoch + 1, "step": step, "loss": log_window[0] / log_window[1], "lr": lr,
                             "images_per_s": rate})
                if logged:
                    log_window[:] = [0.0, 0.0]
                val_dice = None
                if validated:
                    val_dice = validate(epoch + 1)
                    if log is not None:
                        log.log({"epoch": epoch + 1, "step": step, "train_loss": state["loss_sum"] / max(state["loss_n"], 1),
                                 "val_dice": val_dice, "lr": lr, "images_per_s": meter.median() or rate,
                                 **({"skipped_batches": state["skipped"]} if state["skipped"] else {})})
                    state["loss_sum"], state["loss_n"] = 0.0, 0
                    save_last()
                elif step % cfg.train.checkpoint_every == 0:
                    save_last()
                if bar is not None:
                    bar.update(step, loss=last_loss, val=None if val_dice is None else f"{val_dice:.3f}",
                               rate=rate)
                if stop_requested(fabric, sig, step, cfg.train.log_every):
                    save_last()
                    raise Interrupted(
                        f"interrupted at step {step}/{total}; checkpoint saved to {last_path}. "
                        f"Resume with: ahm finetune {cfg.data.path} --out {out} --resume")
    finally:
        del batches, loader  # stops the loader's workers, also when the run stops with an exception
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    summary: dict[str, Any] = {
        "best_val_dice": state["best_val_dice"], "best_epoch": state["best_epoch"], "epochs": epochs,
        "steps": state["step"], "batch_size": batch_size, "segmenter": cfg.segmenter,
        "num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": _side(cfg),
        "labels_fraction": cfg.labels_fraction, "labels_subjects": cfg.labels_subjects,
        "labelled_subjects": len(data.subjects),
        "labelled_images": len(data.train_ids), "val_images": len(data.val_ids), "validation_on": data.val_source,
        "init": meta["init"], "init_policy": meta["init_policy"], "encoder_loaded": encoder_loaded,
        "images_per_s": meter.median() or rate, "train_s": time.perf_counter() - t_start,
        "skipped_batches": state["skipped"], "seed": cfg.train.seed, "val_every": val_every,
        "selection_metric": f"validation {cfg.select_by} (best_val_dice is this figure)",
        "protocol": meta["protocol"],
        "trainable_parameters": sum(p.numel() for p in raw_model.parameters() if p.requires_grad),
    }
    if volumes:
        summary.update({"spatial_dims": 3, "roi_size": meta["roi_size"], "overlap": cfg.overlap})
    if is_main:
        from ahm.eval.evaluate import score_arrays
        from ahm.eval.report import write_report

        best = load_torch(best_path)
        raw_model.load_state_dict(best["model"])
        extra = {"checkpoint": f"checkpoints/{BEST}", "checkpoint_epoch": best["epoch"], "data": str(cfg.data.path),
                 "source": data.val_source}
        if volumes:
            scores, _ = _score_volumes(raw_model, cfg, data, fabric.device, meta["class_names"])
            val_metrics = {"split": "val", **scores, "level": "volume", **extra}
            write_json(out / "eval" / "val" / "metrics.json", val_metrics)
            summary["val"] = {k: val_metrics.get(k) for k in ("dice", "iou", "hd95", "dataset_dice", "level",
                                                              "hd95_unit")}
            write_json(out / "summary.json", summary)
            write_report(out)
            return summary
        preds = predict_labels(raw_model, data.val.images, batch_size=max(batch_size, 16), device=fabric.device)
        val_metrics = score_arrays(out / "eval" / "val", preds, data.val.labels, data.val.images, data.val.ids,
                                   data.val.items, data.num_classes, "val", names=meta["class_names"],
                                   spacing=data.val.spacing, slice_mm=data.val.slice_mm,
                                   extra={"checkpoint": f"checkpoints/{BEST}", "checkpoint_epoch": best["epoch"],
                                          "data": str(cfg.data.path), "source": data.val_source})
        summary["val"] = {k: val_metrics[k] for k in ("dice", "iou", "hd95", "dataset_dice", "level", "hd95_unit")}
        write_json(out / "summary.json", summary)
        write_report(out)
    return summary


def validation_score(model, cfg: FinetuneConfig, data: _Data, fabric, batch_size: int) -> float:
    """The figure that keeps the best checkpoint (`cfg.select_by`), with the validation set sharded over the ranks:
    each predicts every world-th case from its rank on, the predictions are gathered, and every rank scores the
    whole set, so the figure is the one-process figure exactly and every rank keeps the same best epoch. It runs in
    the run's precision on a GPU (`inference_precision`)."""
    from ahm.eval.evaluate import inference_precision, predict_labels
    from ahm.eval.metrics import selection_score

    rank, world = fabric.global_rank, fabric.world_size
    precision = inference_precision(cfg, fabric.device, None)
    if cfg.data.spatial_dims == 3:
        shares = gather_objects(fabric, _predict_volumes(model, cfg, data, fabric.device,
                                                         range(rank, len(data.val), world), precision))
        cases = sorted((case for share in shares for case in share), key=lambda case: case[0])
        return _volume_selection(_volume_scores(cases, data.num_classes)[0], cfg.select_by)
    mine = np.arange(rank, len(data.val.images), world)
    shares = gather_objects(fabric, (mine, predict_labels(model, data.val.images[mine], batch_size=batch_size,
                                                          device=fabric.device, precision=precision)))
    preds = np.zeros((len(data.val.images),) + shares[0][1].shape[1:], dtype=np.int64)
    for indices, share in shares:
        preds[indices] = share
    return selection_score(preds, data.val.labels, data.num_classes, cfg.select_by)


def _predict_volumes(model, cfg: FinetuneConfig, data: _Data, device, indices,
                     precision: str = "32-true") -> list[tuple]:
    """(index, prediction, target, spacing, id) of the validation volumes `indices`, each predicted whole by
    sliding windows of the training crop on the preprocessed grid."""
    from ahm.data.volumes import preprocessed_spacing
    from ahm.eval.evaluate import predict_volume_labels

    cases = []
    for i in indices:
        sample = data.val[i]
        (pred,) = predict_volume_labels(model, [sample["image"].as_tensor()], list(model_input_size(cfg.data)),
                                        overlap=cfg.overlap, mode="gaussian", device=device, precision=precision)
        cases.append((i, pred, torch.round(sample["label"].as_tensor()[0]).long().numpy(),
                      preprocessed_spacing(sample), sample["id"]))
    return cases


def _volume_scores(cases: list[tuple], num_classes: int, names: list[str] | None = None) -> tuple[dict, dict]:
    """`volume_scores` of predicted volumes, each one case, HD95 in mm from the preprocessed grid's spacing."""
    from ahm.eval.metrics import volume_scores

    _, preds, targets, spacings, ids = (list(column) for column in zip(*cases))
    return volume_scores(preds, targets, num_classes, spacings=spacings, class_names=names, empty="exclude", ids=ids)


def _score_volumes(model, cfg: FinetuneConfig, data: _Data, device,
                   names: list[str] | None = None) -> tuple[dict, dict]:
    """`volume_scores` of every validation volume, predicted in this process."""
    return _volume_scores(_predict_volumes(model, cfg, data, device, range(len(data.val))), data.num_classes, names)


def _volume_selection(scores: dict, select_by: str) -> float:
    """`selection_score`'s two figures from a `volume_scores` summary: dataset_dice pooled over the volumes,
    case_dice the per-volume mean (empty-empty volumes left out); 0 when undefined."""
    value = scores.get("dataset_dice" if select_by == "dataset_dice" else "dice")
    return float(value) if value is not None else 0.0
