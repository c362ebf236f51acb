"""`ahm pretrain`: masked-image-modeling pretraining with a chosen masking policy."""

from __future__ import annotations

from pathlib import Path

import typer

from ahm.cli.app import app, is_quiet, out, run_guarded
from ahm.masking.base import policy_names


@app.command(no_args_is_help=True)
def pretrain(
    data: list[Path] = typer.Argument(
        ..., help="Dataset folders (any supported layout; labels not needed) or corpus.json manifests: the corpus. "
                  "Of a labelled source its training split is used (all of it with --all-splits), of an "
                  "unlabelled one every image."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory to create (or to continue with --resume)."),
    policy: str | None = typer.Option(None, help=f"Masking policy: {', '.join(policy_names())} (default random)."),
    backbone: str | None = typer.Option(None, help="vit (MAE, loads into UNETR), unet (masked-input MONAI UNet) or "
                                           "nnunet (the network of an nnU-Net plans file; --plans, --configuration)."),
    plans: Path | None = typer.Option(None, "--plans", help="nnunet backbone: nnU-Net plans file "
                                         "(nnUNet_preprocessed/DatasetNNN_X/nnUNetPlans.json)."),
    configuration: str | None = typer.Option(None, "--configuration", help="nnunet backbone: the plans' "
                                                "configuration (2d, 3d_fullres, ...)."),
    steps: int | None = typer.Option(None, help="Optimisation steps (default 400)."),
    epochs: int | None = typer.Option(None, help="Train for this many epochs instead of --steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step per device (default 32)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 1.5e-3)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Images are resized/padded to this square size."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims", help="2 (default: slices) or 3 (whole volumes, "
                                               "resampled to data.spacing, random data.crop_size crops). 3D "
                                               "defaults, where no option or --config sets them: 64^3 crops at "
                                               "1.5 mm, --batch-size 2 (crops drawn with replacement, so fewer "
                                               "volumes than the batch still train), --lr 5e-4."),
    patch_size: int | None = typer.Option(None, "--patch-size", help="Patch size in pixels (default 16)."),
    mask_ratio: float | None = typer.Option(None, "--mask-ratio", help="Share of patches masked, in (0,1) (default 0.75)."),
    mask_ratio_end: float | None = typer.Option(None, "--mask-ratio-end", help="Rise the mask ratio linearly to this."),
    model: str | None = typer.Option(None, "--model", help="ViT size preset: tiny, small, base."),
    norm_pix: bool | None = typer.Option(None, "--norm-pix/--no-norm-pix", help="Per-patch normalised targets."),
    agent_workers: int | None = typer.Option(None, "--agent-workers", help="AHM: A3C worker processes (0: synchronous A2C on the training device). CPU runs only: refused with a GPU or several processes."),
    hard_fraction: float | None = typer.Option(None, "--hard-fraction", help="HPM/AHM: final share of masked patches chosen as hard (default 0.5)."),
    agent: str | None = typer.Option(None, "--agent", help="AHM agent: transformer (ours) or conv (the authors'; ahm-official always uses it)."),
    reward_scope: str | None = typer.Option(None, "--reward-scope", help="ahm-official: image (default) or batch (the published code's shared batch reward)."),
    reward_window: int | None = typer.Option(None, "--reward-window", help="ahm-official: reward window in px (default: the patch; 20 restores the published misaligned one)."),
    loss_patches: str | None = typer.Option(None, "--loss-patches", help="ahm-official: masked (default) or all (the published loss over visible patches too)."),
    seed: int | None = typer.Option(None, help="Seed for data order, masks, initialisation and the agent."),
    devices: int | None = typer.Option(None, help="Number of devices (DDP when > 1; CPU uses gloo)."),
    accelerator: str | None = typer.Option(None, help="auto, cpu or cuda."),
    precision: str | None = typer.Option(None, help="32-true, bf16-mixed or 16-mixed."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    layout: str | None = typer.Option(None, help="Dataset layout (default: auto-detect)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable files (counted) instead of stopping."),
    all_splits: bool = typer.Option(False, "--all-splits",
                                    help="Pretrain on every image of labelled sources, their val/test splits too."),
    preload: str | None = typer.Option(None, "--preload",
                                          help="auto (default: read the corpus into memory when it takes at most "
                                               "1 GiB preprocessed), yes, or no (stream it from disk)."),
    cache: Path | None = typer.Option(None, "--cache",
                                         help="Folder for an on-disk store of preprocessed samples: later epochs "
                                              "(and later runs on the same corpus) read them instead of decoding."),
    workers: int | None = typer.Option(None, "--workers",
                                          help="DataLoader processes reading samples ahead (default: half the "
                                               "CPU cores, at most 4; 0: in the training process). Workers "
                                               "hand batches over in shared memory (/dev/shm), about 4 x batch x "
                                               "voxels bytes per batch in flight (32 crops of 128^3: 268 MB): give a "
                                               "container more than its default 64 MB (docker --shm-size)."),
    config: Path | None = typer.Option(None, "--config", help="YAML config; command-line options override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory in --out."),
) -> None:
    """Pretrain a backbone by masked image modeling on a corpus of one or more sources, streamed from disk;
    writes encoder.safetensors for `ahm finetune --init`."""
    from ahm.train.pretrain import pretrain as run_pretrain
    from ahm.train.resolve import resolve_pretrain_config

    overrides = {
        "data": {"path": str(data[0]), "image_size": image_size, "layout": layout, "skip_bad": skip_bad or None,
                 "spatial_dims": spatial_dims},
        "all_splits": all_splits or None, "preload": preload, "cache": str(cache) if cache else None,
        "model": {"backbone": backbone, "plans": str(plans) if plans else None, "configuration": configuration,
                  "patch_size": patch_size, "preset": model, "norm_pix": norm_pix},
        "masking": {"policy": policy, "mask_ratio": mask_ratio, "mask_ratio_end": mask_ratio_end,
                    "agent_workers": agent_workers, "hard_fraction_max": hard_fraction, "agent": agent,
                    "reward_scope": reward_scope, "reward_window": reward_window, "loss_patches": loss_patches},
        "train": {"steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                  "devices": devices, "accelerator": accelerator, "precision": precision, "compile": compile,
                  "workers": workers},
    }

    def go():
        from ahm.data.corpus_index import resolve_sources

        if len(data) > 1 or data[0].is_file():
            sources = resolve_sources(data)
            overrides["sources"] = [s.model_dump() for s in sources]
            overrides["data"]["path"] = sources[0].path
        cfg = resolve_pretrain_config(overrides, file=config, resume=resume)
        return run_pretrain(cfg, out_dir, resume=resume, force=force, progress=not is_quiet())

    summary = run_guarded(go)
    if isinstance(summary, dict):
        diag = ", ".join(f"{k} {v:.3g}" for k, v in summary.items()
                         if k in ("hardness_ratio", "critic_spearman", "background_share") and isinstance(v, float))
        out.print(f"pretrained [bold]{summary['policy']}[/]/{summary['backbone']} for {summary['steps']} steps: "
                  f"final loss {summary['final_loss']:.4f}, {summary['images_per_s']:.0f} images/s"
                  + (f"; {diag}" if diag else "") + f"\nrun directory: {out_dir}")
        skipped = summary.get("skipped_files")
        if skipped:
            out.print(f"skipped {skipped['count']} unreadable file(s) (--skip-bad), first: "
                      + "; ".join(skipped["first"][:3]), highlight=False, soft_wrap=True)
        for stage in summary.get("stages", []):
            diag = ", ".join(f"{k} {stage[k]:.3g}" for k in ("hardness_ratio", "critic_spearman", "background_share")
                             if k in stage)
            out.print(f"  stage {stage['name']}: steps {stage['start']}-{stage['end']}"
                      + ("" if stage["trains_model"] else " (model frozen)") + (f"; {diag}" if diag else ""))
