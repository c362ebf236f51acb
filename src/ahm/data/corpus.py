"""The pretraining corpus: one or more sources, listed from headers, read lazily by a torch DataLoader.

A corpus is any number of dataset folders (any layout, labelled or not) or a manifest (`corpus.json`). Listing it
reads headers only (a volume's slice count from its header); pixels are read when a sample is drawn, by
`prepare_item` (the path in-memory loading uses too), in DataLoader worker processes ahead of the step. Memory
therefore does not grow with the corpus: a worker holds the last few volumes it read (`VolumeSlices`: a window's
worth, within a byte budget), not the corpus.

Order and determinism: an epoch's order is a function of (seed, epoch) only (`Corpus.epoch_order`): sources are
drawn by weight, then volumes are shuffled and grouped into windows of a few volumes whose slices are shuffled
together (so a worker reads each volume about once an epoch instead of once per slice; 2D files form windows of
`WINDOW_ITEMS`), and augmentation is seeded by (seed, epoch, position). The batches of step s are the same in
any number of workers and after a resume mid-epoch; under DDP each rank takes its own disjoint share of every
global batch (`StepBatches`).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ahm.config import DataConfig, PretrainConfig, SourceConfig
from ahm.data.layouts import DatasetIndex, Item
from ahm.errors import AhmError

if TYPE_CHECKING:
    from ahm.pipeline.base import Pipeline

WINDOW_ITEMS = 2048  # slots shuffled together: a window of 2D files, or the slices of a few volumes
WINDOW_VOLUMES = 8  # volumes per window at most (each worker keeps this many raw volumes, within a byte budget)
VOLUME_BUDGET_BYTES = 1 << 29  # raw volumes a loader worker keeps (LRU; at least the one it reads)
PRELOAD_BYTES = 1 << 30  # preload: "auto" reads a corpus into memory when its preprocessed size is at most this
MAX_SUBSTITUTES = 8  # with skip_bad, how many following entries may stand in for an unreadable one


@dataclass
class CorpusSource:
    """One listed source: its index, the item ids it contributes, and how to read them."""

    spec: SourceConfig
    index: DatasetIndex
    ids: list[str]
    data_cfg: DataConfig
    start: int = 0  # its first entry in the corpus

    @property
    def stop(self) -> int:
        return self.start + len(self.ids)


def default_workers() -> int:
    """Half the CPU cores, at most 4 (the other half computes the step on a CPU machine)."""
    return max(0, min(4, (os.cpu_count() or 1) // 2))


def _source_data_cfg(cfg: PretrainConfig, spec: SourceConfig) -> DataConfig:
    update: dict[str, Any] = {"path": spec.path}
    for key in ("layout", "modality", "ct_window"):
        value = getattr(spec, key)
        if value is not None:
            update[key] = value
    return cfg.data.model_copy(update=update)


class Corpus:
    """The listed corpus: entries (source, item) in a fixed order, with the epoch order and sample reading."""

    def __init__(self, sources: list[CorpusSource], channels: int, image_size: int, spatial_dims: int = 2) -> None:
        self.sources = sources
        self.channels = channels
        self.image_size = image_size
        # 3: entries are whole volumes, preprocessed to varying shapes and cropped by the augmentation. What
        # differs between the two (a sample, its augmentation, its size in memory, the holder `preload` fills,
        # the `--cache` store and its digest) is the pipeline's (`pipeline`).
        self.spatial_dims = spatial_dims
        start = 0
        for source in sources:
            source.start = start
            start += len(source.ids)
        self._by_id = [source.index.by_id() for source in sources]
        self.n_entries = start
        self.epoch_size = sum(self._draws(s) for s in sources)
        self._keys = [self._group_key(k) for k in range(self.n_entries)]
        self.members: dict[str, list[int]] = {}
        for k, key in enumerate(self._keys):
            self.members.setdefault(key, []).append(k)

    @staticmethod
    def _draws(source: CorpusSource) -> int:
        whole, frac = divmod(source.spec.weight, 1.0)
        return int(whole) * len(source.ids) + int(round(frac * len(source.ids)))

    def __len__(self) -> int:
        return self.n_entries

    @property
    def pipeline(self) -> Pipeline:
        """The data path of the corpus's `spatial_dims`."""
        from ahm.pipeline import for_dims

        return for_dims(self.spatial_dims)

    def entry(self, k: int) -> tuple[CorpusSource, Item]:
        for s, source in enumerate(self.sources):
            if source.start <= k < source.stop:
                return source, self._by_id[s][source.ids[k - source.start]]
        raise IndexError(k)

    def group_key(self, k: int) -> str:
        """Entries that share a volume share a key (read together); a 2D file is its own group."""
        return self._keys[k]

    def is_volume(self, k: int) -> bool:
        return self.entry(k)[1].slice is not None

    def _group_key(self, k: int) -> str:
        source, item = self.entry(k)
        return f"{source.start}:{item.image}" if item.slice is not None else f"{source.start}:{item.id}"

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """The entries of one epoch in training order (length `epoch_size`): a function of (seed, epoch) only."""
        g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)
        slots: list[int] = []
        for source in self.sources:
            base = list(range(source.start, source.stop))
            whole, frac = divmod(source.spec.weight, 1.0)
            slots += base * int(whole)
            extra = int(round(frac * len(base)))
            if extra:
                pick = torch.randperm(len(base), generator=g)[:extra].tolist()
                slots += [base[i] for i in sorted(pick)]
        groups: dict[str, list[int]] = {}
        for k in slots:
            groups.setdefault(self._keys[k], []).append(k)
        keys = list(groups)
        order: list[int] = []
        window: list[int] = []
        volumes = 0
        for gi in torch.randperm(len(keys), generator=g).tolist():
            members = groups[keys[gi]]
            window += members
            volumes += self.is_volume(members[0])  # a 2D file drawn twice (weight 2) is still one file
            if len(window) >= WINDOW_ITEMS or volumes >= WINDOW_VOLUMES:
                order += [window[i] for i in torch.randperm(len(window), generator=g).tolist()]
                window, volumes = [], 0
        order += [window[i] for i in torch.randperm(len(window), generator=g).tolist()]
        return order

    def normalization(self) -> str:
        """The intensity rule of the corpus (`normalization_rule`), kept with the pretrained weights; sources
        normalised differently are joined with " + " (a fine-tuning set then matches none of them alone)."""
        from ahm.pipeline import for_dims

        rules = list(dict.fromkeys(for_dims(s.data_cfg.spatial_dims).normalization_rule(s.data_cfg, s.index)
                                   for s in self.sources))
        return " + ".join(rules)

    def nbytes(self) -> int:
        """Memory the preprocessed corpus would take (float32 on the model grid; 3D: the volumes as stored, from
        their headers, an estimate since resampling changes the size by the spacing ratio)."""
        return self.pipeline.corpus_bytes(self)

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        return epoch_rounds(self, batch_size, world_size)[1]

    @property
    def with_replacement(self) -> bool:
        """3D: a sample is a random crop of a volume, so a volume may give several crops to one batch."""
        return self.pipeline.samples_with_replacement()


