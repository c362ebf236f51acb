"""Every `ahm` command in the README parses (its options exist, its values are valid), and the quickstarts run.

The commands are read from the README's fenced `bash` blocks, so an option renamed in the code but not in the
guide fails here. The quickstart blocks (the ones that start with `ahm data prepare`) are run for real in a
temporary folder, with their step counts cut to two: the path a new user follows, end to end.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

try:  # typer carries its own copy of click from 0.2x on; its errors are of that copy's classes
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer, on the click package
    from click import UsageError
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comments dropped."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        commands = []
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip() if " # " in line else line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
        blocks.append(commands)
    return blocks


def ahm_args(command: str) -> list[str] | None:
    """The arguments after `ahm` (or `-m ahm` under torchrun); None for other programs."""
    words = shlex.split(command)
    if words[:1] == ["ahm"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "-m" in words and words[words.index("-m") + 1] == "ahm":
        return words[words.index("-m") + 2:]
    return None


def _command():
    from ahm.cli.app import _register, app

    _register()
    return typer.main.get_command(app)


def parse_only(args: list[str]) -> None:
    """Resolve the subcommand and parse its options without running it (click raises on a bad option)."""
    command = _command()
    try:
        ctx = command.make_context("ahm", list(args), resilient_parsing=False)
        while hasattr(command, "resolve_command"):  # a group: its subcommand comes next
            # click keeps a group's subcommand words apart from its own options (`_protected_args` since 8.2)
            pending = list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])) + ctx.args
            name, sub, rest = command.resolve_command(ctx, pending)
            command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    except typer.Exit:  # --help: printed, nothing to check further
        pass


def readme_commands() -> list[list[str]]:
    return [args for block in bash_blocks(README.read_text()) for c in block if (args := ahm_args(c)) is not None]


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(args: list[str]) -> None:
    parse_only(args)


def test_a_renamed_option_would_fail() -> None:
    with pytest.raises(UsageError):
        parse_only(["pretrain", "data", "--out", "x", "--no-such-option", "1"])


def quickstarts() -> list[list[str]]:
    return [block for block in bash_blocks(README.read_text()) if block and block[0].startswith("ahm data prepare")]


@pytest.mark.slow
@pytest.mark.parametrize("block", quickstarts(), ids=lambda b: b[0][:40])
def test_the_quickstart_runs(block: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ahm.cli.app import _register, app

    _register()
    monkeypatch.chdir(tmp_path)
    for command in block:
        args = ahm_args(command)
        assert args is not None, command
        for option, small in (("--steps", "2"), ("--subjects", "8")):
            if option in args:
                args[args.index(option) + 1] = small
        res = CliRunner().invoke(app, ["-q", *args])
        assert res.exit_code == 0, f"{command}\n{res.output[-1500:]}"
