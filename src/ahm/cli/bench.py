"""`ahm bench`: speed and comparison harnesses."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ahm.cli.app import app, console, is_quiet, out, run_guarded

bench_app = typer.Typer(help="Measure speed, and compare masking policies downstream.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("speed")
def speed(
    policies: str | None = typer.Option(None, help="Comma-separated subset, e.g. random,ahm,ahm-async."),
    config: Path | None = typer.Option(None, "--config", help="Pretraining YAML (or its `pretrain:` section, as "
                                          "in a `bench curve` --config) that sets the model and batch; the "
                                          "options below win over it."),
    backbone: str | None = typer.Option(None, "--backbone", help="vit (default): vs MONAI MaskedAutoEncoderViT "
                                           "of the same size; unet: vs a plain step of the same MONAI UNet (pixel "
                                           "MSE, no masking)."),
    model: str | None = typer.Option(None, "--model", help="ViT preset for every candidate (default tiny)."),
    decoder_dim: int | None = typer.Option(None, "--decoder-dim", help="MAE decoder width, ours and MONAI's "
                                              "(default: the config's 128; MONAI's own default is 384)."),
    decoder_depth: int | None = typer.Option(None, "--decoder-depth", help="MAE decoder layers (default 2; MONAI 4)."),
    decoder_heads: int | None = typer.Option(None, "--decoder-heads", help="MAE decoder heads (default 4; MONAI 12)."),
    decoder_mlp_dim: int | None = typer.Option(None, "--decoder-mlp-dim",
                                                  help="MAE decoder MLP width (default 4 x --decoder-dim; MONAI 512)."),
    image_size: int | None = typer.Option(None, "--image-size", help="2D: the square image side (default 128)."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims", help="2 (default): images; 3: volumes, cut "
                                               "to --crop-size."),
    crop_size: int | None = typer.Option(None, "--crop-size", help="3D: the crop side in voxels, per axis "
                                            "(default 64; with patch 16: 64 patches)."),
    patch_size: int | None = typer.Option(None, "--patch-size", help="Default 16."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Default 32."),
    mask_ratio: float | None = typer.Option(None, "--mask-ratio", help="Default 0.75."),
    channels: int = typer.Option(1, help="Input channels of the synthetic batch."),
    steps: int = typer.Option(8, help="Timed steps per round and candidate."),
    rounds: int = typer.Option(3, help="Interleaved rounds."),
    warmup: int = typer.Option(3, help="Untimed warm-up steps per candidate."),
    threads: int | None = typer.Option(None, help="torch threads (default: --config's train.num_threads, "
                                          "else torch's choice)."),
    profile: int = typer.Option(0, "--profile", help="Also profile one step of each candidate (torch.profiler) "
                                "and show this many operators by self CPU time."),
    clock: str = typer.Option("wall", "--clock", help="wall: seconds per step; cpu: this process's CPU seconds "
                              "per step (CPU only; far steadier on a machine shared with other jobs)."),
    precision: str | None = typer.Option(None, "--precision", help="32-true or bf16-mixed, ours and the reference "
                                            "alike (default: --config's train.precision, else 32-true)."),
    compile_model: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile ours and the "
                                                 "reference (default: --config's train.compile, else off)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """Step throughput of each masking policy vs MONAI's own model at exactly the same size, same threads
    (images/s; with --spatial-dims 3 volumes/s on --crop-size crops), and each one's peak memory.

    Rounds are interleaved (each policy, then the reference, again) so a busy machine slows all alike; the
    ratio is the median over rounds, with the lowest and highest round beside it, and the 1-minute load is
    recorded at start and end. With --config, the model, image and batch of that pretraining config (e.g. a
    grid's `experiments/grid-unet.yaml`), so a grid's own setting can be timed; the options given win over it.
    """
    from ahm.bench.speed import check_speed_precision, format_speed, run_speed
    from ahm.config import PretrainConfig, build_config

    def go():
        if precision is not None:
            check_speed_precision(precision)  # named as the option, before the config's own wording
        # None: not given, so the config file's value (or the default) stands
        cfg = build_config(PretrainConfig, file=config, overrides={
            "data": {"image_size": image_size, "spatial_dims": spatial_dims,
                     "crop_size": None if crop_size is None else [crop_size] * 3},
            "model": {"backbone": backbone, "preset": model, "patch_size": patch_size, **{
                k: v for k, v in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth),
                                  ("decoder_heads", decoder_heads), ("decoder_mlp_dim", decoder_mlp_dim))
                if v is not None}},
            "masking": {"mask_ratio": mask_ratio},
            "train": {"batch_size": batch_size, "precision": precision, "compile": compile_model},
        })
        names = [p.strip() for p in policies.split(",") if p.strip()] if policies else None
        note = None if (is_quiet() or as_json) else (lambda msg: console.print(f"[dim]{msg}[/]"))
        return run_speed(cfg, names, channels=channels, steps=steps, warmup=warmup, rounds=rounds,
                         threads=threads or cfg.train.num_threads, progress=note, profile_rows=profile,
                         clock=clock)

    doc = run_guarded(go)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(format_speed(doc), highlight=False, soft_wrap=True)


@bench_app.command("compare", no_args_is_help=True)
def compare(
    data: Path = typer.Argument(..., help="Labelled dataset folder."),
    out_dir: Path = typer.Option(..., "--out", help="Grid directory (rerunning continues it)."),
    policies: str = typer.Option("scratch,random,ahm", help="Comma-separated: scratch and any masking policy."),
    backbones: str = typer.Option("unet", help="Comma-separated: vit, unet."),
    seeds: int = typer.Option(3, help="Seeds per cell (mean +- std reported)."),
    first_seed: int = typer.Option(0, "--first-seed", help="First seed (runs seeds first..first+seeds-1; "
                                   "split a grid across processes with disjoint ranges)."),
    labels_fraction: float = typer.Option(0.1, "--labels-fraction", help="Share of training subjects labelled."),
    pretrain_steps: int = typer.Option(400, "--pretrain-steps"),
    finetune_epochs: int = typer.Option(30, "--finetune-epochs"),
    finetune_steps: int | None = typer.Option(None, "--finetune-steps", help="Budget fine-tuning in steps instead of epochs."),
    split: str = typer.Option("test", help="Split the table reports (choices are made on val, never on it)."),
    config: Path | None = typer.Option(None, "--config", help="YAML with `pretrain:` and `finetune:` sections."),
    empty_cases: str = typer.Option("exclude", "--empty-cases",
                                    help="exclude (default) or one: the old convention, a class absent from "
                                         "prediction and truth scores 1 (named in the output)."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims", help="2: images; 3: volumes (sets "
                                               "data.spatial_dims of both --config sections; default: theirs)."),
) -> None:
    """Run the policy x backbone x seed grid; write results.csv, results.md and results.png.

    results.md: mean +- std per backbone and policy (per-case and dataset-level Dice); each policy minus scratch
    (and minus random) paired by seed, with the seeds it was ahead on and an exact sign-flip p-value; the two
    floors (intensity lookup, predict nothing), and a flag on every policy that does not beat both. Finished cells
    scored under another --empty-cases are re-scored from their checkpoints, not retrained. The grid directory's
    grid.json records the budgets, split and config: rerunning it with others is refused (a new budget is a new
    --out).
    """
    from ahm.bench.compare import run_compare
    from ahm.config import read_yaml

    def go():
        overrides = read_yaml(config) if config else {}
        return run_compare(
            data, out_dir, [p.strip() for p in policies.split(",") if p.strip()],
            [b.strip() for b in backbones.split(",") if b.strip()], seeds, labels_fraction, pretrain_steps,
            finetune_epochs, overrides=overrides, split=split, finetune_steps=finetune_steps, first_seed=first_seed,
            empty=empty_cases, spatial_dims=spatial_dims, log=None if is_quiet() else (lambda msg: console.print(msg, highlight=False)),
        )

    run_guarded(go)
    out.print((out_dir / "results.md").read_text(), highlight=False, soft_wrap=True)
    out.print(f"results: {out_dir / 'results.csv'}, {out_dir / 'results.png'}")


@bench_app.command("curve", no_args_is_help=True)
def curve(
    data: Path = typer.Argument(..., help="Labelled dataset folder (fine-tuning and evaluation)."),
    out_dir: Path = typer.Option(..., "--out", help="Grid directory (rerunning continues it)."),
    labels: str = typer.Option("1,2,5,20,all", "--labels", help="Labelled training subjects per cell, comma-"
                               "separated; 'all' for every training subject."),
    corpus: str | None = typer.Option(None, "--corpus", help="Comma-separated dataset folders to pretrain on "
                                         "(their training subjects; default: DATA's own). E.g. brain-subjects sets "
                                         "of 50, 200, 1000 subjects made with the same --val/--test-subjects. DATA "
                                         "itself may be one of them: its cells are the default's, kept."),
    policies: str = typer.Option("scratch", help="Comma-separated: scratch and any masking policy."),
    backbones: str = typer.Option("unet", help="Comma-separated: vit, unet."),
    seeds: int = typer.Option(3, help="Seeds per point (mean +- std reported, paired by seed)."),
    first_seed: int = typer.Option(0, "--first-seed", help="First seed (split a grid across processes with "
                                   "disjoint ranges; a last call over all seeds gathers)."),
    pretrain_steps: str = typer.Option("1000", "--pretrain-steps", help="Pretraining steps per run; with "
                                       "--pretrain-epochs the least number of steps. Several, increasing "
                                       "(1000,3000,10000,30000), make the budget an axis: one run each, with its "
                                       "own warm-up and complete cosine decay."),
    protocol: str = typer.Option("finetune", "--protocol", help="finetune (every weight trains), frozen (only "
                                 "the new layers train; scratch is the same network with a random frozen encoder), "
                                 "or finetune,frozen (both, from the same pretraining runs)."),
    pretrain_epochs: int | None = typer.Option(None, "--pretrain-epochs", help="Pretrain this many epochs over "
                                                  "each corpus (at least --pretrain-steps steps): a budget that "
                                                  "grows with the corpus."),
    finetune_steps: int = typer.Option(900, "--finetune-steps", help="Fine-tuning steps per cell; with "
                                       "--finetune-epochs the least number of steps."),
    finetune_epochs: int | None = typer.Option(None, "--finetune-epochs", help="Fine-tune this many epochs over "
                                                  "each cell's labelled slices (at least --finetune-steps steps): "
                                                  "a budget that grows with the labelled set."),
    split: str = typer.Option("test", help="Split the table reports (choices are made on val, never on it)."),
    config: Path | None = typer.Option(None, "--config", help="YAML with `pretrain:` and `finetune:` sections."),
    spatial_dims: int | None = typer.Option(None, "--spatial-dims", help="2: images; 3: volumes (sets "
                                               "data.spatial_dims of both --config sections; default: theirs)."),
    gather: bool = typer.Option(False, "--gather", help="Run nothing: the tables of the cells finished so far "
                                "(while other processes run the grid), the missing ones counted."),
    run_steps: str | None = typer.Option(None, "--run-steps", help="Of the --pretrain-steps axis, run only the "
                                            "cells at these budgets (scratch's too), e.g. more seeds at the "
                                            "budget that decides; the tables cover every finished cell."),
) -> None:
    """Dice against labelled subjects and against the unlabelled corpus: a policy x corpus x labels x seed grid.

    Writes results.csv, results.md (mean +- std per point; each policy minus scratch and minus random paired by
    seed with an exact sign-flip p; with several corpora, each policy on a corpus minus the same policy on the
    labelled set's own, paired by seed; with three corpora or more, one trend test per policy and labels: each
    seed's least-squares slope of Dice against log10 corpus subjects, sign-flip p over the seeds) and results.png
    (Dice against each axis, error bars over seeds). The grid folder's grid.json records its budgets, split and
    config: rerunning it with others is refused (a new budget is a new --out). A finished cell is kept; a
    pretraining run is finished when its summary.json and encoder.safetensors are both there (a summary alone, as
    kept records leave it, is pretrained again for the cells still to run, and those cells record the kept run's
    final loss as pretrain_recorded_final_loss).
    """
    from ahm.bench.curve import parse_budgets, parse_labels, parse_protocols, run_curve
    from ahm.config import read_yaml

    def go():
        overrides = read_yaml(config) if config else {}
        return run_curve(
            data, out_dir, [p.strip() for p in policies.split(",") if p.strip()],
            [b.strip() for b in backbones.split(",") if b.strip()], parse_labels(labels), seeds,
            parse_budgets(pretrain_steps),
            finetune_steps, corpora=[c.strip() for c in corpus.split(",") if c.strip()] if corpus else None,
            overrides=overrides, split=split, first_seed=first_seed,
            log=None if is_quiet() else (lambda msg: console.print(msg, highlight=False)),
            finetune_epochs=finetune_epochs, spatial_dims=spatial_dims, gather=gather,
            pretrain_epochs=pretrain_epochs, protocols=parse_protocols(protocol),
            run_steps=parse_budgets(run_steps, option="--run-steps") if run_steps is not None else None,
        )

    run_guarded(go)
    out.print((out_dir / "results.md").read_text(), highlight=False, soft_wrap=True)
    out.print(f"results: {out_dir / 'results.csv'}, {out_dir / 'results.png'}")


@bench_app.command("predict", no_args_is_help=True)
def predict_speed(
    run_dir: Path = typer.Argument(..., help="Fine-tuning run directory (from `ahm finetune`)."),
    inputs: list[Path] | None = typer.Argument(None, help="Images to segment (default: --n synthetic slices)."),
    n: int = typer.Option(100, "--n", help="Synthetic slices of the run's grid size, when no inputs are given."),
    rounds: int = typer.Option(3, help="Timed rounds (the median is reported)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Slices per inference batch."),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """Slices per second of `ahm predict` with a fine-tuned run: end to end and the model alone."""
    from ahm.bench.predict_speed import format_predict_bench, run_predict_bench

    doc = run_guarded(lambda: run_predict_bench(run_dir, n=n, inputs=inputs or None, rounds=rounds,
                                                batch_size=batch_size, threads=threads))
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(format_predict_bench(doc), highlight=False, soft_wrap=True)


@bench_app.command("baseline", no_args_is_help=True)
def baseline(
    data: Path = typer.Argument(..., help="Labelled dataset folder."),
    labels_fraction: float = typer.Option(0.1, "--labels-fraction", help="Share of training subjects labelled."),
    labels_subjects: int | None = typer.Option(None, "--labels-subjects",
                                                  help="Exactly this many labelled training subjects instead of "
                                                       "--labels-fraction (the subjects `ahm finetune "
                                                       "--labels-subjects N --seed S` labels)."),
    seeds: int = typer.Option(3, help="Seeds (each draws the labelled subset `ahm finetune --seed S` uses)."),
    first_seed: int = typer.Option(0, "--first-seed", help="First seed."),
    bins: int | None = typer.Option(None, help="Intensity bins per channel (default 256; 32 for colour)."),
    split: str = typer.Option("test", help="Split reported beside val."),
    image_size: int = typer.Option(128, "--image-size", help="Model grid size (as for fine-tuning)."),
    layout: str = typer.Option("auto", "--layout", help="Dataset layout (default: auto-detect)."),
    spatial_dims: int = typer.Option(2, "--spatial-dims", help="2: images (slices); 3: volumes, scored per "
                                     "volume (data.spatial_dims 3's default resampling)."),
    empty_cases: str = typer.Option("exclude", "--empty-cases",
                                    help="exclude (default) or one: the old convention, a class absent from "
                                         "prediction and truth scores 1 (named in the output)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """Floors: an intensity-only lookup fitted on the labelled subset, and predicting nothing, scored like
    `ahm evaluate`. A segmenter that does not beat both has learned nothing a threshold could not."""
    from ahm.bench.baseline import format_baseline, run_baseline

    note = None if (is_quiet() or as_json) else (lambda msg: console.print(f"[dim]{msg}[/]"))
    doc = run_guarded(lambda: run_baseline(data, labels_fraction, seeds, first_seed=first_seed, bins=bins,
                                           split=split, image_size=image_size, layout=layout, log=note,
                                           empty=empty_cases, labels_subjects=labels_subjects,
                                           spatial_dims=spatial_dims))
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(format_baseline(doc), highlight=False, soft_wrap=True)


@bench_app.command("recon", no_args_is_help=True)
def recon(
    runs: list[Path] = typer.Argument(..., help="Pretraining run directories (from `ahm pretrain` or a grid's "
                                      "pretrain/ folder)."),
    data: Path | None = typer.Option(None, "--data", help="Labelled dataset whose split is scored (default: the "
                                        "dataset the first run recorded)."),
    split: str = typer.Option("val", "--split", help="val (default), test or train."),
    mask_ratio: float | None = typer.Option(None, "--mask-ratio", help="Share of patches masked (default: the "
                                               "first run's mask_ratio)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the masks (the same masks for every run)."),
    n_images: int | None = typer.Option(None, "--n-images", help="Score only the split's first N images."),
    out_file: Path | None = typer.Option(None, "--out", help="Also write the JSON (with per-image errors) here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """Held-out masked reconstruction: every run's error on the same images under the same random masks, in
    pixel space, beside a mean-fill reference, and summarised over seeds. Unlike the training loss it compares
    runs on different corpora and with different policies, and shows whether a run learnt more than its corpus."""
    from ahm.bench.recon import format_recon, recon_scores
    from ahm.errors import AhmError
    from ahm.io import write_json

    note = None if (is_quiet() or as_json) else (lambda msg: console.print(f"[dim]{msg}[/]"))

    def go():
        if out_file is not None and out_file.exists() and not force:
            raise AhmError(f"--out {out_file}: already exists; use --force to replace it")
        if split not in ("train", "val", "test"):
            raise AhmError(f"--split {split}: give train, val or test")
        doc = recon_scores(list(runs), data, split=split, mask_ratio=mask_ratio, seed=seed, n_images=n_images,
                           log=note)
        if out_file is not None:
            write_json(out_file, doc)
        return doc

    doc = run_guarded(go)
    assert isinstance(doc, dict)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(format_recon(doc), highlight=False, soft_wrap=True)


@bench_app.command("data")
def data_bench(
    root: Path = typer.Option(..., "--root", help="Folder for the generated corpora and runs (reused if present)."),
    large: int = typer.Option(200, "--large", help="Volumes of the large corpus."),
    small: int = typer.Option(20, "--small", help="Volumes of the small corpus."),
    slices: int = typer.Option(100, "--slices", help="Slices per volume."),
    size: int = typer.Option(128, "--size", help="Volume side in voxels (also the model grid)."),
    steps: int = typer.Option(50, "--steps", help="Pretraining steps per run."),
    workers: int = typer.Option(2, "--workers", help="DataLoader workers of the streamed runs."),
    config: Path | None = typer.Option(None, "--config", help="Pretraining YAML for every run (model, batch)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """Streamed pretraining at scale: peak memory on a large vs a small generated NIfTI corpus (same settings),
    time to the first step, and the streamed pace against the preloaded one."""
    from ahm.bench.data import format_data_bench, run_data_bench

    note = None if (is_quiet() or as_json) else (lambda msg: console.print(f"[dim]{msg}[/]"))
    doc = run_guarded(lambda: run_data_bench(root, large, small, slices, size, steps, workers, config,
                                             extra=["--image-size", str(size)], log=note))
    if not isinstance(doc, dict):
        return
    (root / "bench_data.json").write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(format_data_bench(doc), highlight=False, soft_wrap=True)
