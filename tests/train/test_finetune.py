"""Fine-tuning: run directory, pretrained encoders, exact resume, evaluation after it, refusals of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from train_helpers import ctrl_c_after, make_blob_folder
from typer.testing import CliRunner

from ahm.config import FinetuneConfig, ModelConfig, PretrainConfig, build_config, save_config
from ahm.errors import AhmError
from ahm.io import load_torch, save_safetensors, write_json
from ahm.train.finetune import finetune
from ahm.train.loop import Interrupted

UNET = {"backbone": "unet", "unet_channels": [4, 8], "unet_strides": [2], "unet_num_res_units": 0}
VIT = {"backbone": "vit", "preset": "custom", "patch_size": 16, "hidden_size": 16, "mlp_dim": 32, "num_layers": 12,
       "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data", n=16)


def _cfg(data_path: Path, **over) -> FinetuneConfig:
    base = {
        "data": {"path": str(data_path), "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": UNET, "segmenter": "unet",
        "train": {"epochs": 1, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "seed": 1, "accelerator": "cpu"},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return build_config(FinetuneConfig, overrides=base)


def _fake_pretrain_run(root: Path, model: dict, image_size: int = 32, policy: str = "random") -> Path:
    """A pretraining run directory as `ahm pretrain` leaves it, from a real (untrained) MIM model's export."""
    from ahm.models import build_mim_model

    cfg = build_config(PretrainConfig, overrides={"data": {"image_size": image_size}, "model": model,
                                                  "masking": {"policy": policy}})
    mim = build_mim_model(cfg.model, image_size, 1)
    root.mkdir(parents=True)
    save_config(cfg, root / "config.yaml")
    write_json(root / "run.json", {"kind": "pretrain", "version": "test", "seed": 0, "created": "now"})
    save_safetensors(root / "encoder.safetensors", mim.export_encoder(),
                     metadata={**mim.encoder_metadata(), "policy": policy})
    return root