def open_corpus(cfg: PretrainConfig, log: Callable[[str], None] | None = None) -> Corpus:
    """List the corpus of a pretraining config (headers only) and check its channels agree."""
    from ahm.data.layouts import open_dataset
    from ahm.data.splits import make_splits

    specs = list(cfg.sources) or ([SourceConfig(path=cfg.data.path)] if cfg.data.path else [])
    if not specs:
        raise AhmError("DATA: no dataset path given")
    sources: list[CorpusSource] = []
    channels: dict[int, str] = {}
    for spec in specs:
        if not Path(spec.path).exists():
            raise AhmError(f"{spec.path}: dataset folder not found")
        data_cfg = _source_data_cfg(cfg, spec)
        index = open_dataset(spec.path, data_cfg)
        all_splits = spec.all_splits if spec.all_splits is not None else cfg.all_splits
        if index.has_labels and not all_splits:
            ids = list(make_splits(index, data_cfg)["train"])
        else:
            ids = [item.id for item in index.items]
        if not ids:
            raise AhmError(f"{spec.path}: no pretraining images in this source (its training split is empty)")
        source = CorpusSource(spec, index, ids, data_cfg)
        # One image per source tells its channels (the corpus must agree unless data.channels unifies them).
        first = index.by_id()[ids[0]]
        image = prepare_sample(first, index, data_cfg, cfg.data.channels)
        channels.setdefault(int(image.shape[0]), spec.path)
        sources.append(source)
    if len(channels) > 1:
        shown = "; ".join(f"{where}: {c} channel(s)" for c, where in channels.items())
        raise AhmError(f"the corpus mixes channel counts ({shown}); set data.channels to convert them")
    corpus = Corpus(sources, next(iter(channels)), cfg.data.image_size, cfg.data.spatial_dims)
    if corpus.epoch_size == 0:
        raise AhmError("the corpus is empty")
    return corpus


