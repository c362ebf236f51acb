"""`ahm visualize RUN`: what the masking agent learned, as pictures."""

from __future__ import annotations

from pathlib import Path

import typer

from ahm.cli.app import app, out, run_guarded


@app.command("visualize", no_args_is_help=True)
def visualize(
    run: Path = typer.Argument(..., help="Pretraining run directory (written by `ahm pretrain`)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default: the one the run used)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the PNG files."),
    n_images: int = typer.Option(8, "--n-images", help="How many held-out images to draw."),
) -> None:
    """Per image: the actor's probabilities, the critic's predicted loss, the mask, the reconstruction; plus
    diagnostics.png (hardness ratio, critic Spearman, entropy, background share ... over training)."""
    from ahm.eval.visualize import visualize_run

    written = run_guarded(lambda: visualize_run(run, data, out_dir, n_images))
    if written:
        out.print(f"wrote {len(written)} PNG files to {out_dir}", highlight=False)
