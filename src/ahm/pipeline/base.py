"""What training, evaluation and prediction ask of the data path; `SlicePipeline` (2D) and `VolumePipeline` (3D)
answer it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ahm.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig
    from ahm.data.corpus import Corpus
    from ahm.data.dataset import Arrays
    from ahm.data.layouts import DatasetIndex, Item
    from ahm.data.sample_store import SampleStore
    from ahm.eval.evaluate import LoadedRun
    from ahm.eval.predict_files import Batcher, Job


@dataclass
class Labelled:
    """The labelled data of a fine-tuning run as the pipeline prepared it."""

    train: Any  # 2D: `ahm.data.Arrays` on the model grid; 3D: a `VolumeDataset` of training crops
    val: Any  # 2D: `Arrays`; 3D: a `VolumeDataset` of whole preprocessed volumes
    val_source: str  # "val", or "train (no validation split)" when the split is empty
    found_classes: int  # 1 + the largest label value declared or seen
    in_channels: int
    subjects: list[str]  # of the labelled training cases
    normalization: str  # `Pipeline.normalization_rule` of the data


@dataclass
class Cases:
    """A labelled split as `ahm evaluate` scores it, for predictions made without a model (`ahm bench baseline`)."""

    ids: list[str]
    images: list[np.ndarray]  # each case [C, *spatial], float32
    labels: list[np.ndarray]  # each case [*spatial], integer
    unit: bool  # the intensities lie in [0, 1] already (2D: the model grid); else unbounded (3D: z-scored MRI)
    source: Any  # what `Pipeline.case_scores` scores with: 2D the `Arrays`, 3D the spacings in mm


class Pipeline(ABC):
    """One dimension's data path, from labelled files to scores and written masks."""

    spatial_dims: int

    # ------------------------------------------------------------------ the model's input and the run record

    @abstractmethod
    def check_model_input(self, data_cfg: DataConfig, multiple: Callable[[], int | Sequence[int]],
                          why: str) -> None:
        """Refuse a model input the backbone cannot take (`multiple()`: what each side must be a multiple of)."""

    @abstractmethod
    def pretrained_sizes(self, pre_data: DataConfig, metadata: dict, data_cfg: DataConfig) -> tuple[Any, Any, list[str]]:
        """(pretrained input size, this run's, mismatches in words) for comparing an encoder with its fine-tuning."""

    @abstractmethod
    def checkpoint_meta(self, cfg: FinetuneConfig) -> dict[str, Any]:
        """What a fine-tuning checkpoint records beyond the common meta, for `load_run` to rebuild the model."""

    @abstractmethod
    def summary_fields(self, cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, Any]:
        """What summary.json records beyond the common fields."""

    @abstractmethod
    def model_input_size(self, data_cfg: DataConfig) -> int | tuple[int, ...]:
        """What a model is built for: the square image side in 2D, the training crop in 3D."""

    @abstractmethod
    def build_segmenter(self, meta: dict[str, Any], model_cfg: ModelConfig, path: Path) -> torch.nn.Module:
        """The segmenter a checkpoint's meta describes (its weights not loaded)."""

    # ------------------------------------------------------------------ pretraining samples

    @abstractmethod
    def pretraining_sample(self, item: Item, index: DatasetIndex, data_cfg: DataConfig, channels: int | None,
                           cache: Any = None) -> np.ndarray:
        """One pretraining sample before augmentation, as float32 [C, *spatial]."""

    @abstractmethod
    def pretraining_transform(self, cfg: PretrainConfig) -> Callable[[dict], dict] | None:
        """The per-sample augmentation of pretraining (None: none)."""

    # ------------------------------------------------------------------ the data side: items, corpus and index

    @abstractmethod
    def read_item(self, item: Item, index: DatasetIndex, data_cfg: DataConfig, labels: bool,
                  cache: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """An item as stored, checked as training reads it: image [C, *spatial] float32 and its mask (or None)."""

    @abstractmethod
    def from_volume(self, item: Item) -> bool:
        """Whether `item` is read from a volume file (the whole volume, or one of its slices)."""

    @abstractmethod
    def sample_shape(self, item: Item, volume_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial shape of the sample `item` gives, from that of the volume it is read from."""

    @abstractmethod
    def normalization_rule(self, data_cfg: DataConfig, index: DatasetIndex) -> str:
        """The intensity normalisation of the data as one comparable string, kept with pretrained weights."""

    @abstractmethod
    def samples_with_replacement(self) -> bool:
        """Whether a pretraining sample is a random crop of its entry, so that an entry may give several samples
        to one batch."""

    @abstractmethod
    def corpus_bytes(self, corpus: Corpus) -> int:
        """Bytes the preprocessed corpus would take in memory (what `preload: auto` decides by)."""

    @abstractmethod
    def preload_holder(self, corpus: Corpus) -> Any:
        """An empty in-memory holder of the corpus's samples, indexed by entry, that `preload` fills."""

    @abstractmethod
    def cache_ignores(self) -> set[str]:
        """DataConfig fields left out of a `--cache` store's digest: they do not change a preprocessed sample."""

    @abstractmethod
    def sample_store(self, folder: Path, key: str, corpus: Corpus) -> SampleStore:
        """The on-disk store of the corpus's preprocessed samples in `folder`, named by the digest `key`."""

    @abstractmethod
    def count_samples(self, images: int, slices: int, volumes: int) -> int:
        """How many pretraining samples an index holds of its `images` 2D files, `slices` slices and `volumes`
        readable volume files."""

    @abstractmethod
    def samples_word(self) -> str:
        """What a sample is, in the plural, for messages ("images", "volumes")."""

    @abstractmethod
    def describe_source_counts(self, counts: dict[str, Any]) -> str:
        """A source's files of an `ahm data index` manifest (its "index" counts), in words."""

    @abstractmethod
    def describe_corpus_counts(self, totals: dict[str, Any]) -> str:
        """The samples of an `ahm data index` manifest (its "totals"), in words."""

    # ------------------------------------------------------------------ fine-tuning data

    @abstractmethod
    def prepare_labelled(self, cfg: FinetuneConfig, index: DatasetIndex, splits: dict[str, list[str]],
                         labelled: list[str]) -> Labelled:
        """Read the labelled training cases and the validation split, ready for training and validation."""

    @abstractmethod
    def training_set(self, cfg: FinetuneConfig, train: Any, crop_size: int | None, pads_crop: bool) -> Any:
        """The dataset of training samples (augmented, seeded by (seed, epoch, index)) over `train`."""

    def before_workers(self, dataset: Any) -> None:
        """Called before loader workers fork, to fill what they should share (nothing by default)."""

    # ------------------------------------------------------------------ validation

    @abstractmethod
    def predict_share(self, model: torch.nn.Module, cfg: FinetuneConfig, val: Any, rank: int, world: int,
                      device: torch.device, precision: str, batch_size: int,
                      progress: Callable[[str], None] | None = None) -> Any:
        """This rank's predictions of every `world`-th validation case from `rank` on, in a form to gather;
        `progress` is told what is being predicted where that takes long (whole volumes)."""

    @abstractmethod
    def selection_score(self, shares: list[Any], val: Any, num_classes: int, select_by: str) -> float:
        """The best-checkpoint figure of the gathered shares (the one-process figure exactly)."""

    @abstractmethod
    def score_validation(self, model: torch.nn.Module, cfg: FinetuneConfig, val: Any, num_classes: int,
                         device: torch.device, names: list[str], out_dir: Path, extra: dict[str, Any],
                         batch_size: int) -> dict[str, Any]:
        """Score the validation split into `out_dir` (metrics.json); returns the metrics."""

    # ------------------------------------------------------------------ evaluation

    def check_overlap(self, overlap: float) -> float:
        """The sliding-window overlap, refused where this pipeline uses it and it is out of range."""
        return overlap

    @abstractmethod
    def evaluation_config(self, loaded: LoadedRun, data_path: Path) -> DataConfig:
        """The data settings a split is read with for `loaded`: its own, on `data_path`, with its model input."""

    @abstractmethod
    def score_split(self, loaded: LoadedRun, index: DatasetIndex, ids: list[str], data_cfg: DataConfig,
                    out_dir: Path, split: str, empty: str, overlap: float, batch_size: int,
                    record: dict[str, Any]) -> dict[str, Any]:
        """Predict and score the cases `ids`, writing metrics.json, the per-case CSV and cases.npz into `out_dir`;
        `record` (data, checkpoint, epoch) goes into metrics.json."""

    # ------------------------------------------------------------------ prediction of files

    def check_inputs(self, run: LoadedRun, jobs: list[Job], overlap: float) -> None:
        """Refuse, before anything is written, inputs or options this pipeline cannot predict."""

    @abstractmethod
    def predict_file(self, run: LoadedRun, job: Job, batcher: Batcher, overlap: float) -> None:
        """Segment one input file and write its mask (and overlay) back onto the input's own grid."""

    def prediction_fields(self, run: LoadedRun, volumes: int, total_s: float, overlap: float) -> dict[str, Any]:
        """What `ahm predict` reports beyond the common counts (nothing by default)."""
        return {}

    # ------------------------------------------------------------------ reports and benches

    case_noun: str  # one scored case in words: "image" (2D) or "volume" (3D)
    trained_on: str  # what a run is fine-tuned on, in words: "2D images" or "volumes (3D)"
    # (metrics.json key, what each case of that level is) of the levels a report shows, the volume level first
    report_levels: tuple[tuple[str, str], ...]

    @abstractmethod
    def drawn_views(self, shape: Sequence[int]) -> list[tuple[str, tuple[Any, ...]]]:
        """(name, index over the spatial axes) of each picture `ahm visualize` draws of a sample of `shape`."""

    @abstractmethod
    def drawn_samples(self, index: DatasetIndex, ids: list[str], data_cfg: DataConfig) -> Arrays:
        """The unlabelled samples `ids` as the pretrained model takes them, for `ahm visualize` to draw."""

    @abstractmethod
    def baseline_cases(self, index: DatasetIndex, ids: list[str], data_cfg: DataConfig) -> Cases:
        """The labelled cases `ids` on the grid `ahm evaluate` scores them on."""

    @abstractmethod
    def case_scores(self, cases: Cases, preds: list[np.ndarray], num_classes: int, empty: str) -> dict[str, Any]:
        """`ahm evaluate`'s figures of `preds` (one per case) at its primary level, with `level` and `hd95_unit`."""

    @abstractmethod
    def baseline_fields(self, data_cfg: DataConfig) -> dict[str, Any]:
        """What the intensity baseline's document records of the grid beyond `image_size`."""

    @abstractmethod
    def check_mae_reference(self, widths: Sequence[tuple[str, int]]) -> None:
        """Refuse (option, width) pairs MONAI's MaskedAutoEncoderViT of this dimension cannot embed (the reference
        of `ahm bench speed`)."""

    @abstractmethod
    def speed_input(self, data_cfg: DataConfig) -> dict[str, Any]:
        """`ahm bench speed`'s setting fields of the input: `crop_size` (None in 2D) and the rate's `unit`."""

    @abstractmethod
    def speed_where(self, setting: dict[str, Any]) -> tuple[str, str]:
        """(the input in words, the format of a rate) for `ahm bench speed`'s table of a recorded `setting`."""


def label_dtype(num_classes: int) -> type:
    """The smallest integer type that holds the classes: a split's label maps are all held until scoring."""
    return np.uint8 if num_classes <= 256 else np.int16 if num_classes < 2**15 else np.int32