def prepare_sample(item: Item, index: DatasetIndex, data_cfg: DataConfig, channels: int | None,
                   cache: Any = None) -> np.ndarray:
    """One pretraining sample before augmentation: a 2D item on the model grid [C, S, S] (`prepare_item`), or a
    whole 3D volume resampled and normalised [C, X, Y, Z] (`prepare_volume`; the augmentation crops it), as the
    item's own pipeline prepares it."""
    from ahm.pipeline import for_dims

    return for_dims(item.spatial_dims).pretraining_sample(item, index, data_cfg, channels, cache)


class VolumeSlices:
    """A worker's small cache: the last volumes it read, raw, within a byte budget (LRU, at least one), so that a
    slice is preprocessed when it is drawn and a volume is read about once per window of the epoch order."""

    def __init__(self, budget_bytes: int = VOLUME_BUDGET_BYTES, capacity: int = WINDOW_VOLUMES) -> None:
        self.budget, self.capacity = budget_bytes, capacity
        self._held: OrderedDict[str, np.ndarray] = OrderedDict()

    # The `VolumeCache` interface `read_item` reads volumes through.
    def get(self, path: Path, label: bool) -> np.ndarray:
        from ahm.data.formats import read_label_volume, read_volume

        key = f"{'label' if label else 'image'}:{path}"
        if key not in self._held:
            data = (read_label_volume(path) if label else read_volume(path)).data
            while self._held and (len(self._held) >= self.capacity
                                  or sum(v.nbytes for v in self._held.values()) + data.nbytes > self.budget):
                self._held.popitem(last=False)
            self._held[key] = data
        self._held.move_to_end(key)
        return self._held[key]

    def sample(self, corpus: Corpus, k: int) -> np.ndarray:
        source, item = corpus.entry(k)
        cache = self if item.slice is not None else None
        return prepare_sample(item, source.index, source.data_cfg, corpus.channels, cache)