def test_scratch_run_directory(blobs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = finetune(_cfg(blobs, labels_fraction=0.5), out, progress=False)
    for name in ("config.yaml", "run.json", "splits.json", "labelled.json", "metrics.jsonl", "summary.json",
                 "report.html", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "eval/val/metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["kind"] == "finetune"
    assert summary["init"] == "none" and summary["num_classes"] == 2 and summary["best_epoch"] == 1
    assert 0.0 <= summary["best_val_dice"] <= 1.0
    labelled = json.loads((out / "labelled.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    assert set(labelled["ids"]) < set(splits["train"])
    assert summary["labelled_subjects"] == len(labelled["subjects"]) == 2  # half of 4 training subjects
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in records) and any("loss" in r and "lr" in r for r in records)
    best = load_torch(out / "checkpoints" / "best.ckpt")
    assert best["meta"]["segmenter"] == "unet" and best["meta"]["in_channels"] == 1
    html = (out / "report.html").read_text()
    assert "Learning curves" in html and "data:image/png;base64," in html


def test_best_checkpoint_is_chosen_by_dataset_dice_and_never_by_predicting_nothing(blobs: Path, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """The first validation sees a checkpoint that finds the structure (half of each blob), every later one an
    all-background prediction: those score 0 and are never kept."""
    import ahm.eval.scoring as ev
    from ahm.data import load_arrays, make_splits, open_dataset

    cfg = _cfg(blobs, val_every=2, train={"epochs": 3})
    index = open_dataset(blobs, cfg.data)
    val = load_arrays(index, list(make_splits(index, cfg.data)["val"]), cfg.data, labels=True)
    finds = val.labels.copy()
    finds[:, : finds.shape[1] // 2] = 0
    calls = {"n": 0}

    def finds_then_nothing(model, images, **kw):
        calls["n"] += 1
        assert len(images) == len(val.labels)
        return finds.copy() if calls["n"] == 1 else np.zeros_like(finds)

    monkeypatch.setattr(ev, "predict_labels", finds_then_nothing)
    summary = finetune(cfg, tmp_path / "run", progress=False)
    tp = ((finds == 1) & (val.labels == 1)).sum()
    expected = 2 * tp / ((finds == 1).sum() + (val.labels == 1).sum())
    assert 0 < expected < 1 and summary["best_val_dice"] == pytest.approx(expected)
    assert summary["best_epoch"] == 1
    assert "dataset_dice" in summary["selection_metric"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    later = [r["val_dice"] for r in records if "val_dice" in r][1:]
    assert len(later) >= 2 and set(later) == {0.0}
    assert load_torch(tmp_path / "run" / "checkpoints" / "best.ckpt")["meta"]["select_by"] == "dataset_dice"


def test_resume_after_interrupt_is_exact(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    """Also the determinism test: two runs from one seed, one of them interrupted, end with equal weights."""
    import ahm.train.engine as engine

    cfg = _cfg(blobs, train={"epochs": 2})
    finetune(cfg, tmp_path / "straight", progress=False)

    fake_sigint = ctrl_c_after(3)  # a Ctrl-C after the 3rd step
    monkeypatch.setattr(engine, "stop_on_sigint", fake_sigint)
    with pytest.raises(Interrupted, match="--resume"):
        finetune(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert load_torch(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state"]["step"] == 3
    finetune(cfg, tmp_path / "resumed", resume=True, progress=False)

    for name in ("last.ckpt", "best.ckpt"):
        wa = load_torch(tmp_path / "straight" / "checkpoints" / name)["model"]
        wb = load_torch(tmp_path / "resumed" / "checkpoints" / name)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]

    assert rows("straight") == rows("resumed")


def _stop_after_step_3(monkeypatch) -> None:
    """A Ctrl-C reported after the 3rd step: the loop reads sig['stop'] once a step."""
    import ahm.train.engine as engine

    fake_sigint = ctrl_c_after(3)  # a Ctrl-C after the 3rd step
    monkeypatch.setattr(engine, "stop_on_sigint", fake_sigint)


def _loader_workers(monkeypatch) -> list[int]:
    """The number of worker processes of each loader a run makes, as the run makes them."""
    import ahm.data.corpus as corpus

    made: list[int] = []
    original = corpus.make_loader

    def recording(*args, **kwargs):
        loader = original(*args, **kwargs)
        made.append(loader.num_workers)
        return loader

    monkeypatch.setattr(corpus, "make_loader", recording)
    return made


def test_loader_workers_change_nothing_and_a_resume_with_them_is_exact(blobs: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """Without workers, uninterrupted; with 2, interrupted mid epoch 2 and resumed: the same weights."""
    made = _loader_workers(monkeypatch)
    finetune(_cfg(blobs, train={"epochs": 2, "workers": 0}), tmp_path / "straight", progress=False)
    cfg = _cfg(blobs, train={"epochs": 2, "workers": 2})
    with monkeypatch.context() as m:
        _stop_after_step_3(m)
        with pytest.raises(Interrupted):
            finetune(cfg, tmp_path / "resumed", progress=False)
    finetune(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert made == [0, 2, 2]
    for name in ("last.ckpt", "best.ckpt"):
        wa = load_torch(tmp_path / "straight" / "checkpoints" / name)["model"]
        wb = load_torch(tmp_path / "resumed" / "checkpoints" / name)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_the_loader_plans_the_batches_of_batch_order() -> None:
    from ahm.data.corpus import StepBatches
    from ahm.train.loop import ShuffledItems, batch_order

    for n, batch, world in ((16, 2, 1), (11, 3, 1), (13, 2, 2)):
        per_epoch = n // (batch * world)
        for rank in range(world):
            expected = [b for epoch in range(3) for b in batch_order(n, epoch, 4, batch, rank, world)]
            for start in (0, per_epoch + 1):
                planned = list(StepBatches(ShuffledItems(n), 4, batch, start, 3 * per_epoch, rank, world))
                assert [[key[2] for key in keys] for keys in planned] == expected[start:]
                assert [keys[0][0] for keys in planned] == [s // per_epoch for s in range(start, 3 * per_epoch)]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again(blobs: Path, tmp_path: Path) -> None:
    from ahm.train.rundir import prepare_run_dir

    out = prepare_run_dir(tmp_path / "run", "finetune", seed=1)
    summary = finetune(_cfg(blobs), out, resume=True, progress=False)
    assert summary["steps"] > 0 and (out / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("model, segmenter", [(UNET, "unet"), (VIT, "unetr")])
def test_from_pretraining_run(blobs: Path, tmp_path: Path, model: dict, segmenter: str) -> None:
    pre = _fake_pretrain_run(tmp_path / "pre", model, policy="ahm")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pre / "reconstructions.png")  # the figure pretrain writes
    cfg = _cfg(blobs, init=str(pre), segmenter="unetr" if segmenter == "unet" else "unet",
               layer_decay=0.8, encoder_lr_scale=0.5)
    summary = finetune(cfg, tmp_path / "ft", progress=False)
    assert summary["segmenter"] == segmenter  # the encoder decides, whatever the config said
    assert summary["init"] == str(pre) and summary["init_policy"] == "ahm"
    assert summary["encoder_loaded"]["loaded"] > 0
    saved = build_config(FinetuneConfig, file=tmp_path / "ft" / "config.yaml")
    assert saved.model.backbone == model["backbone"] and saved.segmenter == segmenter
    assert "Masks chosen by the AHM agent" in (tmp_path / "ft" / "report.html").read_text()


def test_pretrained_weights_are_the_starting_point(blobs: Path, tmp_path: Path) -> None:
    from ahm.io import load_safetensors

    pre = _fake_pretrain_run(tmp_path / "pre", VIT)
    enc = load_safetensors(pre / "encoder.safetensors")
    import ahm.train.finetune as ft
    from ahm.models import build_segmenter

    seg = build_segmenter("unetr", ModelConfig(**VIT), 32, 1, 2)
    info = ft.load_init(pre)
    from ahm.models import load_pretrained

    load_pretrained(seg, "unetr", info.weights, info.metadata)
    assert all(torch.equal(seg.vit.state_dict()[k], enc[k]) for k in enc)


def test_evaluate_after_finetune_with_volumes(tmp_path: Path) -> None:
    from ahm.eval.evaluate import evaluate

    data = tmp_path / "vols"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for s in range(6):
        img = rng.normal(50, 5, size=(24, 24, 4)).astype(np.float32)
        lab = np.zeros((24, 24, 4), np.uint8)
        lab[6:16, 8:18, :] = 1
        img[lab == 1] += 100
        nib.save(nib.Nifti1Image(img, np.eye(4)), data / "images" / f"v{s}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), data / "masks" / f"v{s}.nii.gz")
    cfg = _cfg(data, data={"val_fraction": 0.2, "test_fraction": 0.2})
    finetune(cfg, tmp_path / "run", progress=False)
    metrics = evaluate(tmp_path / "run", data, split="all")
    assert metrics["n_images"] == 24 and metrics["split"] == "all"
    # every image is a slice of a volume: the re-stacked volumes are the primary level
    assert metrics["level"] == "volume" and metrics["volume_level"]["n_volumes"] == 6
    assert metrics["dice"] == metrics["volume_level"]["dice"]
    assert metrics["slice_level"]["n_cases"] == 24
    assert set(metrics["per_class"]) == {"1"}
    assert (tmp_path / "run" / "eval" / "all" / "per_image.csv").read_text().count("\n") == 25
    test = evaluate(tmp_path / "run", data, split="test")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert test["n_images"] == len(splits["test"])
    assert "all split" in (tmp_path / "run" / "report.html").read_text()


# ----------------------------------------------------------------------------------------------- refusals


def test_refuses_nonempty_out_without_force(blobs: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(AhmError, match="not empty"):
        finetune(_cfg(blobs), out, progress=False)
    with pytest.raises(AhmError, match="does not look like an ahm run"):
        finetune(_cfg(blobs), out, force=True, progress=False)
    assert (out / "notes.txt").read_text() == "precious"


def test_refuses_dataset_without_masks(tmp_path: Path) -> None:
    data = make_blob_folder(tmp_path / "nolabels", n=6, labels=False)
    with pytest.raises(AhmError, match="no masks"):
        finetune(_cfg(data), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_refuses_labels_fraction_with_no_subject(blobs: Path, tmp_path: Path) -> None:
    with pytest.raises(AhmError, match="--labels-fraction"):
        finetune(_cfg(blobs, labels_fraction=0.01), tmp_path / "run", progress=False)


def test_labels_subjects_labels_that_many_training_subjects(blobs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = finetune(_cfg(blobs, labels_subjects=3), out, progress=False)
    labelled = json.loads((out / "labelled.json").read_text())
    assert summary["labelled_subjects"] == len(labelled["subjects"]) == 3 and summary["labels_subjects"] == 3
    assert labelled["subjects_count"] == 3
    with pytest.raises(AhmError, match="labels_fraction and labels_subjects: give one of them"):
        _cfg(blobs, labels_subjects=3, labels_fraction=0.5)
    with pytest.raises(AhmError, match="--labels-subjects 99"):
        finetune(_cfg(blobs, labels_subjects=99), tmp_path / "run2", progress=False)


def test_refuses_missing_encoder(blobs: Path, tmp_path: Path) -> None:
    (tmp_path / "pre").mkdir()
    with pytest.raises(AhmError, match="encoder.safetensors not found"):
        finetune(_cfg(blobs, init=str(tmp_path / "pre")), tmp_path / "run", progress=False)
    with pytest.raises(AhmError, match="not found"):
        finetune(_cfg(blobs, init=str(tmp_path / "nowhere")), tmp_path / "run", progress=False)


def test_refuses_mismatched_encoder(blobs: Path, tmp_path: Path) -> None:
    pre = _fake_pretrain_run(tmp_path / "pre", VIT, image_size=48)
    with pytest.raises(AhmError, match="image size 48 pretrained vs 32 here .omit --image-size or use 48.; patch grid 3x3"):
        finetune(_cfg(blobs, init=str(pre)), tmp_path / "run", progress=False)
    # An encoder whose shapes disagree with the run's config: the loader names the file.
    pre2 = _fake_pretrain_run(tmp_path / "pre2", UNET)
    cfg = build_config(PretrainConfig, file=pre2 / "config.yaml")
    cfg.model.unet_channels = (8, 16)
    save_config(cfg, pre2 / "config.yaml")
    with pytest.raises(AhmError, match="encoder.safetensors"):
        finetune(_cfg(blobs, init=str(pre2)), tmp_path / "run2", progress=False)
    (pre2 / "encoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(AhmError, match="encoder.safetensors"):
        finetune(_cfg(blobs, init=str(pre2)), tmp_path / "run3", progress=False)


def test_cli_segmenter_option_and_its_deprecated_alias(blobs: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    pre = _fake_pretrain_run(tmp_path / "pre", UNET)
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", str(pre), "--segmenter", "unetr",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--segmenter unetr does not match" in res.output and "deprecated" not in res.output
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", "none", "--model", "resnet",
                                   "--out", str(tmp_path / "run")])
    warning, error = res.output.strip().splitlines()
    assert "`ahm finetune --model` is deprecated" in warning and "use --segmenter" in warning
    assert res.exit_code == 2 and "--model resnet: choose unetr or unet" in error
    assert "--model" not in CliRunner().invoke(app, ["finetune", "--help"]).output
    # nnU-Net's plans choose the network of a fine-tuning from scratch; a pretraining run brings its own
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", str(pre), "--plans", "p.json",
                                   "--configuration", "2d", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--plans/--configuration" in res.output and "--init none" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_model_must_match_encoder(blobs: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    pre = _fake_pretrain_run(tmp_path / "pre", UNET)
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", str(pre), "--model", "unetr",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--model unetr does not match" in res.output
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--init" in res.output
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", "none", "--steps", "3", "--epochs", "2",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--steps and --epochs" in res.output and not (tmp_path / "run").exists()
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", str(pre), "--steps", "4",
                                   "--head-warmup-steps", "4", "--out", str(tmp_path / "run")])
    assert res.exit_code != 0 and "head_warmup_steps: 4 leaves none of the run's 4 steps" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_cli_workers_option_reaches_the_config(blobs: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    assert "--workers" in CliRunner().invoke(app, ["finetune", "--help"]).output
    res = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", "none", "--workers", "-1",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code != 0 and "train.workers" in res.output and not (tmp_path / "run").exists()


def test_validation_interval_default_caps_validations() -> None:
    from ahm.train.validation import MAX_VALIDATIONS, validation_interval

    assert validation_interval(None, steps_per_epoch=2, total=900) == 18  # 900 / 50, not every 2-step epoch
    assert validation_interval(None, steps_per_epoch=40, total=400) == 40  # a long epoch: once per epoch
    assert validation_interval(7, steps_per_epoch=2, total=900) == 7
    assert math.ceil(900 / validation_interval(None, 2, 900)) <= MAX_VALIDATIONS


def test_val_every_sets_when_validation_runs(blobs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(blobs, val_every=3)
    cfg.train.epochs, cfg.train.steps = None, 7
    summary = finetune(cfg, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_dice" in r] == [3, 6, 7]  # every 3 steps, and the last one
    assert summary["val_every"] == 3 and summary["steps"] == 7
    with pytest.raises(AhmError, match="val_every"):
        _cfg(blobs, val_every=0)


def test_run_configs_written_before_model_norm_existed_mean_instance_norm(tmp_path: Path) -> None:
    import yaml

    from ahm.config import load_config

    cfg = FinetuneConfig()
    assert cfg.model.norm == "batch"
    saved = cfg.model_dump(mode="json")
    del saved["model"]["norm"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    assert load_config(FinetuneConfig, tmp_path / "old.yaml").model.norm == "instance"
    assert build_config(FinetuneConfig, file=tmp_path / "old.yaml").model.norm == "batch"  # a user's file: default
    save_config(cfg, tmp_path / "new.yaml")
    assert load_config(FinetuneConfig, tmp_path / "new.yaml").model.norm == "batch"
    pre = PretrainConfig().model_dump(mode="json")
    del pre["model"]["norm"]
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    assert load_config(PretrainConfig, tmp_path / "pre.yaml").model.norm == "instance"


def test_acquisition_augmentation_reaches_training_and_is_validated(blobs: Path, tmp_path: Path) -> None:
    import yaml

    runs = {}
    for name, extra in (("plain", {}), ("acq", {"gamma": 0.5, "bias_field": 0.3})):
        cfg = _cfg(blobs, train={"epochs": 2}, **extra)
        finetune(cfg, tmp_path / name, progress=False)
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
    saved = yaml.safe_load((tmp_path / "acq" / "config.yaml").read_text())
    assert saved["gamma"] == 0.5 and saved["bias_field"] == 0.3
    assert runs["plain"] != runs["acq"]  # same seed, same data order: only the images' intensities differ
    with pytest.raises(AhmError, match="gamma"):
        _cfg(blobs, gamma=-1.0)
    with pytest.raises(AhmError, match="bias_field"):
        _cfg(blobs, bias_field=3.0)


def test_pretrained_lr_factor_waits_then_has_its_own_warmup_and_cosine() -> None:
    from ahm.train.schedule import lr_factor, pretrained_lr_factor

    assert pretrained_lr_factor(5, 100, 10, 0.01, 0) is None
    assert [pretrained_lr_factor(s, 100, 10, 0.01, 30) for s in range(30)] == [0.0] * 30
    assert pretrained_lr_factor(30, 100, 10, 0.01, 30) == pytest.approx(0.1)  # first step of its warm-up
    assert pretrained_lr_factor(39, 100, 10, 0.01, 30) == pytest.approx(1.0)
    assert pretrained_lr_factor(99, 100, 10, 0.01, 30) == pytest.approx(lr_factor(69, 70, 10, 0.01))
    assert pretrained_lr_factor(99, 100, 10, 0.01, 30) < 0.02


def test_head_warmup_trains_only_the_new_layers_first(blobs: Path, tmp_path: Path, monkeypatch) -> None:
    import ahm.train.engine as engine

    pre = _fake_pretrain_run(tmp_path / "pre", UNET)
    original = engine.set_lr
    seen: list[tuple[dict[str, float], torch.Tensor, torch.Tensor]] = []

    def recording(optimizer, *args):
        out = original(optimizer, *args)
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
        by_name = {g["name"]: g["params"] for g in optimizer.param_groups}
        seen.append((groups, by_name["unet.pretrained"][0].detach().clone(),
                     by_name["unet.head"][0].detach().clone()))
        return out

    monkeypatch.setattr(engine, "set_lr", recording)
    cfg = _cfg(blobs, init=str(pre), head_warmup_steps=3, train={"warmup_steps": 1})
    cfg.train.epochs, cfg.train.steps = None, 6
    finetune(cfg, tmp_path / "ft", progress=False)
    assert len(seen) == 6
    assert [s[0]["unet.pretrained"] for s in seen[:3]] == [0.0, 0.0, 0.0]
    assert all(s[0]["unet.pretrained"] > 0 for s in seen[3:])
    assert all(s[0]["unet.head"] > 0 for s in seen)
    # weights as each step begins: the pretrained ones still untouched after three steps, the head moving at once
    assert all(torch.equal(seen[0][1], s[1]) for s in seen[1:4]) and not torch.equal(seen[3][1], seen[5][1])
    assert not torch.equal(seen[0][2], seen[1][2])
    cfg.head_warmup_steps = 6
    with pytest.raises(AhmError, match="head_warmup_steps"):
        finetune(cfg, tmp_path / "ft2", progress=False)
    assert not (tmp_path / "ft2").exists()
    with pytest.raises(AhmError, match="head_warmup_steps"):
        _cfg(blobs, head_warmup_steps=-1)


def _frozen_state(model: torch.nn.Module, frozen: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen modules' state (weights and normalisation statistics), by name."""
    ids = {id(m) for m in frozen}
    out = {}
    for name, module in model.named_modules():
        if id(module) in ids:
            for key, value in module.state_dict().items():
                out[f"{name}.{key}"] = value.detach().clone()
    return out


@pytest.mark.parametrize("model, segmenter", [(UNET, "unet"), (VIT, "unetr")])
def test_frozen_encoder_keeps_weights_and_statistics_and_trains_the_rest(blobs: Path, tmp_path: Path, model: dict,
                                                                        segmenter: str) -> None:
    from ahm.io import load_safetensors
    from ahm.models import backbone_of_segmenter, build_segmenter

    pre = _fake_pretrain_run(tmp_path / "pre", {**model, "norm": "batch"})
    cfg = _cfg(blobs, init=str(pre), freeze_encoder=True, model={"norm": "batch"})
    cfg.train.epochs, cfg.train.steps = None, 4
    summary = finetune(cfg, tmp_path / "ft", progress=False)
    assert summary["protocol"] == "frozen"
    trained = load_torch(tmp_path / "ft" / "checkpoints" / "last.ckpt")["model"]
    seg = build_segmenter(segmenter, ModelConfig(**{**model, "norm": "batch"}), 32, 1, 2)
    frozen = backbone_of_segmenter(segmenter).encoder_modules(seg)
    names = _frozen_state(seg, frozen)
    enc = load_safetensors(pre / "encoder.safetensors")
    prefix = "vit." if segmenter == "unetr" else ""
    for key in names:  # weights and (UNet) batch-norm running statistics: exactly the pretrained ones
        assert torch.equal(trained[key], enc[key.removeprefix(prefix)]), key
    assert any("running_mean" in k for k in names) == (segmenter == "unet")
    # everything outside the encoder trained, and fewer parameters than the whole network
    rest = [k for k, v in seg.state_dict().items() if k not in names and v.is_floating_point()
            and "running" not in k]
    start = seg.state_dict()
    moved = [k for k in rest if k in enc and not torch.equal(trained[k], enc[k])] + \
        [k for k in rest if k not in enc and not torch.equal(trained[k], start[k])]
    assert moved
    assert summary["trainable_parameters"] < sum(p.numel() for p in seg.parameters())


def test_frozen_protocol_scratch_arm_is_a_random_frozen_encoder(blobs: Path, tmp_path: Path) -> None:
    cfg = _cfg(blobs, init="random", freeze_encoder=True, model={"norm": "batch"})
    cfg.train.epochs, cfg.train.steps = None, 3
    summary = finetune(cfg, tmp_path / "ft", progress=False)
    assert summary["protocol"] == "frozen" and summary["init"] == "none"
    scratch = finetune(_cfg(blobs, init="random", model={"norm": "batch"}, train={"epochs": None, "steps": 3}),
                       tmp_path / "ft2", progress=False)
    assert scratch["protocol"] == "finetune"
    assert summary["trainable_parameters"] < scratch["trainable_parameters"]


def test_freeze_encoder_without_init_is_refused_before_anything_is_written(blobs: Path, tmp_path: Path) -> None:
    for init in (None, "none"):
        with pytest.raises(AhmError, match="--freeze-encoder: nothing pretrained to freeze"):
            finetune(_cfg(blobs, init=init, freeze_encoder=True), tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()
    from ahm.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, ["-q", "finetune", str(blobs), "--init", "none", "--freeze-encoder", "--out",
                                      str(tmp_path / "cli")])
    assert result.exit_code == 2 and "--freeze-encoder: nothing pretrained to freeze" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cli").exists()


def _sharded_validation(fabric, cfg, data_path: str, state: dict) -> tuple[float, int]:
    from ahm.models import build_segmenter
    from ahm.train.finetune_data import prepare_data
    from ahm.train.validation import validation_score

    data = prepare_data(cfg, Path(data_path), resume=False)
    torch.manual_seed(0)
    model = build_segmenter("unet", cfg.model, 32, data.in_channels, data.num_classes)
    model.load_state_dict(state)  # the same weights on every rank and in the one-process reference
    return validation_score(model, cfg, data, fabric, batch_size=2), fabric.world_size


@pytest.mark.slow
def test_validation_sharded_over_two_processes_equals_one_process(blobs: Path) -> None:
    from lightning.fabric import Fabric

    from ahm.models import build_segmenter

    for select_by in ("dataset_dice", "case_dice"):
        cfg = _cfg(blobs, select_by=select_by, data={"val_fraction": 0.45})
        torch.manual_seed(3)
        state = build_segmenter("unet", cfg.model, 32, 1, 2).state_dict()
        one = _sharded_validation(Fabric(accelerator="cpu", devices=1), cfg, str(blobs), state)
        two = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(
            _sharded_validation, cfg, str(blobs), state)
        assert one[1] == 1 and two[1] == 2
        assert two[0] == one[0] and 0 < one[0] < 1
