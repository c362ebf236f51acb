"""The `ahm` command line. Thin: parse, build a config, call one library function, print the result."""

from ahm.cli.app import app, main

__all__ = ["app", "main"]