class SampleCache:
    """An on-disk store of preprocessed samples (`--cache DIR`), so that after the first epoch a sample is a copy
    from the page cache instead of a decode, a normalisation and a resize. The corpus's pipeline chooses the
    store (`ahm.data.sample_store`): in 2D one memory-mapped float32 array of every entry on the model grid and a
    byte per entry saying it is filled (not MONAI's PersistentDataset, which keeps one pickle file per sample,
    20,000 files for a 20,000-slice corpus, and cannot be shared by memory map between loader workers); in 3D
    one .npy file per volume.

    The store is named by a digest of what decides the samples (each source's path, listing and file sizes and
    times, the preprocessing settings): a changed corpus gets a new store, never stale samples. Entries are
    written by whichever worker reads them first (a sample half written when a run is killed is simply computed
    again)."""

    def __init__(self, folder: Path, corpus: Corpus) -> None:
        import hashlib

        from ahm.pipeline import for_dims

        folder = Path(folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AhmError(f"--cache {folder}: cannot create the cache folder ({exc.strerror or exc})") from exc
        digest = hashlib.sha256()
        digest.update(json.dumps([corpus.channels, corpus.image_size]).encode())
        for source in corpus.sources:
            ignored = for_dims(source.data_cfg.spatial_dims).cache_ignores()
            digest.update(source.data_cfg.model_dump_json(exclude=ignored).encode())
            digest.update(str(Path(source.spec.path).resolve()).encode())
            for file in sorted({str(source.index.by_id()[i].image) for i in source.ids}):
                st = os.stat(file)
                digest.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
            digest.update("\n".join(source.ids).encode())
        self.key = digest.hexdigest()[:16]
        self.store = corpus.pipeline.sample_store(folder, self.key, corpus)

    @property
    def data_path(self) -> Path:
        """Where the samples are: the memory-mapped file (2D) or the folder of .npy files (3D)."""
        return self.store.path

    def get(self, k: int) -> np.ndarray | None:
        return self.store.get(k)

    def put(self, k: int, image: np.ndarray) -> None:
        self.store.put(k, image)

    def filled(self) -> int:
        return self.store.filled()


class CorpusDataset(torch.utils.data.Dataset):
    """Samples keyed by (epoch, position in the epoch, entry): `{"image": [C,S,S], "entry": k}`, augmented with a
    seed of (seed, epoch, position) so that they do not depend on the worker that reads them."""

    def __init__(self, corpus: Corpus, transform: Callable[[dict], dict] | None, seed: int,
                 cache: SampleCache | None = None) -> None:
        self.corpus = corpus
        self.cache = cache
        self.transform = transform
        self.seed = int(seed)
        self._slices: VolumeSlices | None = None
        self._preloaded: torch.Tensor | list | None = None
        self._failed: dict[str, str] = {}  # group key -> the problem, for files found unreadable

    def __len__(self) -> int:
        return len(self.corpus)

    def preload(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Read the whole corpus into memory once (the fast path for a corpus that fits; workers forked after
        this share it). The samples are the same as streamed ones: both come from `prepare_item`. Returns the
        problems of files skipped with data.skip_bad; without it the first unreadable file raises."""
        images = self.corpus.pipeline.preload_holder(self.corpus)  # 2D one tensor; 3D a list (shapes differ)
        problems: list[str] = []
        for k in range(len(self.corpus)):
            image, j, found, failed = self.read(k)
            problems += [p for p in found if p not in problems]
            if failed:
                raise AhmError(found[-1])
            images[k] = image  # with skip_bad, a stand-in's image for an unreadable entry
            if progress is not None:
                progress(k + 1, len(self.corpus))
        self._preloaded, self._slices = images, None
        return problems

    @property
    def preloaded(self) -> bool:
        return self._preloaded is not None

    def image(self, k: int) -> torch.Tensor:
        if self._preloaded is not None:
            return self._preloaded[k]
        if self.cache is not None:
            stored = self.cache.get(k)
            if stored is not None:
                return torch.from_numpy(stored)
        if self._slices is None:
            self._slices = VolumeSlices()
        image = np.ascontiguousarray(self._slices.sample(self.corpus, k))
        if self.cache is not None:
            self.cache.put(k, image)
        return torch.from_numpy(image)

    def read(self, k: int) -> tuple[torch.Tensor | None, int, list[str], bool]:
        """(image, entry read, problems, failed): with data.skip_bad an unreadable entry is replaced by the first
        readable one of the next files (never by another slice of a volume that failed: a volume is read whole,
        so its other slices would fail too; a failed file is remembered and not read again by this process);
        without skip_bad, or when none of the next few files reads, failed."""
        problems: list[str] = []
        skip = self.corpus.sources[0].data_cfg.skip_bad
        j = k
        for _ in range(MAX_SUBSTITUTES + 1 if skip else 1):
            key = self.corpus.group_key(j)
            if key not in self._failed:
                try:
                    return self.image(j).clone(), j, problems, False
                except AhmError as exc:
                    self._failed[key] = str(exc)
            problems.append(self._failed[key])
            j = (self.corpus.members[key][-1] + 1) % len(self.corpus)  # the first entry of the next file
        return None, k, problems, True

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        """A bad file found while streaming is reported with the sample (see `read`), for the loop to count
        or to stop on with one line."""
        from ahm.data.dataset import apply_seeded, plain_tensor, sample_seed

        epoch, position, k = key
        image, j, problems, failed = self.read(k)
        if failed:
            return {"image": None, "entry": k, "problems": problems, "error": True}
        sample: dict[str, Any] = {"image": image}
        if self.transform is not None:
            sample = apply_seeded(self.transform, sample, sample_seed(self.seed, epoch, position))
        return {"image": plain_tensor(sample["image"]).float().contiguous(), "entry": j, "problems": problems,
                "error": False}


class EpochPlan(Protocol):
    """What `StepBatches` plans from: each epoch's order of entries, a function of (seed, epoch) only (a `Corpus`,
    or `ahm.train.loop.ShuffledItems` for fine-tuning's labelled images)."""

    epoch_size: int

    def epoch_order(self, epoch: int, seed: int) -> list[int]: ...

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int: ...


def epoch_rounds(plan: EpochPlan, batch_size: int, world_size: int = 1) -> tuple[int, int]:
    """(rounds of the plan's order per epoch, steps per epoch). One round, unless the plan draws with replacement
    (`with_replacement`: 3D crops from volumes, as nnU-Net samples them) and holds fewer entries than one global
    batch: its orders are then chained until they fill one, so a few volumes still make whole batches."""
    per_step = batch_size * world_size
    rounds = 1
    if getattr(plan, "with_replacement", False) and 0 < plan.epoch_size < per_step:
        rounds = -(-per_step // plan.epoch_size)
    return rounds, (plan.epoch_size * rounds) // per_step


class StepBatches(torch.utils.data.Sampler):
    """The batches of steps `start .. stop - 1` for one rank: keys (epoch, position, entry) of `batch_size`
    samples, this rank's share of the global batch of `batch_size * world_size`, in the epoch order of `plan`."""

    def __init__(self, plan: EpochPlan, seed: int, batch_size: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.plan, self.seed, self.batch_size = plan, seed, batch_size
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self.rounds, self.per_epoch = epoch_rounds(plan, batch_size, world_size)
        if self.per_epoch < 1:
            what = "the corpus has" if isinstance(plan, Corpus) else "there are"
            raise AhmError(f"{what} {plan.epoch_size} images an epoch, fewer than --batch-size "
                           f"{batch_size}" + (f" x {world_size} devices" if world_size > 1 else ""))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order: list[int] = []
        order_epoch = -1
        per_step = self.batch_size * self.world_size
        for step in range(self.start, self.stop):
            epoch, within = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                order = [k for r in range(self.rounds)
                         for k in self.plan.epoch_order(epoch * self.rounds + r, self.seed)]
                order_epoch = epoch
            first = within * per_step + self.rank * self.batch_size
            yield [(epoch, p, order[p]) for p in range(first, first + self.batch_size)]


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    problems = [p for s in samples for p in s["problems"]]
    failed = [s for s in samples if s["error"]]
    if failed:
        return {"image": None, "entry": [s["entry"] for s in samples], "problems": problems,
                "error": failed[0]["problems"][-1]}
    return {"image": torch.stack([s["image"] for s in samples]), "entry": [s["entry"] for s in samples],
            "problems": problems, "error": None}


def _leave_sigint_to_the_parent(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group. A worker that died of it would fail the training process, which
    # takes the first one as "stop after this step" (a checkpoint, then Interrupted), in the middle of waiting
    # for that step's batch; the training process shuts its workers down itself.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: torch.utils.data.Dataset, batches: StepBatches, workers: int | None = None, *,
                collate_fn: Callable[[list], Any] | None = _collate, pin_memory: bool = False,
                persistent: bool = False, generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over the planned batches: `workers` processes (None: `default_workers()`) read ahead, 2
    batches each, deaf to Ctrl-C (the training process decides when to stop). A daemonic process (a pool worker,
    a test harness) may not start processes: it reads in place.

    `collate_fn` None: torch's default; `pin_memory` for copies to a CUDA device that overlap the step;
    `persistent` keeps the workers (and what they hold in memory) from one pass over the loader to the next;
    `generator` draws the loader's own seed instead of torch's global generator, so that starting a loader
    leaves the global random stream as it was."""
    import multiprocessing

    workers = default_workers() if workers is None else workers
    if multiprocessing.current_process().daemon:
        workers = 0
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory, "generator": generator}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    if workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=persistent, worker_init_fn=_leave_sigint_to_the_parent)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **kwargs)


def pretraining_loader(corpus: Corpus, cfg: PretrainConfig, start: int, stop: int, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False,
                       ) -> tuple[CorpusDataset, torch.utils.data.DataLoader, list[str]]:
    """The dataset (augmented, through the on-disk cache if `cfg.cache`, preloaded if `cfg.preload` says so) and
    the loader of steps `start .. stop - 1` for one rank; and the problems of files skipped so far. `pin_memory`:
    batches in page-locked memory, for copies to a CUDA device that overlap the step."""
    cache = SampleCache(Path(cfg.cache), corpus) if cfg.cache else None
    dataset = CorpusDataset(corpus, pretraining_transform(corpus, cfg), seed=cfg.train.seed, cache=cache)
    problems = [p for source in corpus.sources for p in source.index.problems]  # found while listing
    if cfg.preload == "yes" or (cfg.preload == "auto" and corpus.nbytes() <= PRELOAD_BYTES):
        problems += dataset.preload()
    batches = StepBatches(corpus, cfg.train.seed, cfg.train.batch_size, start, stop, rank, world_size)
    return dataset, make_loader(dataset, batches, cfg.train.workers, pin_memory=pin_memory), problems


def pretraining_transform(corpus: Corpus, cfg: PretrainConfig) -> Callable[[dict], dict] | None:
    """The per-sample augmentation: 2D the random resized crop and jitter (none without train.augment); 3D
    always a random `data.crop_size` crop (a batch needs one shape), flips, turns and jitter only with
    train.augment."""
    return corpus.pipeline.pretraining_transform(cfg)


def describe(corpus: Corpus) -> dict[str, Any]:
    """What the run directory's corpus.json records: each source's path, layout, weight and image count."""
    from ahm.pipeline import for_dims

    return {"channels": corpus.channels, "entries": corpus.n_entries, "images_per_epoch": corpus.epoch_size,
            "sources": [{"path": s.spec.path, "layout": s.index.layout, "weight": s.spec.weight,
                         "modality": s.data_cfg.modality, "labelled": s.index.has_labels, "images": len(s.ids),
                         "volumes": len({i.image for i in s.index.items
                                         if for_dims(i.spatial_dims).from_volume(i)}),
                         "problems": len(s.index.problems)} for s in corpus.sources]}
