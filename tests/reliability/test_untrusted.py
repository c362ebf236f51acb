"""Untrusted files: checkpoints and weights load without running code; damaged ones end in AhmError naming the file."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rel_helpers import last_ckpt, record_trials, tiny_cfg
from train_helpers import make_blob_folder
from typer.testing import CliRunner

from ahm.config import FinetuneConfig, build_config, save_config
from ahm.errors import AhmError
from ahm.io import load_safetensors, load_torch, save_safetensors, save_torch
from ahm.train.pretrain import pretrain


class _RunsCode:
    """Unpickling this calls os.system: what a planted checkpoint would do to a careless loader."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _marker() -> Path:
    # Outside every test folder, so that nothing the test itself does can create it by accident.
    return Path("/tmp") / f"pwned-{uuid.uuid4().hex}"


def _plant(path: Path, marker: Path, fmt: str) -> bytes:
    """Write a checkpoint-looking file at `path` whose loading with plain pickle runs `touch marker`."""
    payload = {"kind": "pretrain", "step": 1, "model": _RunsCode(f"touch {marker}")}
    if fmt == "torch":
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
    else:
        data = pickle.dumps(payload, protocol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_load_torch_refuses_a_pickle_that_runs_code(tmp_path: Path, fmt: str) -> None:
    marker = _marker()
    path = tmp_path / "evil.ckpt"
    data = _plant(path, marker, fmt)
    try:
        # the payload is live: a loader that trusts pickles runs it
        if fmt == "torch":
            torch.load(path, weights_only=False)
        else:
            pickle.loads(data)
        assert marker.exists()
        marker.unlink()

        with pytest.raises(AhmError, match="refused to load") as err:
            load_torch(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_resume_refuses_a_planted_checkpoint(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    data = make_blob_folder(tmp_path / "data", n=8)
    run = tmp_path / "run"
    pretrain(tiny_cfg(data, steps=2), run, progress=False)
    marker = _marker()
    planted = _plant(last_ckpt(run), marker, "torch")
    try:
        _register()
        result = CliRunner().invoke(app, ["-q", "pretrain", str(data), "--out", str(run), "--resume", "--steps", "4"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "refused to load" in lines[0] and "last.ckpt" in lines[0], result.output
        assert "Traceback" not in result.output
        assert not marker.exists()
        assert last_ckpt(run).read_bytes() == planted  # refused, not replaced
    finally:
        marker.unlink(missing_ok=True)


def test_evaluate_refuses_a_planted_best_checkpoint(tmp_path: Path) -> None:
    from ahm.eval.evaluate import load_run

    run = tmp_path / "ft"
    save_config(build_config(FinetuneConfig, overrides={"data": {"path": str(tmp_path)}}), run / "config.yaml")
    marker = _marker()
    _plant(run / "checkpoints" / "best.ckpt", marker, "pickle")
    try:
        with pytest.raises(AhmError, match="best.ckpt: refused to load"):
            load_run(run)
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def _good_safetensors(path: Path) -> bytes:
    save_safetensors(path, {"w": torch.arange(12.0).view(3, 4), "b": torch.ones(3)}, metadata={"backbone": "unet"})
    return path.read_bytes()


def _edit_header(data: bytes, edit) -> bytes:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping the tensor bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@pytest.mark.parametrize("damage", ["random", "empty", "huge_header", "truncated", "offsets_past_end", "pickle"])
def test_damaged_safetensors_is_an_ahm_error(tmp_path: Path, damage: str) -> None:
    import random

    path = tmp_path / "encoder.safetensors"
    good = _good_safetensors(path)
    bad = {
        "random": bytes(random.Random(0).getrandbits(8) for _ in range(256)),
        "empty": b"",
        "huge_header": struct.pack("<Q", 2**62) + b"{}",
        "truncated": good[: len(good) - 7],
        "offsets_past_end": _edit_header(good, lambda h: h["w"]["data_offsets"].__setitem__(1, 4800)),
        "pickle": pickle.dumps({"w": torch.ones(2)}),
    }[damage]
    path.write_bytes(bad)
    with pytest.raises(AhmError, match="encoder.safetensors"):
        load_safetensors(path)


def test_finetune_init_with_garbage_encoder_is_an_ahm_error(tmp_path: Path) -> None:
    from ahm.config import PretrainConfig
    from ahm.train.finetune import load_init

    run = tmp_path / "pre"
    save_config(build_config(PretrainConfig, overrides={"model": {"backbone": "unet"}}), run / "config.yaml")
    (run / "encoder.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + os.urandom(64))
    with pytest.raises(AhmError, match="encoder.safetensors"):
        load_init(run)


_FUZZ = {"cases": 0, "foreign": 0}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("good")
    save_torch(root / "c.ckpt", {"kind": "pretrain", "step": 3, "model": {"w": torch.randn(4, 4)},
                                 "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]},
                                 "config": {"a": [1, 2.5, "x", None, True]}})
    return {"ckpt": (root / "c.ckpt").read_bytes(), "safetensors": _good_safetensors(root / "e.safetensors")}


@given(kind=st.sampled_from(["ckpt", "safetensors"]), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=6))
def test_fuzz_damaged_checkpoints(tmp_path_factory, good_files: dict[str, bytes], kind: str, cut: float,
                                  flips: list[tuple[float, int]]) -> None:
    """Truncated and byte-flipped checkpoints and weights: an AhmError naming the file, or a clean load."""
    data = bytearray(good_files[kind])
    for where, xor in flips:
        data[int(where * (len(data) - 1))] ^= xor
    data = data[: max(0, int(cut * len(data)) if cut < 0.95 else len(data))]
    path = tmp_path_factory.mktemp("fuzz") / f"x.{kind}"
    path.write_bytes(bytes(data))
    loader = load_torch if kind == "ckpt" else load_safetensors
    _FUZZ["cases"] += 1
    try:
        loaded = loader(path)
    except AhmError as exc:
        assert str(path) in str(exc)
    except Exception:
        _FUZZ["foreign"] += 1
        raise
    else:
        assert isinstance(loaded, dict)
    record_trials("checkpoint_fuzz", dict(_FUZZ))
