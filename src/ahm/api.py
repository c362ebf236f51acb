"""The Python API: what the commands do, as functions with typed configs in and typed results out.

    import ahm
    from ahm.config import FinetuneConfig, PretrainConfig

    pre = ahm.pretrain(PretrainConfig(data={"path": "brain"}, masking={"policy": "ahm"}), out="runs/pre")
    seg = ahm.finetune(FinetuneConfig(data={"path": "brain"}, init=str(pre.run_dir)), out="runs/seg")
    scores = ahm.evaluate(seg.run_dir)
    model = ahm.load_segmenter(seg.run_dir)

A config is a `PretrainConfig`/`FinetuneConfig`, a nested dict of the same keys, or a YAML file's path. What a
config object sets explicitly is what the command line would set: the rest comes, as for the command, from the
defaults (the 3D defaults for a 3D run) and, for a fine-tuning, from its pretraining run (`ahm.train.resolve`).
Errors are `ahm.AhmError`, with the message the command prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ahm.config import FinetuneConfig, PretrainConfig

if TYPE_CHECKING:
    from torch import nn

ConfigLike = PretrainConfig | FinetuneConfig | Mapping[str, Any] | str | Path | None


@dataclass(frozen=True)
class PretrainResult:
    """A finished (or resumed and finished) pretraining: its run directory and `summary.json`."""

    run_dir: Path
    summary: dict[str, Any] = field(repr=False)

    @property
    def encoder(self) -> Path:
        """The encoder weights `finetune(init=...)` and `load_encoder` read."""
        return self.run_dir / "encoder.safetensors"

    @property
    def final_loss(self) -> float:
        return float(self.summary["final_loss"])


@dataclass(frozen=True)
class FinetuneResult:
    """A finished fine-tuning: its run directory and `summary.json` (best validation figure, epochs, labels)."""

    run_dir: Path
    summary: dict[str, Any] = field(repr=False)

    @property
    def best_val_dice(self) -> float:
        """The validation figure that kept the best checkpoint (`select_by`: dataset-level Dice by default)."""
        return float(self.summary["best_val_dice"])


@dataclass(frozen=True)
class EvaluationResult:
    """The scores of one split: `metrics` as in eval/<split>/metrics.json, which `out_dir` holds with the CSVs."""

    run_dir: Path
    split: str
    metrics: dict[str, Any] = field(repr=False)
    out: Path | None = None  # where `evaluate(out=...)` wrote them instead of the run directory

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.run_dir / "eval" / self.split


@dataclass(frozen=True)
class PredictionResult:
    """The masks written: `outputs` (one entry per input), `failures` (inputs that could not be read)."""

    out_dir: Path
    summary: dict[str, Any] = field(repr=False)

    @property
    def outputs(self) -> list[Any]:
        return list(self.summary.get("outputs", []))

    @property
    def failures(self) -> list[Any]:
        return list(self.summary.get("failures", []))


def _options(config: ConfigLike, kind: type) -> tuple[dict[str, Any], Path | None]:
    """(what the caller set, as nested options; a YAML file to read under them, or None)."""
    if config is None:
        return {}, None
    if isinstance(config, (str, Path)):
        return {}, Path(config)
    if isinstance(config, kind):
        # only what was set explicitly, as the command line gives only the options typed
        return config.model_dump(exclude_unset=True), None
    if isinstance(config, Mapping):
        return dict(config), None
    raise TypeError(f"config: a {kind.__name__}, a mapping or a YAML path, not {type(config).__name__}")


def pretrain(config: ConfigLike, out: str | Path, *, resume: bool = False, force: bool = False,
             progress: bool = False) -> PretrainResult:
    """Pretrain by masked image modeling, as `ahm pretrain`; writes the run directory `out`."""
    from ahm.train.pretrain import pretrain as run
    from ahm.train.resolve import resolve_pretrain_config

    options, file = _options(config, PretrainConfig)
    cfg = resolve_pretrain_config(options, file=file, resume=resume)
    summary = run(cfg, out, resume=resume, force=force, progress=progress)
    return PretrainResult(Path(out), summary)


def finetune(config: ConfigLike, out: str | Path, *, init: str | Path | None = None, resume: bool = False,
             force: bool = False, progress: bool = False) -> FinetuneResult:
    """Fine-tune a segmenter, as `ahm finetune`: from the pretraining run `init` (or the config's `init`; 'none'
    trains from scratch), taking that run's image size, and in 3D its spacing, orientation and crop, where the
    config does not set them."""
    from ahm.train.finetune import finetune as run
    from ahm.train.resolve import resolve_finetune_config

    options, file = _options(config, FinetuneConfig)
    cfg = resolve_finetune_config(options, init, file=file, resume=resume)
    summary = run(cfg, out, resume=resume, force=force, progress=progress)
    return FinetuneResult(Path(out), summary)


def evaluate(run: str | Path, data: str | Path | None = None, *, split: str = "test", empty: str = "exclude",
             overlap: float = 0.5, accelerator: str | None = None, precision: str | None = None,
             report: bool = True, out: str | Path | None = None) -> EvaluationResult:
    """Score a fine-tuning run's best checkpoint on `split` of `data` (default: the set it trained on), as
    `ahm evaluate`: per-case and dataset-level Dice, IoU, HD95 and detection per class; into the folder `out`
    instead of the run directory when given (nothing is then written there)."""
    from ahm.eval.evaluate import evaluate as run_evaluate

    metrics = run_evaluate(run, data, split=split, empty=empty, overlap=overlap, accelerator=accelerator,
                           precision=precision, report=report, out=out)
    return EvaluationResult(Path(run), split, metrics, None if out is None else Path(out))


def predict(run: str | Path, inputs: Sequence[str | Path], out: str | Path, *, overlay: bool = False,
            force: bool = False, overlap: float = 0.5, accelerator: str | None = None,
            precision: str | None = None) -> PredictionResult:
    """Segment image or volume files with a fine-tuning run, as `ahm predict`; masks keep each input's grid."""
    from ahm.eval.predict import predict as run_predict

    summary = run_predict(run, [Path(p) for p in inputs], out, overlay=overlay, force=force, overlap=overlap,
                          accelerator=accelerator, precision=precision)
    return PredictionResult(Path(out), summary)


