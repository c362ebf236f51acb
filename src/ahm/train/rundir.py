"""Run directories: what every pretraining or fine-tuning run writes, and how it refuses to clobber work."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

from ahm.errors import AhmError
from ahm.io import read_jsonl, write_json, write_text
from ahm.runformat import FORMAT, migrate
from ahm.version import __version__

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
LOCK = ".ahm.lock"  # held (flock) by the process that runs in the directory; an empty file otherwise


class RunLock:
    """An exclusive, non-blocking `flock` on `out/.ahm.lock` for as long as a run uses `out`: a second run started
    on the same --out is refused in one line instead of interleaving its writes (or deleting the first's files
    with --force). The kernel releases it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self._fh = None

    def acquire(self) -> RunLock:
        """Take the lock if the directory exists and it is not held yet (a folder still to be made is taken once
        it is made); AhmError when another process holds it."""
        import fcntl

        if self._fh is not None or not self.out.is_dir():
            return self
        if run_entries(self.out) and not (self.out / "run.json").is_file():
            return self  # not a run directory: it is refused, and nothing is written into it
        fh = (self.out / LOCK).open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise AhmError(f"--out {self.out}: another ahm run is using this directory (it holds {LOCK}); wait for "
                           f"it to end, or give another --out") from None
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file drops the flock
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_entries(out: Path) -> list[Path]:
    """What a run directory holds, its lock file aside."""
    return [p for p in out.iterdir() if p.name != LOCK]


def prepare_run_dir(out: str | Path, kind: str, seed: int, resume: bool = False, force: bool = False) -> Path:
    """Create (or reopen with --resume) a run directory.

    An existing non-empty directory is refused unless `resume` (continue it) or `force` (its contents are replaced).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AhmError(f"--out {out}: exists and is not a directory")
    nonempty = out.is_dir() and bool(run_entries(out))
    if resume and unstarted_run(out, kind):
        # Stopped (killed) before its first checkpoint: nothing was trained, so resuming is starting again.
        _clear(out)
        nonempty = False
    elif resume:
        if not (out / CHECKPOINT_DIR / LAST).is_file():
            raise AhmError(f"--resume: {out / CHECKPOINT_DIR / LAST} not found; nothing to resume")
        info = read_run_info(out)
        if info.get("kind") != kind:
            raise AhmError(f"--resume: {out} is a {info.get('kind', 'unknown')} run, not a {kind} run")
        remove_stale_temps(out)
        migrate(out)
        return out
    if nonempty:
        if not force:
            raise AhmError(f"--out {out}: directory is not empty; use --resume to continue it or --force to replace it")
        if not (out / "run.json").is_file():
            raise AhmError(f"--force: {out} does not look like an ahm run directory (no run.json); refusing to delete it")
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    write_json(out / "run.json", {
        "kind": kind,
        "format": FORMAT,
        "version": __version__,
        "seed": seed,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })
    return out


def _clear(out: Path) -> None:
    """Empty a run directory but keep the folder and its lock file: the lock this process holds stays valid."""
    for p in run_entries(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _is_temp(path: Path) -> bool:
    # ahm.io.atomic_write's temp files: ".<name>.<random>.tmp", left behind only by a killed process.
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def unstarted_run(out: str | Path, kind: str) -> bool:
    """True if `out` is a `kind` run directory killed before its first checkpoint (nothing in it worth keeping).

    That is: no checkpoint, and either its run.json names `kind`, or it holds nothing but an empty checkpoint
    folder and temp files (killed while being created), or nothing at all.
    """
    out = Path(out)
    if not out.is_dir() or (out / CHECKPOINT_DIR / LAST).is_file():
        return False
    if (out / "run.json").is_file():
        try:
            return read_run_info(out).get("kind") == kind
        except AhmError:
            return False
    ckpt_dir = out / CHECKPOINT_DIR
    return all(
        _is_temp(p) or (p == ckpt_dir and p.is_dir() and all(_is_temp(q) for q in p.iterdir())) for p in run_entries(out)
    )


def remove_stale_temps(run_dir: str | Path) -> int:
    """Delete temp files a killed run left in `run_dir` and its checkpoint folder; returns how many."""
    removed = 0
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if _is_temp(p):
                    p.unlink(missing_ok=True)
                    removed += 1
    return removed


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise AhmError(f"{run_dir}: not an ahm run directory (no run.json)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AhmError(f"{path}: unreadable run file ({exc})") from exc


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line) plus an optional TensorBoard writer.

    On resume, lines logged after the checkpoint's step are dropped so the file matches an uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", -1) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            write_text(self.path, "".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # Events after the checkpoint's step are stale; the checkpoint's own step is not re-logged.
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except Exception:  # tensorboard is optional at run time
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v) for k, v in record.items()}
        try:
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()
        except OSError as exc:  # disk full, quota: stop with one line; checkpoints are written atomically
            raise AhmError(f"{self.path}: could not write ({exc.strerror or exc}); "
                           f"the last checkpoint is kept, resume with --resume once there is room") from exc
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed write was already reported by log(); do not mask it here
            self._fh.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl ([] before the first one)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
