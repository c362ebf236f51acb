"""Root typer app. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from ahm.errors import AhmError

app = typer.Typer(
    name="ahm",
    help="Self-supervised medical image segmentation: masked image modeling with adaptive hard masking (AHM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _rank_prefix() -> str:
    """'rank R: ' in a torchrun process group of several processes, so that an error names the rank it came from."""
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


console = Console(stderr=True)
# Under torchrun every rank runs this command; results are printed once, by global rank 0.
out = Console(quiet=bool(_rank_prefix()) and os.environ.get("RANK") != "0")

_state = {"debug": False, "quiet": False}

F = TypeVar("F", bound=Callable)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    _state["debug"] = debug or bool(os.environ.get("AHM_DEBUG"))
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def fail(message: str, code: int = 2) -> None:
    """Print one red line and exit non-zero."""
    console.print(f"[bold red]error:[/] {_rank_prefix()}{message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn: Callable[[], object]) -> object:
    """Run library code; turn AhmError into one clear line (traceback only with --debug)."""
    try:
        return fn()
    except AhmError as exc:
        if _state["debug"]:
            console.print_exception()
        fail(str(exc), code=getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    return None


def _register() -> None:
    # Import command modules for their side effect of adding commands to `app`.
    import importlib

    for name in ("data", "pretrain", "finetune", "bench", "visualize", "export", "demo"):
        try:
            importlib.import_module(f"ahm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ahm.cli.{name}":
                raise


def main() -> None:
    _register()
    try:
        app()
    except AhmError as exc:  # raised outside run_guarded, e.g. in option callbacks
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