def load_segmenter(run: str | Path, *, checkpoint: str = "best.ckpt", device: str = "cpu") -> nn.Module:
    """The fine-tuned segmenter of a run (its best checkpoint by default): a plain MONAI module (UNETR or UNet)
    in eval mode on `device`, taking images preprocessed as the run's (`config.yaml`: data) and returning
    class logits; in 3D give it to `monai.inferers.sliding_window_inference` with the run's crop as roi_size."""
    from ahm.eval.evaluate import load_run

    return load_run(run, checkpoint, accelerator=device).model


def load_encoder(run: str | Path, *, num_classes: int = 2) -> nn.Module:
    """A pretraining run's encoder, in the segmenter its backbone fine-tunes as (UNETR for `vit`, the UNet for
    `unet`) with `num_classes` outputs: the pretrained weights loaded strictly, the new layers (UNETR's decoder, the
    UNet's last layer) freshly initialised; for a training loop of your own. Built for the pretraining's input
    size, channels and dimension."""
    from ahm.models import backbone_of_segmenter, build_segmenter, load_pretrained
    from ahm.pipeline import model_input_size
    from ahm.train.pretrained import load_init

    enc = load_init(run)
    pre = enc.pretrain_cfg
    model_cfg = backbone_of_segmenter(enc.segmenter).finetune_model_config(pre.model, FinetuneConfig().model)
    segmenter = build_segmenter(enc.segmenter, model_cfg, model_input_size(pre.data),
                                int(enc.metadata["in_channels"]), num_classes, spatial_dims=pre.data.spatial_dims)
    load_pretrained(segmenter, enc.segmenter, enc.weights, {**enc.metadata, "path": str(enc.path)})
    return segmenter


def read_summary(run: str | Path) -> dict[str, Any]:
    """A run directory's summary.json (what its command printed at the end)."""
    import json

    return json.loads((Path(run) / "summary.json").read_text())
