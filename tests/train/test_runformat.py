"""Run directories written before run.json carried a format (format 1) are upgraded by `migrate` and then read by
evaluate, predict, resume and `finetune --init` as they were; read-only ones are read through an upgraded mirror
(`read_from`) and left as they are. The format-1 directories are made here by the current code and then stripped
of what format 2 added, which is what the older code wrote."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from train_helpers import make_blob_folder, tiny_pretrain_overrides

from ahm.config import FinetuneConfig, PretrainConfig, build_config, load_config
from ahm.errors import AhmError
from ahm.io import (
    load_safetensors,
    load_torch,
    safetensors_metadata,
    save_safetensors,
    save_torch,
    write_json,
)
from ahm.runformat import FORMAT, migrate, originals_dir, read_from, run_format

UNET = {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0,
        "norm": "instance"}  # format-1 runs without model.norm were instance-normalised


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("rf") / "blobs", n=16)


def _as_format_1(run: Path) -> dict[str, bytes]:
    """Strip what format 2 added; returns the files' new contents by name."""
    info = json.loads((run / "run.json").read_text())
    assert info.pop("format") == FORMAT
    write_json(run / "run.json", info)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["model"]["norm"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    encoder = run / "encoder.safetensors"
    if encoder.is_file():
        meta = {k: v for k, v in safetensors_metadata(encoder).items()
                if k not in ("spatial_dims", "norm", "unet_network", "policy")}
        save_safetensors(encoder, load_safetensors(encoder), metadata=meta)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = load_torch(last)
    if ckpt["kind"] == "pretrain":
        del ckpt["skipped_batches"], ckpt["policy_extra"]
    else:
        del ckpt["meta"]["select_by"]
    save_torch(last, ckpt)
    best = run / "checkpoints" / "best.ckpt"
    if best.is_file():
        ckpt = load_torch(best)
        del ckpt["meta"]["slice_axis"]
        save_torch(best, ckpt)
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _pretrain_cfg(blobs: Path, steps: int) -> PretrainConfig:
    over = tiny_pretrain_overrides(blobs, backbone="unet", steps=steps)
    over["model"]["norm"] = "instance"
    return build_config(PretrainConfig, overrides=over)


def _finetune_cfg(blobs: Path, epochs: int, init: str = "none") -> FinetuneConfig:
    return build_config(FinetuneConfig, overrides={
        "data": {"path": str(blobs), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": UNET, "segmenter": "unet", "init": init,
        "train": {"epochs": epochs, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "seed": 1,
                  "accelerator": "cpu"}})


def _assert_upgraded(run: Path, originals: dict[str, bytes]) -> None:
    assert run_format(run) == FORMAT
    kept = originals_dir(run, 1)
    for name, content in originals.items():
        if (kept / name).is_file():
            assert (kept / name).read_bytes() == content, name  # the originals, as they were
    assert (kept / "config.yaml").is_file() and not (kept / "run.json").exists()


def test_a_new_run_directory_records_the_format(blobs: Path, tmp_path: Path) -> None:
    from ahm.train.pretrain import pretrain

    pretrain(_pretrain_cfg(blobs, steps=2), tmp_path / "pre", progress=False)
    assert json.loads((tmp_path / "pre" / "run.json").read_text())["format"] == FORMAT
    assert migrate(tmp_path / "pre") == FORMAT and not originals_dir(tmp_path / "pre", 1).exists()


def test_format_1_pretraining_resumes_and_initialises_a_finetuning(blobs: Path, tmp_path: Path) -> None:
    from ahm.train.finetune import finetune
    from ahm.train.pretrain import pretrain

    run = tmp_path / "pre"
    pretrain(_pretrain_cfg(blobs, steps=2), run, progress=False)
    old = _as_format_1(run)
    shutil.copytree(run, tmp_path / "pre-copy")

    summary = finetune(_finetune_cfg(blobs, epochs=1, init=str(tmp_path / "pre-copy")), tmp_path / "ft",
                       progress=False)
    assert summary["init_policy"] == "random" and summary["encoder_loaded"]["loaded"] > 0
    meta = safetensors_metadata(tmp_path / "pre-copy" / "encoder.safetensors")
    assert (meta["spatial_dims"], meta["norm"], meta["unet_network"], meta["policy"]) == ("2", "instance", "unet",
                                                                                         "random")
    _assert_upgraded(tmp_path / "pre-copy", old)

    summary = pretrain(_pretrain_cfg(blobs, steps=4), run, resume=True, progress=False)
    assert summary["steps"] == 4 and load_config(PretrainConfig, run / "config.yaml").model.norm == "instance"
    _assert_upgraded(run, old)


def test_format_1_finetuning_evaluates_predicts_and_resumes(blobs: Path, tmp_path: Path) -> None:
    from ahm.eval.evaluate import evaluate
    from ahm.eval.predict import predict
    from ahm.train.finetune import finetune

    run = tmp_path / "ft"
    finetune(_finetune_cfg(blobs, epochs=1), run, progress=False)
    before = evaluate(run, blobs, split="val", report=False)
    old = _as_format_1(run)

    after = evaluate(run, blobs, split="val", report=False)
    assert json.dumps(after, sort_keys=True, default=str) == json.dumps(before, sort_keys=True, default=str)
    _assert_upgraded(run, old)
    assert load_torch(run / "checkpoints" / "best.ckpt")["meta"]["slice_axis"] == 2
    ckpt = load_torch(run / "checkpoints" / "last.ckpt")
    # the best of a run from before select_by was kept by another figure: chosen afresh after the resume
    assert ckpt["meta"]["select_by"] == "dataset_dice" and ckpt["state"]["best_val_dice"] == -1.0

    image = tmp_path / "one.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(image)
    assert not predict(run, [image], tmp_path / "pred")["failures"]

    summary = finetune(_finetune_cfg(blobs, epochs=2), run, resume=True, progress=False)
    assert summary["epochs"] == 2 and summary["best_val_dice"] >= 0.0


def test_a_newer_or_unreadable_format_is_refused_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "run.json", {"kind": "pretrain", "format": FORMAT + 1})
    with pytest.raises(AhmError, match=rf"run: run directory of format {FORMAT + 1}; this ahm reads format "
                                       rf"{FORMAT} and older"):
        migrate(run)
    write_json(run / "run.json", {"kind": "pretrain", "format": "two"})
    with pytest.raises(AhmError, match="run.json: format 'two' is not a run-directory format"):
        migrate(run)
    assert migrate(tmp_path) is None  # not a run directory: its readers say so


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its mode and mtime."""
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod((0o755 if p.is_dir() else 0o644) if writable else (0o555 if p.is_dir() else 0o444))


def test_a_read_only_format_1_run_is_read_through_a_mirror_and_left_as_it_is(blobs: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    from typer.testing import CliRunner

    import ahm
    from ahm.cli.app import _register, app
    from ahm.eval.evaluate import evaluate
    from ahm.eval.predict import predict
    from ahm.train.finetune import finetune
    from ahm.train.pretrain import pretrain

    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain(_pretrain_cfg(blobs, steps=2), pre, progress=False)
    finetune(_finetune_cfg(blobs, epochs=1), ft, progress=False)
    before = evaluate(ft, blobs, split="val", report=False)
    image = tmp_path / "one.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(image)
    assert not predict(ft, [image], tmp_path / "pred-before")["failures"]
    for run in (pre, ft):
        _as_format_1(run)
    # root writes into folders whatever their mode, so as root the runs are only declared unwritable
    chmod = os.geteuid() != 0
    if chmod:
        for run in (pre, ft):
            _chmod_tree(run, writable=False)
    else:
        monkeypatch.setattr("ahm.runformat._writable", lambda path: False)
    untouched = {run: _snapshot(run) for run in (pre, ft)}
    try:
        assert read_from(ft) != ft and run_format(read_from(ft)) == FORMAT and run_format(ft) == 1
        after = evaluate(ft, blobs, split="val", out=tmp_path / "scores")
        assert json.dumps(after, sort_keys=True, default=str) == json.dumps(before, sort_keys=True, default=str)
        assert (tmp_path / "scores" / "metrics.json").is_file()
        _register()
        res = CliRunner().invoke(app, ["evaluate", str(ft), "--data", str(blobs), "--split", "val", "--out",
                                       str(tmp_path / "cli-scores")], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert f"written to {tmp_path / 'cli-scores'} (metrics.json, per_image.csv)" in res.output.replace("\n", "")
        assert "report:" not in res.output
        assert not predict(ft, [image], tmp_path / "pred")["failures"]
        assert (tmp_path / "pred" / "one_mask.png").read_bytes() == (tmp_path / "pred-before" /
                                                                     "one_mask.png").read_bytes()

        summary = finetune(_finetune_cfg(blobs, epochs=1, init=str(pre)), tmp_path / "ft-init", progress=False)
        assert summary["init"] == str(pre) and summary["encoder_loaded"]["loaded"] > 0
        assert ahm.load_encoder(pre) is not None and not ahm.load_segmenter(ft).training
        if chmod:  # resuming writes into the run: refused in one line
            with pytest.raises(AhmError, match=r"ft: a run directory of format 1 is upgraded in place before it "
                                               r"is written to, and it cannot be written \(Permission denied\); "
                                               r"copy it somewhere writable"):
                finetune(_finetune_cfg(blobs, epochs=2), ft, resume=True, progress=False)
        assert {run: _snapshot(run) for run in (pre, ft)} == untouched
    finally:
        for run in (pre, ft):
            _chmod_tree(run, writable=True)


def test_the_mirror_of_an_unwritable_run_leaves_linked_folders_alone_and_follows_changes(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    monkeypatch.setattr("ahm.runformat._writable", lambda path: False)
    run, elsewhere = tmp_path / "run", tmp_path / "scratch-disk"
    (elsewhere / "checkpoints").mkdir(parents=True)
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere / "checkpoints")  # a writable folder linked into the run
    write_json(run / "run.json", {"kind": "finetune", "seed": 0})
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"norm": "instance"}, "data": {"slice_axis": 1}}))
    save_torch(run / "checkpoints" / "best.ckpt", {"model": {}, "meta": {"segmenter": "unet"}})
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*run.rglob("*.*"), *elsewhere.rglob("*.*")]}

    mirror = read_from(run)
    assert mirror != run and run_format(mirror) == FORMAT and run_format(run) == 1
    assert load_torch(mirror / "checkpoints" / "best.ckpt")["meta"] == {"segmenter": "unet", "slice_axis": 1}
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["best.ckpt", "checkpoints"]
    assert read_from(run) == mirror  # reused while the run is unchanged

    save_torch(run / "checkpoints" / "best.ckpt", {"model": {}, "meta": {"segmenter": "unetr"}})
    renewed = read_from(run)
    assert renewed != mirror and not mirror.exists()
    assert load_torch(renewed / "checkpoints" / "best.ckpt")["meta"]["segmenter"] == "unetr"

    (run / "checkpoints" / "best.ckpt").write_bytes(b"damaged")
    assert read_from(run) == run  # the upgrade cannot finish: read as it is, for the reader to refuse
