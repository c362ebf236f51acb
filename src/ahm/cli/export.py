"""`ahm export RUN --to nnunet --out FILE`: a pretraining run as another framework's checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from ahm.cli.app import app, out, run_guarded


@app.command("export", no_args_is_help=True)
def export(
    run: Path = typer.Argument(..., help="Pretraining run directory (written by `ahm pretrain`)."),
    to: str = typer.Option(..., "--to", help="Target: nnunet (a checkpoint for nnUNetv2_train -pretrained_weights)."),
    out_file: Path = typer.Option(..., "--out", help="Checkpoint file to write (a .txt beside it names the plans)."),
    plans: Path | None = typer.Option(None, "--plans", help="nnU-Net plans the checkpoint must fit (default: "
                                         "the run's); a difference is refused."),
    configuration: str | None = typer.Option(None, "--configuration", help="The plans' configuration (default: "
                                                "the run's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Write a pretrained network where another framework's fine-tuning loads it."""
    from ahm.export import export_run

    result = run_guarded(lambda: export_run(run, to, out_file, plans, configuration, force))
    if isinstance(result, dict):
        out.print(f"wrote {result['out']}: {result['tensors']} tensors for configuration "
                  f"{result['configuration']!r} of {result['plans']}", highlight=False, soft_wrap=True)
