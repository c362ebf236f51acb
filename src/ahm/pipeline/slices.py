"""The 2D pipeline: images and slices of volumes, each normalised and resized to the model grid once and held
in memory as arrays; inference is a batched forward pass on that grid; a split is scored per image and, where
the images are slices of volumes, per re-stacked volume; a file is predicted back onto its own size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ahm.pipeline.base import Cases, Labelled, Pipeline

if TYPE_CHECKING:
    import torch

    from ahm.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig
    from ahm.data.corpus import Corpus
    from ahm.data.dataset import Arrays
    from ahm.data.layouts import DatasetIndex, Item
    from ahm.data.sample_store import SampleStore
    from ahm.eval.evaluate import LoadedRun
    from ahm.eval.predict_files import Batcher, Job

# DataConfig fields of 3D only, left out of a 2D sample store's digest
_VOLUME_SETTINGS = {"spatial_dims", "spacing", "orientation", "crop_size", "pos_neg_ratio"}


class SlicePipeline(Pipeline):
    spatial_dims = 2

    def check_model_input(self, data_cfg: DataConfig, multiple, why: str) -> None:
        # the model grid is square at `image_size`; a fine-tuning crop is fitted to the backbone by
        # `ahm.train.finetune.train_crop_size` instead of being refused
        return None

    def pretrained_sizes(self, pre_data: DataConfig, metadata: dict, data_cfg: DataConfig) -> tuple[Any, Any, list[str]]:
        pre_size = int(metadata.get("image_size", pre_data.image_size))
        size = data_cfg.image_size
        found = [] if pre_size == size else [f"image size {pre_size} pretrained vs {size} here "
                                             f"(omit --image-size or use {pre_size})"]
        return pre_size, size, found

    def checkpoint_meta(self, cfg: FinetuneConfig) -> dict[str, Any]:
        return {}  # a checkpoint without spatial_dims is 2D (`ahm.eval.evaluate.load_run`)

    def summary_fields(self, cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {}

    def model_input_size(self, data_cfg: DataConfig) -> int:
        return data_cfg.image_size

    def build_segmenter(self, meta: dict[str, Any], model_cfg: ModelConfig, path: Path) -> torch.nn.Module:
        from ahm.models import build_segmenter

        return build_segmenter(meta["segmenter"], model_cfg, int(meta["image_size"]), int(meta["in_channels"]),
                               int(meta["num_classes"]))

    # ------------------------------------------------------------------ pretraining samples

    def pretraining_sample(self, item: Item, index: DatasetIndex, data_cfg: DataConfig, channels: int | None,
                           cache: Any = None) -> np.ndarray:
        from ahm.data.dataset import prepare_item

        return prepare_item(item, index, data_cfg, False, channels, cache)[0]  # on the model grid [C, S, S]

    def pretraining_transform(self, cfg: PretrainConfig) -> Callable[[dict], dict] | None:
        from ahm.data.transforms import pretrain_augment

        return pretrain_augment(cfg.data.image_size) if cfg.train.augment else None

    # ------------------------------------------------------------------ the data side: items, corpus and index

    def read_item(self, item: Item, index: DatasetIndex, data_cfg: DataConfig, labels: bool,
                  cache: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        from ahm.data.dataset import read_item

        return read_item(item, index, data_cfg, labels=labels, cache=cache)

    def from_volume(self, item: Item) -> bool:
        return item.slice is not None

    def sample_shape(self, item: Item, volume_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n for a, n in enumerate(volume_shape) if a != item.axis)  # the slice's plane

    def normalization_rule(self, data_cfg: DataConfig, index: DatasetIndex) -> str:
        from ahm.data.dataset import normalization_rule

        return normalization_rule(data_cfg, index)

    def samples_with_replacement(self) -> bool:
        return False

    def corpus_bytes(self, corpus: Corpus) -> int:
        return corpus.n_entries * corpus.channels * corpus.image_size ** 2 * 4  # float32 on the model grid

    def preload_holder(self, corpus: Corpus) -> Any:
        import torch

        return torch.empty((len(corpus), corpus.channels, corpus.image_size, corpus.image_size), dtype=torch.float32)

    def cache_ignores(self) -> set[str]:
        # the 3D options too: a 2D store keeps the key it had before they existed
        return {"path", "skip_bad"} | _VOLUME_SETTINGS

    def sample_store(self, folder: Path, key: str, corpus: Corpus) -> SampleStore:
        from ahm.data.sample_store import SliceStore

        return SliceStore(folder, key, len(corpus), corpus.channels, corpus.image_size)

    def count_samples(self, images: int, slices: int, volumes: int) -> int:
        return images + slices

    def samples_word(self) -> str:
        return "images"

    def describe_source_counts(self, counts: dict[str, Any]) -> str:
        return f"{counts['images']} image(s)" + (f", {counts['volumes']} volume(s) = {counts['slices']} slices"
                                                  if counts["volumes"] else "")

    def describe_corpus_counts(self, totals: dict[str, Any]) -> str:
        return (f"{totals['samples']} 2D samples ({totals['images']} images, {totals['slices']} slices of "
                f"{totals['volumes']} volumes)")

    # ------------------------------------------------------------------ fine-tuning data

    def prepare_labelled(self, cfg: FinetuneConfig, index: DatasetIndex, splits: dict[str, list[str]],
                         labelled: list[str]) -> Labelled:
        from ahm.data.dataset import load_arrays

        train = load_arrays(index, labelled, cfg.data, labels=True)
        in_channels = int(train.images.shape[1])
        data_cfg = cfg.data.model_copy(update={"channels": in_channels})
        val_ids = list(splits.get("val", []))
        if val_ids:
            val, val_source = load_arrays(index, val_ids, data_cfg, labels=True), "val"
        else:
            # No validation subjects (a tiny dataset): the best epoch is chosen on the labelled training images.
            val, val_source = train, "train (no validation split)"
        found = max(int(train.labels.max(initial=0)), int(val.labels.max(initial=0)),
                    max(index.label_values or [0])) + 1
        by_id = index.by_id()
        subjects = sorted({by_id[i].subject for i in train.ids})
        return Labelled(train, val, val_source, found, in_channels, subjects, train.normalization)

    def training_set(self, cfg: FinetuneConfig, train: Any, crop_size: int | None, pads_crop: bool) -> Any:
        from ahm.data.dataset import ArrayDataset
        from ahm.data.transforms import segment_augment

        transform = None
        if cfg.train.augment:
            transform = segment_augment(cfg.data.image_size, cfg.min_crop_area, cfg.rotate_deg, cfg.intensity_jitter,
                                        cfg.gamma, cfg.bias_field, crop_size=crop_size, pad=pads_crop)
        return ArrayDataset(train.images, train.labels, transform, seed=cfg.train.seed)

    # ------------------------------------------------------------------ validation

    def predict_share(self, model, cfg: FinetuneConfig, val: Any, rank: int, world: int, device, precision: str,
                      batch_size: int, progress=None) -> Any:
        from ahm.eval import scoring  # looked up at call time, where a test may stand in for predict_labels

        mine = np.arange(rank, len(val.images), world)
        return mine, scoring.predict_labels(model, val.images[mine], batch_size=batch_size, device=device,
                                            precision=precision)

    def selection_score(self, shares: list[Any], val: Any, num_classes: int, select_by: str) -> float:
        from ahm.eval.metrics import selection_score

        preds = np.zeros((len(val.images),) + shares[0][1].shape[1:], dtype=np.int64)
        for indices, share in shares:
            preds[indices] = share
        return selection_score(preds, val.labels, num_classes, select_by)

    def score_validation(self, model, cfg: FinetuneConfig, val: Any, num_classes: int, device, names: list[str],
                         out_dir: Path, extra: dict[str, Any], batch_size: int) -> dict[str, Any]:
        from ahm.eval import scoring

        preds = scoring.predict_labels(model, val.images, batch_size=batch_size, device=device)
        return scoring.score_arrays(out_dir, preds, val.labels, val.images, val.ids, val.items, num_classes, "val",
                                    names=names, spacing=val.spacing, slice_mm=val.slice_mm, extra=extra)

    # ------------------------------------------------------------------ evaluation

    def evaluation_config(self, loaded: LoadedRun, data_path: Path) -> DataConfig:
        return loaded.cfg.data.model_copy(update={"path": str(data_path), "channels": loaded.in_channels,
                                                  "image_size": loaded.image_size})

    def score_split(self, loaded: LoadedRun, index: DatasetIndex, ids: list[str], data_cfg: DataConfig,
                    out_dir: Path, split: str, empty: str, overlap: float, batch_size: int,
                    record: dict[str, Any]) -> dict[str, Any]:
        from ahm.data.dataset import load_arrays
        from ahm.eval import scoring
        from ahm.eval.metrics import class_names

        arrays = load_arrays(index, ids, data_cfg, labels=True)
        preds = scoring.predict_labels(loaded.model, arrays.images, batch_size=batch_size, device=loaded.device,
                                       precision=loaded.precision)
        return scoring.score_arrays(out_dir, preds, arrays.labels, arrays.images, arrays.ids, arrays.items,
                                    loaded.num_classes, split, empty=empty,
                                    names=class_names(loaded.num_classes, index.class_names),
                                    spacing=arrays.spacing, slice_mm=arrays.slice_mm,
                                    extra={**record, "inference": scoring.inference_setting(loaded),
                                           "skipped_files": list(arrays.problems)})

    # ------------------------------------------------------------------ prediction of files

    def predict_file(self, run: LoadedRun, job: Job, batcher: Batcher, overlap: float) -> None:
        from ahm.eval.predict_files import predict_image, predict_slices

        # a volume goes through a 2D run slice by slice, re-stacked into a label volume on its own grid
        (predict_slices if job.volume else predict_image)(run, job, batcher)

    # ------------------------------------------------------------------ reports and benches

    case_noun = "image"
    trained_on = "2D images"
    report_levels = (("volume_level", "re-stacked volumes, scored in 3D"), ("slice_level", "2D images (slices)"))

    def drawn_views(self, shape: Sequence[int]) -> list[tuple[str, tuple[Any, ...]]]:
        return [("", (slice(None), slice(None)))]  # the image itself

    def drawn_samples(self, index: DatasetIndex, ids: list[str], data_cfg: DataConfig) -> Arrays:
        from ahm.data.dataset import load_arrays

        return load_arrays(index, ids, data_cfg, labels=False)

    def baseline_cases(self, index: DatasetIndex, ids: list[str], data_cfg: DataConfig) -> Cases:
        from ahm.data.dataset import load_arrays

        arrays = load_arrays(index, ids, data_cfg, labels=True)
        assert arrays.labels is not None
        return Cases(arrays.ids, list(arrays.images), list(arrays.labels), True, arrays)

    def case_scores(self, cases: Cases, preds: list[np.ndarray], num_classes: int, empty: str) -> dict[str, Any]:
        from ahm.eval.scoring import leveled_scores

        # the primary level: the re-stacked volumes where the images are their slices
        arrays = cases.source
        metrics, slice_level, volume_level = leveled_scores(np.stack(preds), arrays.labels, arrays.items,
                                                            num_classes, empty=empty, spacing=arrays.spacing,
                                                            slice_mm=arrays.slice_mm)
        primary = volume_level if volume_level is not None and metrics["level"] == "volume" else slice_level
        return {**metrics, "hd95_unit": primary["hd95_unit"]}

    def baseline_fields(self, data_cfg: DataConfig) -> dict[str, Any]:
        return {}  # the model grid is `image_size`

    def check_mae_reference(self, widths: Sequence[tuple[str, int]]) -> None:
        return None

    def speed_input(self, data_cfg: DataConfig) -> dict[str, Any]:
        return {"crop_size": None, "unit": "images/s"}

    def speed_where(self, setting: dict[str, Any]) -> tuple[str, str]:
        return f"{setting['image_size']}px", ".1f"
