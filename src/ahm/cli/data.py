"""`ahm data`: build the brain demo set or simulated brain subjects, check a dataset before training on it,
index a corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ahm.cli.app import app, console, is_quiet, out, run_guarded

data_app = typer.Typer(help="Prepare and check datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Build a ready-to-use dataset.", no_args_is_help=True)
data_app.add_typer(prepare_app, name="prepare")
app.add_typer(data_app, name="data")


class _LazyBar:
    """A rich progress bar for `progress(done, total)` callbacks, shown only once work starts (so an early
    error prints cleanly), and never with --quiet."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if is_quiet():
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(self.description),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task(self.description, total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done, total=total)

    def __enter__(self) -> _LazyBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@prepare_app.command("brain-demo")
def brain_demo(
    out_dir: Path = typer.Option(
        ..., "--out", help="Folder to create (must be new, empty, or an earlier brain demo)."
    ),
    image_size: int = typer.Option(128, "--image-size", help="Square size of the written slices in pixels."),
    shift: bool = typer.Option(
        False,
        "--shift",
        help="Give every slice its own simulated acquisition (random gamma, smooth bias field, gain, noise): "
        "intensity alone no longer tells grey from white matter, so a network must use context. "
        "Masks and splits are unchanged.",
    ),
    lesions: bool = typer.Option(
        False,
        "--lesions",
        help="A small-structure task instead: simulated T1-hypointense lesions (3-7 mm spheres in white matter) "
        "in about a third of the slices; the only label is 1 = lesion. Most slices hold none.",
    ),
) -> None:
    """Build a labelled brain MRI set (background / grey / white matter) from nilearn's MNI152 template.

    The plain set is nearly solved by intensity alone (see `ahm bench baseline`); `--shift` makes the harder
    variant on which pretraining has room to help; `--lesions` labels simulated small lesions instead of tissue.
    """
    from ahm.datasets.brain_demo import prepare_brain_demo

    def go() -> dict:
        with _LazyBar("writing slices") as bar:
            return prepare_brain_demo(out_dir, image_size=image_size, progress=bar, shift=shift, lesions=lesions)

    summary = run_guarded(go)
    assert isinstance(summary, dict)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    out.print(
        f"wrote {summary['images']} slices of {image_size}x{image_size} px"
        f"{' with a simulated acquisition shift per slice' if shift else ''} to {summary['out']}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"  images/ and masks/ ({', '.join(f'{k} {v}' for k, v in summary['labels'].items())}); "
        f"labels.json; splits.json: {splits}",
        highlight=False,
        soft_wrap=True,
    )


@prepare_app.command("brain-subjects")
def brain_subjects(
    out_dir: Path = typer.Option(
        ..., "--out", help="Folder to create (must be new, empty, or an earlier brain-subjects set)."
    ),
    subjects: int = typer.Option(60, "--subjects", help="Number of simulated subjects (any number; each is "
                                 "generated on its own, so thousands take time, not memory)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulation: the same seed gives the same bytes."),
    image_size: int = typer.Option(128, "--image-size", help="Square size of the written slices in pixels."),
    slices_per_axis: int = typer.Option(8, "--slices-per-axis", help="Slices per subject along each axis."),
    val_subjects: int | None = typer.Option(None, "--val-subjects", help="Validation subjects (default 15%)."),
    test_subjects: int | None = typer.Option(None, "--test-subjects", help="Test subjects (default 15%)."),
    settings_file: Path | None = typer.Option(
        None, "--settings", help="YAML or JSON mapping of simulation settings to change (see docs/results.md)."
    ),
    volumes: bool = typer.Option(
        False,
        "--volumes",
        help="Write each subject as a whole 3D NIfTI volume (image and label) in the Decathlon layout "
        "(dataset.json, imagesTr/, labelsTr/) for data.spatial_dims 3, instead of slices: the same subjects, "
        "ids and splits as the slice set of the same --seed, --image-size and --slices-per-axis.",
    ),
    volume_size: int = typer.Option(
        128, "--volume-size", help="With --volumes: voxels per side of the cubic grid (128 at 1.5 mm: 192 mm)."
    ),
    spacing: float = typer.Option(1.5, "--spacing", help="With --volumes: isotropic voxel size in mm."),
) -> None:
    """Build a labelled set of SIMULATED brain MRI subjects (background / grey / white matter).

    The subjects are simulated, not scanned: each is nilearn's MNI152 template under its own random affine and
    smooth nonlinear deformation (labels warped with the image), with its own contrast (a random monotone
    remapping of T1, or a per-tissue Gaussian-mixture contrast), bias field, blur and noise. Splits are by
    subject: the first test subjects, then val, then train. A montage.png of the first subjects is written
    beside the data. With --volumes each subject is one simulated 3D volume (NIfTI) instead of slices.
    """
    from ahm.datasets.brain_subjects import SimulationSettings, prepare_brain_subject_set

    def go() -> tuple[dict, str]:
        settings = None
        if settings_file is not None:
            from ahm.config import read_yaml

            settings = SimulationSettings.from_dict(read_yaml(settings_file))
        with _LazyBar("simulating subjects") as bar:
            return prepare_brain_subject_set(
                out_dir, volumes, subjects=subjects, seed=seed, image_size=image_size,
                slices_per_axis=slices_per_axis, volume_size=volume_size, spacing_mm=spacing,
                val_subjects=val_subjects, test_subjects=test_subjects, settings=settings, progress=bar)

    done = run_guarded(go)
    assert isinstance(done, tuple)
    out.print(done[1], highlight=False, soft_wrap=True)  # the summary in words


