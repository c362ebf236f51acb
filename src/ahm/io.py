"""Atomic writes and safe loads. A crash mid-write leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ahm.errors import AhmError


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, writer: Callable[[_io.BufferedWriter], None]) -> Path:
    """Write `path` by calling `writer(fileobj)` on a temp file in the same folder, fsync, rename.

    On any failure (disk full included) the temp file is removed and the previous `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            kept = "the previous file is kept" if existed else "nothing was written"
            raise AhmError(f"{path}: could not write ({exc.strerror or exc}); {kept}") from exc
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save, atomically. Only plain containers of tensors/numbers/strings: loadable with weights_only."""
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True: a file that would run code is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise AhmError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AhmError(
            f"{path}: refused to load: not a plain weights checkpoint ({_refusal_reason(str(exc))}); "
            f"ahm never runs code from a file"
        ) from exc
    except Exception as exc:  # a damaged file fails inside the unpickler in many ways (IndexError, TypeError, ...)
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise AhmError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from exc


def _refusal_reason(text: str) -> str:
    """The one informative line of torch's long weights_only message."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"loading it would call {found.group(1)}"
    found = re.search(r"(Unsupported [^\n]*)", text)
    return found.group(1)[:100] if found else "not a weights-only pickle"


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return write_bytes(path, data)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AhmError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AhmError(f"{path}: not a readable safetensors file ({str(exc)[:120]})") from exc


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines file ([] if there is none); unreadable lines are skipped (a run may have been
    cut mid-line)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def restore_state(module: torch.nn.Module, state: dict, what: str, path: Any) -> None:
    """load_state_dict, or one line naming the checkpoint file when its tensors do not fit the module."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise AhmError(f"{path}: the {what} in this checkpoint does not match the configured one ({first})") from exc
