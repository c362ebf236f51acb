"""`ahm finetune`, `ahm evaluate`, `ahm predict`: from a pretrained encoder to masks on new images."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ahm.cli.app import app, console, fail, is_quiet, out, run_guarded

ACCELERATOR_HELP = "auto, cpu or cuda (default: the run's own: cuda if it trained on a GPU and one is here)."
PRECISION_HELP = "32-true, bf16-mixed or 16-mixed (GPU only) (default: the run's own on a GPU, else 32-true)."


@app.command(no_args_is_help=True)
def finetune(
    data: Path = typer.Argument(..., help="Labelled dataset folder (any supported layout, with masks)."),
    init: str | None = typer.Option(None, "--init", help="Pretraining run directory, or 'none' to train from scratch; "
                                    "its channels, image size, patch grid and normalisation must match DATA."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory to create (or to continue with --resume)."),
    segmenter: str | None = typer.Option(None, "--segmenter", help="Segmenter with --init none: unetr, unet or "
                                         "nnunet (--plans, --configuration) (with a pretraining run, its backbone "
                                         "decides)."),
    plans: Path | None = typer.Option(None, "--plans", help="nnunet segmenter with --init none: nnU-Net plans file "
                                      "(nnUNet_preprocessed/DatasetNNN_X/nnUNetPlans.json); it also sets the image "
                                      "size (3D: crop and spacing)."),
    configuration: str | None = typer.Option(None, "--configuration", help="nnunet segmenter with --init none: the "
                                             "plans' configuration (2d, 3d_fullres, ...)."),
    # `ahm pretrain --model` is a ViT size; here the old name of --segmenter, kept for one version.
    model: str | None = typer.Option(None, "--model", hidden=True),
    labels_fraction: float | None = typer.Option(None, "--labels-fraction",
                                                    help="Share of training subjects whose labels are used (default 1)."),
    labels_subjects: int | None = typer.Option(None, "--labels-subjects",
                                               help="Label exactly this many training subjects (instead of "
                                                    "--labels-fraction), drawn with --seed."),
    epochs: int | None = typer.Option(None, help="Training epochs over the labelled subset (default 30)."),
    steps: int | None = typer.Option(None, help="Training steps instead of --epochs (small labelled subsets)."),
    val_every: int | None = typer.Option(None, "--val-every",
                                         help="Steps between validations (default: each epoch, at most ~50 per run)."),
    seed: int | None = typer.Option(None, help="Seed for the labelled subset, data order, augmentation, init."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step (default 8)."),
    lr: float | None = typer.Option(None, help="Peak learning rate of the decoder/head (default 1e-3)."),
    layer_decay: float | None = typer.Option(None, "--layer-decay",
                                                help="Layer-wise lr decay over pretrained ViT blocks (1: off)."),
    encoder_lr_scale: float | None = typer.Option(None, "--encoder-lr-scale",
                                                     help="lr multiplier on pretrained weights (default 1)."),
    freeze_encoder: bool | None = typer.Option(
        None, "--freeze-encoder", help="Frozen-encoder protocol: train only the new layers (UNETR's decoder; the "
        "UNet's expanding path and head), the encoder's weights and normalisation statistics fixed. Needs --init RUN; "
        "--init random gives its scratch arm (the same network, its encoder random and frozen)."),
    head_warmup_steps: int | None = typer.Option(
        None, "--head-warmup-steps",
        help="First steps in which only the new layers train, pretrained weights at lr 0 (LP-FT; default 0)."),
    select_by: str | None = typer.Option(
        None, "--select-by",
        help="Validation figure that keeps the best checkpoint: dataset_dice (default; pooled over the split) or "
             "case_dice (per-case mean, empty-in-both cases left out). Neither can be won by predicting nothing."),
    image_size: int | None = typer.Option(None, "--image-size",
                                             help="Model grid size (default: the pretraining run's, else 128)."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims",
                                            help="2 (default: slices) or 3 (whole volumes, resampled to "
                                                 "data.spacing, trained on data.crop_size crops). With --init, the "
                                                 "pretraining run's dimension, and in 3D its data.spacing, "
                                                 "orientation and crop_size, unless set here or in --config. 3D "
                                                 "defaults: 64^3 crops at 1.5 mm, --batch-size 2, --lr 5e-4, 4 "
                                                 "epochs of 250 steps (crops drawn with replacement), whole-volume "
                                                 "validation after each epoch and at the end."),
    overlap: float | None = typer.Option(None, "--overlap", help="3D validation: overlap of the sliding windows "
                                         "(the training crop), in [0, 1) (default 0.5)."),
    layout: str | None = typer.Option(None, help="Dataset layout (default: auto-detect)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable files (listed) instead of stopping."),
    devices: int | None = typer.Option(None, help="Number of devices."),
    accelerator: str | None = typer.Option(None, help="auto, cpu or cuda."),
    precision: str | None = typer.Option(None, help="32-true, bf16-mixed or 16-mixed."),
    workers: int | None = typer.Option(None, "--workers",
                                       help="DataLoader processes preparing batches ahead (default: half the CPU "
                                            "cores, at most 4; 0: in the training process). Results do not "
                                            "depend on it."),
    config: Path | None = typer.Option(None, "--config", help="YAML config; command-line options override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory in --out."),
) -> None:
    """Fine-tune a segmenter on a fraction of the labels; keeps the best checkpoint by validation Dice
    (dataset-level by default, see --select-by)."""
    from ahm.config.runs import is_scratch_init
    from ahm.models.backbones import segmenter_names
    from ahm.train.finetune import finetune as run_finetune
    from ahm.train.resolve import resolve_finetune_config

    option = "--segmenter"
    if model is not None:
        console.print("warning: `ahm finetune --model` is deprecated and will be removed; use --segmenter",
                      highlight=False, markup=False, soft_wrap=True)
        if segmenter is not None and segmenter != model:
            fail(f"--segmenter {segmenter} and --model {model}: give --segmenter only")
        segmenter, option = model, "--model"
    if segmenter is not None and segmenter not in segmenter_names():
        fail(f"{option} {segmenter}: choose {' or '.join(segmenter_names())}")
    if (plans is not None or configuration is not None) and not is_scratch_init(init):
        fail(f"--plans/--configuration: the nnunet segmenter of --init {init} is the pretraining run's own "
             f"network (its plans); give them only with --init none")
    if steps is not None and epochs is not None:
        fail("--steps and --epochs: give one of them")
    if labels_fraction is not None and labels_subjects is not None:
        fail("--labels-fraction and --labels-subjects: give one of them")
    options = {
        "data": {"path": str(data), "image_size": image_size, "layout": layout, "skip_bad": skip_bad or None,
                 "spatial_dims": spatial_dims},
        "overlap": overlap,
        "model": {"plans": str(plans) if plans else None, "configuration": configuration},
        "segmenter": segmenter, "labels_fraction": labels_fraction,
        "labels_subjects": labels_subjects,
        "layer_decay": layer_decay, "encoder_lr_scale": encoder_lr_scale, "val_every": val_every,
        "head_warmup_steps": head_warmup_steps, "select_by": select_by, "freeze_encoder": freeze_encoder,
        "train": {"epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "devices": devices,
                  "accelerator": accelerator, "precision": precision, "workers": workers},
    }

    def go():
        cfg = resolve_finetune_config(options, init, file=config, resume=resume, segmenter_option=option)
        return run_finetune(cfg, out_dir, resume=resume, force=force, progress=not is_quiet())

    summary = run_guarded(go)
    if isinstance(summary, dict):
        val = summary.get("val", {})
        out.print(
            f"fine-tuned [bold]{summary['segmenter']}[/] ({'from ' + str(summary['init']) if summary['init'] != 'none' else 'from scratch'}) "
            f"for {summary['epochs']} epochs on {summary['labelled_images']} labelled images "
            f"({summary['labelled_subjects']} subjects): best {summary.get('selection_metric', 'validation Dice').split(' (')[0]} "
            f"{summary['best_val_dice']:.4f} "
            f"(epoch {summary['best_epoch']})"
            + (f"; IoU {val['iou']:.4f}" if isinstance(val.get("iou"), float) else "")
            + f"\nrun directory: {out_dir}\nreport: {out_dir / 'report.html'}", highlight=False)


@app.command(no_args_is_help=True)
def evaluate(
    run_dir: Path = typer.Argument(..., help="Fine-tuning run directory."),
    data: Path | None = typer.Option(None, "--data", help="Labelled dataset (default: the one trained on)."),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per inference batch."),
    empty_cases: str = typer.Option(
        "exclude", "--empty-cases",
        help="Cases where a class is absent from both prediction and ground truth: 'exclude' (undefined, left out "
             "of per-case means, as nnU-Net) or 'one' (scored 1, the old convention of some papers; it rewards "
             "predicting nothing where a structure is rare)."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json only."),
    out_dir: Path | None = typer.Option(None, "--out", help="Folder for metrics.json and the per-case files "
                                        "(default: RUN/eval/<split>, and report.html refreshed); with it nothing is "
                                        "written into the run directory, which may be read-only."),
    overlap: float = typer.Option(0.5, "--overlap", help="3D runs: share of a sliding window (the training crop) "
                                  "shared with its neighbour, in [0, 1)."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims", help="2 or 3; must be the run's own "
                                            "(default: the run's, from its checkpoint)."),
    accelerator: str | None = typer.Option(None, "--accelerator", help=ACCELERATOR_HELP),
    precision: str | None = typer.Option(None, "--precision", help=PRECISION_HELP),
) -> None:
    """Dice (per case and dataset-level), IoU, HD95 and detection counts per class on a split; writes eval/<split>/
    (or --out) and refreshes report.html. Slices of volumes are also re-stacked and scored per volume (the primary level).
    A run fine-tuned on volumes is scored on whole volumes by sliding windows, HD95 in mm."""
    from ahm.eval.evaluate import evaluate as run_evaluate

    metrics = run_guarded(lambda: run_evaluate(run_dir, data, split=split, batch_size=batch_size,
                                               empty=empty_cases, overlap=overlap, spatial_dims=spatial_dims,
                                               precision=precision, accelerator=accelerator, out=out_dir))
    if not isinstance(metrics, dict):
        return
    if as_json:
        out.print_json(json.dumps(metrics))
        return
    from rich.table import Table

    def f(v, d=4):
        return "-" if v is None else f"{v:.{d}f}"

    levels = [metrics.get("volume_level"), metrics.get("slice_level")]
    if metrics.get("level") != "volume":
        levels.reverse()
    for n, level in enumerate(x for x in levels if x):
        table = Table(title=f"{split} split, {'primary: ' if n == 0 else ''}each case one {level['case']} "
                            f"({level['n_cases']} cases)")
        hd95 = "HD95 (mm)" if metrics.get("spatial_dims") == 3 else "HD95"
        for col in ("class", "Dice", "dataset Dice", "IoU", hd95, "missed", "false det.", "excluded"):
            table.add_column(col, justify="right" if col != "class" else "left")
        for name, vals in level["per_class"].items():
            table.add_row(name, f(vals["dice"]), f(vals.get("dataset_dice")), f(vals["iou"]), f(vals["hd95"], 2),
                          f"{vals.get('missed', '-')}/{vals.get('present', '-')}",
                          f"{vals.get('false_detections', '-')}/{vals.get('absent', '-')}",
                          str(vals.get("excluded_empty", "-")))
        table.add_row("[bold]mean", f"[bold]{f(level['dice'])}", f"[bold]{f(level.get('dataset_dice'))}",
                      f"[bold]{f(level['iou'])}", f"[bold]{f(level['hd95'], 2)}", "", "", "")
        out.print(table)
    out.print(f"empty cases: {metrics['empty_masks']}; HD95 in {metrics['hd95_unit']}", highlight=False)
    if metrics.get("spatial_dims") == 3:
        window = metrics["sliding_window"]
        out.print(f"scored on the {metrics['grid']}; sliding window {'x'.join(map(str, window['roi_size']))}, "
                  f"overlap {window['overlap']:g}", highlight=False)
    made = metrics.get("inference", {})
    out.print(f"inference on {made.get('device', '?')} in {made.get('precision', '?')}", highlight=False)
    written = f"(metrics.json, {metrics.get('per_case_csv', 'per_image.csv')})"
    if out_dir is not None:
        out.print(f"written to {out_dir} {written}", highlight=False)
    else:
        out.print(f"written to {run_dir / 'eval' / split} {written}; report: {run_dir / 'report.html'}",
                  highlight=False)


@app.command(no_args_is_help=True)
def predict(
    run_dir: Path = typer.Argument(..., help="Fine-tuning run directory."),
    inputs: list[Path] = typer.Argument(..., help="Images (PNG/JPEG/TIFF, DICOM files), volumes (NIfTI, NRRD/MetaImage, multi-frame "
                                "DICOM, DICOM series folders), or folders of them."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the masks (<name>_mask.png / <name>_mask.nii.gz)."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <name>_overlay.png."),
    batch_size: int = typer.Option(32, "--batch-size", help="Slices per inference batch."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    overlap: float = typer.Option(0.5, "--overlap", help="3D runs: share of a sliding window (the training crop) "
                                  "shared with its neighbour, in [0, 1)."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims", help="2 or 3; must be the run's own "
                                            "(default: the run's, from its checkpoint)."),
    accelerator: str | None = typer.Option(None, "--accelerator", help=ACCELERATOR_HELP),
    precision: str | None = typer.Option(None, "--precision", help=PRECISION_HELP),
) -> None:
    """Segment new images with a fine-tuned run; masks keep each input's size (and a volume's affine). A run
    fine-tuned on volumes takes volumes only, segments each whole by sliding windows and writes the mask on the
    input's grid."""
    from ahm.eval.predict import predict as run_predict

    result = run_guarded(lambda: run_predict(run_dir, inputs, out_dir, overlay=overlay, force=force,
                                             batch_size=batch_size, overlap=overlap, spatial_dims=spatial_dims,
                                             precision=precision, accelerator=accelerator))
    if not isinstance(result, dict):
        return
    for line in result["failures"]:
        console.print(f"[bold red]failed:[/] {line}", highlight=False, soft_wrap=True)
    speed = (f"{result['volumes']} volumes, {result['volumes_per_s']:.2f} volumes/s" if result.get("spatial_dims") == 3
             else f"{result['slices']} slices, {result['slices_per_s']:.1f} slices/s")
    speed += f"; {result['device']}, {result['precision']}"
    out.print(f"{result['n_ok']} of {result['n_inputs']} inputs segmented into {result['out_dir']} ({speed})"
              + (f"; {result['n_failed']} failed" if result["n_failed"] else ""), highlight=False)
    if result["n_failed"]:
        raise typer.Exit(1)