@data_app.command("check", no_args_is_help=True)
def check(
    path: Path = typer.Argument(..., help="Dataset folder."),
    layout: str = typer.Option("auto", "--layout", help="auto, folder, msd, lgg, busi, isic or kvasir."),
    slice_axis: int = typer.Option(
        2, "--slice-axis", help="Axis along which volumes are sliced (0, 1 or 2)."
    ),
    spatial_dims: int = typer.Option(
        2,
        "--spatial-dims",
        help="2: volumes as slices (as 2D training reads them); 3: whole volumes (as data.spatial_dims 3 reads "
        "them: 2D files and volumes without voxel spacing are problems).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        help="Treat bad files as skipped (warning, exit 0) as training with --skip-bad would.",
    ),
) -> None:
    """Read every image and mask; print layout, sizes, channels, labels, class balance and every problem.

    Exits 1 when there are problems (0 with --skip-bad if usable images remain).
    """
    from ahm.config import DataConfig, build_config
    from ahm.data.check import CheckReport, check_dataset, format_report

    def go():
        cfg = build_config(
            DataConfig,
            overrides={"path": str(path), "layout": layout, "slice_axis": slice_axis, "spatial_dims": spatial_dims},
            source="options",
        )
        with _LazyBar("reading") as bar:
            return check_dataset(path, cfg, progress=bar)

    report = run_guarded(go)
    assert isinstance(report, CheckReport)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        out.print(format_report(report), highlight=False, markup=False, soft_wrap=True)
    if report.problems:
        if skip_bad and report.readable > 0:
            console.print(
                f"[yellow]warning:[/] {len(report.problems)} bad file(s) would be skipped "
                f"({report.readable} of {report.items} images usable)",
                highlight=False,
                soft_wrap=True,
            )
            return
        raise typer.Exit(1)


@data_app.command("index", no_args_is_help=True)
def index(
    sources: list[Path] = typer.Argument(..., help="Dataset folders (any supported layout, labelled or not)."),
    out_file: Path = typer.Option(..., "--out", help="Manifest to write, e.g. corpus.json."),
    layout: str = typer.Option("auto", "--layout", help="auto, folder, msd, lgg, busi, isic or kvasir (all sources)."),
    slice_axis: int = typer.Option(2, "--slice-axis", help="Axis along which volumes are sliced (0, 1 or 2)."),
    spatial_dims: int = typer.Option(
        2, "--spatial-dims", help="2: count 2D images and volume slices; 3: count whole volumes, as 3D pretraining "
        "(data.spatial_dims 3) draws them."
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Exit 0 when some files are bad (they are listed in the manifest and skipped)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """Index a corpus from file headers only: files, volumes, slices, modalities and problems of each source,
    written as a manifest listing the sources (paths relative to the manifest's folder when inside it).

    Exits 1 when a file is bad (0 with --skip-bad); the manifest is written either way.
    """
    from ahm.config import DataConfig, build_config
    from ahm.data.corpus_index import format_corpus, index_corpus
    from ahm.errors import AhmError
    from ahm.io import write_json

    def go():
        if out_file.exists() and not force:
            raise AhmError(f"--out {out_file}: already exists; use --force to replace it")
        cfg = build_config(DataConfig, overrides={"layout": layout, "slice_axis": slice_axis,
                                                  "spatial_dims": spatial_dims}, source="options")
        with _LazyBar("indexing sources") as bar:
            manifest = index_corpus(list(sources), cfg, out_file, progress=bar)
        write_json(out_file, manifest)
        return manifest

    manifest = run_guarded(go)
    assert isinstance(manifest, dict)
    out.print(format_corpus(manifest, out_file), highlight=False, markup=False, soft_wrap=True)
    if manifest["totals"]["problems"] and not skip_bad:
        raise typer.Exit(1)
