"""`ahm demo`: the whole pipeline on the built-in brain set."""

from __future__ import annotations

from pathlib import Path

import typer

from ahm.cli.app import app, console, is_quiet, out, run_guarded


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("ahm-demo"), "--out", help="Everything goes under this folder."),
    quick: bool = typer.Option(False, "--quick", help="The few-minutes CPU setting (what `make demo` runs)."),
    force: bool = typer.Option(False, "--force", help="Redo the runs in an existing --out."),
) -> None:
    """Prepare the brain set, pretrain with AHM, fine-tune on 10% labels, evaluate on test, write the report."""
    from ahm.demo import run_demo

    result = run_guarded(lambda: run_demo(out_dir, quick=quick, force=force, progress=not is_quiet(),
                                          say=lambda m: console.print(f"[bold cyan]{m}[/]")))
    t = result["timings"]
    per_class = result.get("per_class") or {}
    classes = ", ".join(f"{k} {v['dice']:.3f}" for k, v in per_class.items() if isinstance(v, dict) and "dice" in v)
    out.print(
        f"test Dice [bold]{result['dice']:.4f}[/] (IoU {result['iou']:.4f}, HD95 {result['hd95']:.2f} px)"
        + (f"; per class: {classes}" if classes else "")
        + f"\nreport: {result['report']}\ntime {t['total_s'] / 60:.1f} min, peak memory {result['peak_rss_mib']:.0f} MiB"
    )
