"""The 3D pipeline (`data.spatial_dims: 3`): whole volumes preprocessed by MONAI transforms
(`ahm.data.volumes`), cached when they fit; training crops drawn around foreground; inference by Gaussian-blended
sliding windows of the training crop; each volume scored as one case on the preprocessed grid, HD95 in mm; a
file's prediction mapped back onto its own grid."""

from __future__ import annotations

import io as _io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ahm.errors import AhmError
from ahm.pipeline.base import Cases, Labelled, Pipeline, label_dtype

if TYPE_CHECKING:
    import torch

    from ahm.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig
    from ahm.data.corpus import Corpus
    from ahm.data.dataset import Arrays
    from ahm.data.layouts import DatasetIndex, Item
    from ahm.data.sample_store import SampleStore
    from ahm.eval.evaluate import LoadedRun
    from ahm.eval.predict_files import Batcher, Job

# Preprocessed volumes are kept in memory up to this many bytes as stored (resampling changes it by the spacing
# ratio): small sets read and resample each volume once, large ones read them again each time.
VOLUME_CACHE_BYTES = 4 << 30


class VolumePipeline(Pipeline):
    spatial_dims = 3

    def check_model_input(self, data_cfg: DataConfig, multiple, why: str) -> None:
        from ahm.data.volumes import check_crop

        check_crop(data_cfg, multiple(), why=why)

    def pretrained_sizes(self, pre_data: DataConfig, metadata: dict, data_cfg: DataConfig) -> tuple[Any, Any, list[str]]:
        # the network's input is the training crop, compared per axis by the backbone
        return tuple(pre_data.crop_size), tuple(data_cfg.crop_size), []

    def checkpoint_meta(self, cfg: FinetuneConfig) -> dict[str, Any]:
        # the 3D contract (ahm.eval.evaluate.load_run)
        return {"spatial_dims": 3, "roi_size": list(self.model_input_size(cfg.data))}

    def summary_fields(self, cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {"spatial_dims": 3, "roi_size": meta["roi_size"], "overlap": cfg.overlap}

    def model_input_size(self, data_cfg: DataConfig) -> tuple[int, ...]:
        return tuple(int(v) for v in data_cfg.crop_size)

    def build_segmenter(self, meta: dict[str, Any], model_cfg: ModelConfig, path: Path) -> torch.nn.Module:
        from ahm.models import build_segmenter

        roi = meta.get("roi_size")
        if not isinstance(roi, (list, tuple)) or len(roi) != 3 or not all(int(s) >= 1 for s in roi):
            raise AhmError(f"{path}: a 3D checkpoint needs roi_size [D, H, W] in its metadata, got {roi!r}")
        roi = tuple(int(s) for s in roi)
        # A cubic crop goes in as one side, the form every backbone accepts; otherwise the tuple (UNETR per axis).
        size = roi[0] if len(set(roi)) == 1 else roi
        return build_segmenter(meta["segmenter"], model_cfg, size, int(meta["in_channels"]), int(meta["num_classes"]),
                               spatial_dims=3)

    # ------------------------------------------------------------------ pretraining samples

    def pretraining_sample(self, item: Item, index: DatasetIndex, data_cfg: DataConfig, channels: int | None,
                           cache: Any = None) -> np.ndarray:
        from ahm.data.volumes import prepare_volume

        # the whole volume resampled and normalised [C, X, Y, Z]; the augmentation crops it
        return prepare_volume(item, index, data_cfg, channels)

    def pretraining_transform(self, cfg: PretrainConfig) -> Callable[[dict], dict] | None:
        from monai.transforms import Compose, RandSpatialCropd

        from ahm.data.volumes import IMAGE, volume_pretrain_augment

        # always a random `data.crop_size` crop (a batch needs one shape); flips, turns and jitter with augment
        if cfg.train.augment:
            return volume_pretrain_augment(cfg.data)
        return Compose([RandSpatialCropd(keys=[IMAGE], roi_size=tuple(cfg.data.crop_size), random_size=False)])

    # ------------------------------------------------------------------ the data side: items, corpus and index

    def read_item(self, item: Item, index: DatasetIndex, data_cfg: DataConfig, labels: bool,
                  cache: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        from ahm.data.volumes import read_volume_item

        return read_volume_item(item, index, data_cfg, labels=labels)  # read whole: no cache of slices

    def from_volume(self, item: Item) -> bool:
        return True

    def sample_shape(self, item: Item, volume_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(volume_shape)  # a whole volume is one sample

    def normalization_rule(self, data_cfg: DataConfig, index: DatasetIndex) -> str:
        from ahm.data.dataset import normalization_rule

        rule = normalization_rule(data_cfg, index)
        # z-scored over non-zero voxels (ahm.data.volumes), not percentile-scaled
        return "mri z-score" if rule in ("mri", "auto") else rule

    def samples_with_replacement(self) -> bool:
        return True  # a random crop of a volume

    def corpus_bytes(self, corpus: Corpus) -> int:
        from ahm.data.volumes import raw_volume_bytes

        # the volumes as stored, from their headers: an estimate, since resampling changes it by the spacing ratio
        return sum(raw_volume_bytes(corpus.entry(k)[1]) for k in range(corpus.n_entries))

    def preload_holder(self, corpus: Corpus) -> Any:
        return [None] * len(corpus)  # volumes of their own shapes

    def cache_ignores(self) -> set[str]:
        # the crop is drawn after the store, but it pads small volumes, so it stays
        return {"path", "skip_bad", "pos_neg_ratio"}

    def sample_store(self, folder: Path, key: str, corpus: Corpus) -> SampleStore:
        from ahm.data.sample_store import VolumeStore

        return VolumeStore(folder, key)  # preprocessed volumes differ in shape: a file each

    def count_samples(self, images: int, slices: int, volumes: int) -> int:
        return volumes

    def samples_word(self) -> str:
        return "volumes"

    def describe_source_counts(self, counts: dict[str, Any]) -> str:
        return f"{counts['volumes']} volume(s)"

    def describe_corpus_counts(self, totals: dict[str, Any]) -> str:
        return f"{totals['samples']} 3D samples (whole volumes)"

    # ------------------------------------------------------------------ fine-tuning data

    def prepare_labelled(self, cfg: FinetuneConfig, index: DatasetIndex, splits: dict[str, list[str]],
                         labelled: list[str]) -> Labelled:
        from ahm.data.volumes import raw_volume_bytes, read_volume_item, volume_dataset

        by_id = index.by_id()
        val_ids = list(splits.get("val", []))
        stored = sum(raw_volume_bytes(by_id[i]) for i in dict.fromkeys(labelled + val_ids))
        cache = stored <= VOLUME_CACHE_BYTES
        train = volume_dataset(index, labelled, cfg.data, labels=True, train=True, seed=cfg.train.seed, cache=cache)
        in_channels = int(train.prepared(0)["image"].shape[0])
        data_cfg = cfg.data.model_copy(update={"channels": in_channels})
        if cfg.data.channels != in_channels:  # the first volume decides the channels; the others are converted to it
            train = volume_dataset(index, labelled, data_cfg, labels=True, train=True, seed=cfg.train.seed,
                                   cache=cache)
        if val_ids:
            val_source = "val"
        else:
            val_ids, val_source = list(labelled), "train (no validation split)"
        val = volume_dataset(index, val_ids, data_cfg, labels=True, train=False, cache=cache)
        if index.label_values:
            found = max(index.label_values) + 1
        else:  # no declared label set: the largest label in the volumes as stored
            found = 1 + max(int(read_volume_item(by_id[i], index, data_cfg, labels=True)[1].max(initial=0))
                            for i in dict.fromkeys(labelled + val_ids))
        subjects = sorted({by_id[i].subject for i in labelled})
        return Labelled(train, val, val_source, found, in_channels, subjects,
                        self.normalization_rule(data_cfg, index))

    def training_set(self, cfg: FinetuneConfig, train: Any, crop_size: int | None, pads_crop: bool) -> Any:
        # the volume dataset draws its crops (and augments them) itself, seeded by (seed, epoch, index) too
        return train

    def before_workers(self, dataset: Any) -> None:
        dataset.preload()  # before the workers fork, so that they share the cached volumes

    # ------------------------------------------------------------------ validation

    def _predict_cases(self, model, cfg: FinetuneConfig, val: Any, indices, device,
                       precision: str = "32-true", progress=None) -> list[tuple]:
        """(index, prediction, target, spacing, id) of the validation volumes `indices`, each predicted whole by
        sliding windows of the training crop on the preprocessed grid."""
        import torch

        from ahm.data.volumes import preprocessed_spacing
        from ahm.eval.scoring import predict_volume_labels

        cases = []
        indices = list(indices)
        for n, i in enumerate(indices):
            if progress is not None:  # minutes per volume on a CPU: say which one
                progress(f"validating volume {n + 1}/{len(indices)}")
            sample = val[i]
            (pred,) = predict_volume_labels(model, [sample["image"].as_tensor()], list(self.model_input_size(cfg.data)),
                                            overlap=cfg.overlap, mode="gaussian", device=device, precision=precision)
            cases.append((i, pred, torch.round(sample["label"].as_tensor()[0]).long().numpy(),
                          preprocessed_spacing(sample), sample["id"]))
        return cases

    @staticmethod
    def _case_scores(cases: list[tuple], num_classes: int, names: list[str] | None = None) -> tuple[dict, dict]:
        """`volume_scores` of predicted volumes, each one case, HD95 in mm from the preprocessed grid's spacing."""
        from ahm.eval.metrics import volume_scores

        _, preds, targets, spacings, ids = (list(column) for column in zip(*cases))
        return volume_scores(preds, targets, num_classes, spacings=spacings, class_names=names, empty="exclude",
                             ids=ids)

    def predict_share(self, model, cfg: FinetuneConfig, val: Any, rank: int, world: int, device, precision: str,
                      batch_size: int, progress=None) -> Any:
        return self._predict_cases(model, cfg, val, range(rank, len(val), world), device, precision, progress)

    def selection_score(self, shares: list[Any], val: Any, num_classes: int, select_by: str) -> float:
        """`selection_score`'s two figures from a `volume_scores` summary: dataset_dice pooled over the volumes,
        case_dice the per-volume mean (empty-empty volumes left out); 0 when undefined."""
        cases = sorted((case for share in shares for case in share), key=lambda case: case[0])
        scores = self._case_scores(cases, num_classes)[0]
        value = scores.get("dataset_dice" if select_by == "dataset_dice" else "dice")
        return float(value) if value is not None else 0.0

    def score_validation(self, model, cfg: FinetuneConfig, val: Any, num_classes: int, device, names: list[str],
                         out_dir: Path, extra: dict[str, Any], batch_size: int) -> dict[str, Any]:
        from ahm.io import write_json

        scores, _ = self._case_scores(self._predict_cases(model, cfg, val, range(len(val)), device), num_classes,
                                      names)
        metrics = {"split": "val", **scores, "level": "volume", **extra}
        write_json(out_dir / "metrics.json", metrics)
        return metrics

    # ------------------------------------------------------------------ evaluation

    def check_overlap(self, overlap: float) -> float:
        from ahm.eval.scoring import check_overlap

        return check_overlap(overlap)

    def evaluation_config(self, loaded: LoadedRun, data_path: Path) -> DataConfig:
        return loaded.cfg.data.model_copy(update={"path": str(data_path), "channels": loaded.in_channels,
                                                  "crop_size": loaded.roi_size})

    def score_split(self, loaded: LoadedRun, index: DatasetIndex, ids: list[str], data_cfg: DataConfig,
                    out_dir: Path, split: str, empty: str, overlap: float, batch_size: int,
                    record: dict[str, Any]) -> dict[str, Any]:
        """Whole preprocessed volumes, sliding windows of the crop, HD95 in mm."""
        from ahm.data.volumes import volume_dataset
        from ahm.eval.metrics import class_names

        dataset = volume_dataset(index, ids, data_cfg, labels=True, train=False)
        cases = _predict_split(loaded, dataset, overlap)
        names = class_names(loaded.num_classes, index.class_names)
        return _write_split(loaded, dataset, cases, names, data_cfg, out_dir, split, empty, overlap,
                            {**record, "skipped_files": list(index.problems)})

    # ------------------------------------------------------------------ prediction of files

    def check_inputs(self, run: LoadedRun, jobs: list[Job], overlap: float) -> None:
        self.check_overlap(overlap)
        flat = next((job.source for job in jobs if not job.volume), None)
        if flat is not None:
            raise AhmError(f"{flat}: a 2D image, but the model in {run.run_dir} was fine-tuned on volumes "
                           f"(spatial_dims 3); give NIfTI, NRRD, MetaImage or DICOM series volumes")

    def predict_file(self, run: LoadedRun, job: Job, batcher: Batcher, overlap: float) -> None:
        from ahm.eval.predict_files import predict_volume

        batcher.seconds += predict_volume(run, job, overlap)

    def prediction_fields(self, run: LoadedRun, volumes: int, total_s: float, overlap: float) -> dict[str, Any]:
        return {"spatial_dims": 3, "volumes": volumes, "volumes_per_s": volumes / total_s if total_s > 0 else 0.0,
                "sliding_window": {"roi_size": list(run.roi_size or ()), "overlap": float(overlap),
                                   "mode": "gaussian"}}

    # ------------------------------------------------------------------ reports and benches

    case_noun = "volume"
    trained_on = "volumes (3D)"
    report_levels = (("volume_level", "volumes, scored in 3D"), ("slice_level", "2D images (slices)"))

    def drawn_views(self, shape: Sequence[int]) -> list[tuple[str, tuple[Any, ...]]]:
        # the three orthogonal slices through the volume's centre
        d, h, w = (s // 2 for s in shape)
        return [(f"axis 0 = {d}", (d, slice(None), slice(None))), (f"axis 1 = {h}", (slice(None), h, slice(None))),
                (f"axis 2 = {w}", (slice(None), slice(None), w))]

    def drawn_samples(self, index: DatasetIndex, ids: list[str], data_cfg: DataConfig) -> Arrays:
        """Each volume preprocessed as pretraining reads it, cut to its centre crop of `data.crop_size` (the model's
        input), as `Arrays` [N, C, D, H, W]."""
        import torch
        from monai.transforms import CenterSpatialCrop

        from ahm.data.dataset import Arrays
        from ahm.data.volumes import prepare_volume

        by_id = index.by_id()
        crop = CenterSpatialCrop(roi_size=tuple(data_cfg.crop_size))
        images, items = [], []
        for item_id in ids:
            item = by_id[item_id]
            # the preprocessing pads every volume to at least the crop, so the centre crop is always whole
            images.append(np.asarray(torch.as_tensor(crop(torch.from_numpy(prepare_volume(item, index, data_cfg))))))
            items.append(item)
        stacked = np.ascontiguousarray(np.stack(images), dtype=np.float32)
        return Arrays(images=stacked, labels=None, ids=list(ids), original_hw=[tuple(i.shape[1:]) for i in images],
                      items=items)

    def baseline_cases(self, index: DatasetIndex, ids: list[str], data_cfg: DataConfig) -> Cases:
        """Whole preprocessed volumes (resampled, normalised per modality, zero-padded to the crop)."""
        from ahm.data.volumes import preprocessed_spacing, volume_dataset
        from ahm.eval.scoring import preprocessed

        dataset = volume_dataset(index, list(ids), data_cfg, labels=True, train=False)
        images, labels, spacings = [], [], []
        for i in range(len(dataset)):
            sample = preprocessed(dataset.__getitem__, i)
            images.append(sample["image"].as_tensor().numpy().astype(np.float32))
            labels.append(np.rint(sample["label"].as_tensor().numpy()[0]).astype(np.int64))
            spacings.append(preprocessed_spacing(sample))
        return Cases([item.id for item in dataset.items], images, labels, False, spacings)

    def case_scores(self, cases: Cases, preds: list[np.ndarray], num_classes: int, empty: str) -> dict[str, Any]:
        from ahm.eval.metrics import volume_scores

        summary, _ = volume_scores(preds, cases.labels, num_classes, cases.source, empty=empty, ids=cases.ids)
        return {**summary, "level": "volume"}

    def baseline_fields(self, data_cfg: DataConfig) -> dict[str, Any]:
        from ahm.eval.scoring import volume_grid_description

        return {"spatial_dims": 3, "grid": volume_grid_description(data_cfg)}

    def check_mae_reference(self, widths: Sequence[tuple[str, int]]) -> None:
        # MONAI's 3D sin-cos tables (encoder and decoder) split each width into six parts; ours take any width
        for option, width in widths:
            if width % 6:
                raise AhmError(f"{option}: width {width}; MONAI's 3D MaskedAutoEncoderViT (the reference) needs "
                               f"encoder and decoder widths divisible by 6 (e.g. {width // 6 * 6 or 6})")

    def speed_input(self, data_cfg: DataConfig) -> dict[str, Any]:
        return {"crop_size": list(data_cfg.crop_size), "unit": "volumes/s"}

    def speed_where(self, setting: dict[str, Any]) -> tuple[str, str]:
        # a 3D step on a CPU takes seconds: two decimals
        return f"3D crop {'x'.join(str(v) for v in setting['input_shape'])}", ".2f"


def _predict_split(loaded: LoadedRun, dataset, overlap: float) -> dict[str, list]:
    """Each volume of `dataset` predicted whole: predictions, labels, spacings, shapes and the drawn slices."""
    from ahm.data.volumes import preprocessed_spacing
    from ahm.eval.render import display_slice
    from ahm.eval.scoring import predict_volume_labels, preprocessed

    dtype = label_dtype(loaded.num_classes)
    cases: dict[str, list] = {"preds": [], "labels": [], "spacings": [], "shapes": [], "shown": []}
    for i in range(len(dataset)):
        sample = preprocessed(dataset.__getitem__, i)
        image = sample["image"]
        label = np.rint(sample["label"].as_tensor().numpy()[0])
        if label.size and int(label.max()) >= loaded.num_classes:
            raise AhmError(f"{dataset.items[i].mask}: ground-truth labels go up to {int(label.max())} but the model "
                           f"predicts {loaded.num_classes} classes (0..{loaded.num_classes - 1}); was it trained on "
                           f"another label set?")
        label = label.astype(dtype)
        pred = predict_volume_labels(loaded.model, [image.as_tensor()], loaded.roi_size, overlap=overlap,
                                     device=loaded.device, precision=loaded.precision)[0].astype(dtype)
        cases["preds"].append(pred)
        cases["labels"].append(label)
        cases["spacings"].append(preprocessed_spacing(sample))
        cases["shapes"].append(tuple(int(s) for s in label.shape))
        cases["shown"].append(display_slice(image.as_tensor().numpy(), label, pred))
    return cases


def _write_split(loaded: LoadedRun, dataset, cases: dict[str, list], names: list[str], data_cfg: DataConfig,
                 out_dir: Path, split: str, empty: str, overlap: float, record: dict[str, Any]) -> dict[str, Any]:
    from ahm.eval.metrics import EMPTY_DESCRIPTION, case_means, volume_scores
    from ahm.eval.render import per_volume_csv
    from ahm.eval.scoring import LEVEL_KEYS, inference_setting, volume_cases, volume_grid_description
    from ahm.io import write_bytes, write_json, write_text

    preds, labels, spacings, shapes = cases["preds"], cases["labels"], cases["spacings"], cases["shapes"]
    item_ids = [item.id for item in dataset.items]
    volume_level, per_case = volume_scores(preds, labels, loaded.num_classes, spacings, names, empty, ids=item_ids)
    for row, shape, spacing in zip(volume_level["per_volume"], shapes, spacings):
        row.update({"shape": list(shape), "spacing_mm": list(spacing)})
    means = case_means(per_case)
    metrics: dict[str, Any] = {"level": "volume", **{key: volume_level.get(key) for key in LEVEL_KEYS}}
    metrics.update({
        "n_images": len(item_ids), "n_volumes": len(item_ids), "split": split, "class_names": names,
        "spatial_dims": 3, "grid": volume_grid_description(data_cfg), "hd95_unit": volume_level["hd95_unit"],
        "empty_cases": empty, "empty_masks": EMPTY_DESCRIPTION[empty],
        "sliding_window": {"roi_size": list(loaded.roi_size), "overlap": float(overlap), "mode": "gaussian"},
        "inference": inference_setting(loaded), "per_case_csv": "per_volume.csv", "volume_level": volume_level,
        **record,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "per_volume.csv", per_volume_csv(item_ids, [item.subject for item in dataset.items],
                                                           shapes, spacings, per_case, means, names))
    has_fg = np.array([bool((lab > 0).any()) for lab in labels], dtype=bool)
    shown = volume_cases(cases["shown"], item_ids, has_fg, np.nan_to_num(means["dice"], nan=0.0))
    buf = _io.BytesIO()
    np.savez_compressed(buf, **shown)
    write_bytes(out_dir / "cases.npz", buf.getvalue())
    write_json(out_dir / "metrics.json", metrics)
    return metrics
