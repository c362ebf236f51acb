"""From listed items to arrays in memory, and a seeded torch Dataset over them.

The data sets this toolkit targets (a few thousand 2D slices at 128-256 px) fit in memory once resized, so
images are read, normalised and resized once; augmentation then runs per sample, seeded by
(seed, epoch, index) so that any epoch of a run can be replayed exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.config import DataConfig
from ahm.data.layouts import DatasetIndex, Item
from ahm.data.preprocess import Modality
from ahm.errors import AhmError

# JPEG masks carry compression noise around the edges; mid-grey splits it cleanly.
JPEG_MASK_THRESHOLD = 128


@dataclass
class Arrays:
    """Images ready for a network, with where each one came from."""

    images: np.ndarray  # float32 [N, C, S, S], normalised to ~[0, 1]
    labels: np.ndarray | None  # int64 [N, S, S]
    ids: list[str]
    original_hw: list[tuple[int, int]]
    items: list[Item]
    problems: list[str] = field(default_factory=list)  # files skipped with cfg.skip_bad
    normalization: str = "auto"  # the intensity rule applied (`normalization_rule`), kept with pretrained weights
    # Size in mm of a model-grid pixel (rows, columns) per image, None where the source records no pixel size
    # (`grid_spacing`); and, for a slice of a volume, the source voxel size along its slice axis (mm) or None.
    spacing: list[tuple[float, float] | None] = field(default_factory=list)
    slice_mm: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.spacing:
            self.spacing = [None] * n
        if not self.slice_mm:
            self.slice_mm = [None] * n
        if len(self.spacing) != n or len(self.slice_mm) != n:
            raise AhmError(f"Arrays: {len(self.spacing)} spacings and {len(self.slice_mm)} slice sizes for {n} "
                           f"images")


class VolumeCache:
    """Keeps the last image volume and the last label volume read.

    Items are visited volume by volume, so each volume is read once; its voxel size (`Volume.voxel_mm`) is held
    beside its data.
    """

    def __init__(self) -> None:
        self._slots: dict[bool, tuple[str, np.ndarray, tuple]] = {}

    def _held(self, path: Path, label: bool) -> tuple[str, np.ndarray, tuple]:
        from ahm.data.formats import read_label_volume, read_volume

        held = self._slots.get(label)
        if held is None or held[0] != str(path):
            self._slots.pop(label, None)  # drop the old one before reading: two volumes may not fit
            volume = read_label_volume(path) if label else read_volume(path)
            self._slots[label] = (str(path), volume.data, volume.voxel_mm)
        return self._slots[label]

    def get(self, path: Path, label: bool) -> np.ndarray:
        return self._held(path, label)[1]

    def voxel_mm(self, path: Path) -> tuple[float | None, float | None, float | None]:
        """The image volume's voxel size along X, Y, Z (None where not recorded)."""
        return self._held(path, False)[2]


def _read_mask_2d(item: Item, index: DatasetIndex, cfg: DataConfig) -> np.ndarray:
    from ahm.data.formats import read_mask

    assert item.mask is not None
    threshold = index.mask_threshold
    if threshold is None and item.mask.suffix.lower() in (".jpg", ".jpeg"):
        threshold = JPEG_MASK_THRESHOLD
    if threshold is not None:
        return read_mask(item.mask, max_pixels=cfg.max_pixels, threshold=threshold)
    mask = read_mask(item.mask, max_pixels=cfg.max_pixels)
    for extra in item.extra_masks:
        more = read_mask(extra, max_pixels=cfg.max_pixels)
        if more.shape != mask.shape:
            raise AhmError(
                f"{extra}: mask size {more.shape[0]}x{more.shape[1]} does not match "
                f"{item.mask.name} ({mask.shape[0]}x{mask.shape[1]})"
            )
        mask = ((mask > 0) | (more > 0)).astype(np.int64)
    return mask


def read_item(
    item: Item, index: DatasetIndex, cfg: DataConfig, labels: bool, cache: VolumeCache | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw image [C, H, W] float32 as stored and mask [H, W] int64 (or None), checked against each other."""
    from ahm.data.formats import read_image
    from ahm.data.preprocess import volume_slice

    cache = cache or VolumeCache()
    if item.slice is not None:
        assert item.axis is not None
        parts = [volume_slice(cache.get(path, label=False), item.axis, item.slice)
                 for path in (item.image, *item.channel_files)]
    else:
        parts = [read_image(path, max_pixels=cfg.max_pixels) for path in (item.image, *item.channel_files)]
    for path, part in zip(item.channel_files, parts[1:]):
        if part.shape[1:] != parts[0].shape[1:]:
            raise AhmError(f"{path}: channel size {'x'.join(map(str, part.shape[1:]))} does not match "
                           f"{item.image.name} ({'x'.join(map(str, parts[0].shape[1:]))})")
    image = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if image.ndim != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise AhmError(f"{item.image}: unexpected image shape {tuple(image.shape)}")
    if not np.isfinite(image).all():
        raise AhmError(f"{item.image}: contains NaN or infinite values")

    mask = None
    if labels and item.mask is not None:
        if item.slice is not None:
            label_volume = cache.get(item.mask, label=True)
            volume_shape = cache.get(item.image, label=False).shape[:3]
            if label_volume.shape[:3] != volume_shape:
                raise AhmError(
                    f"{item.mask}: label volume size {'x'.join(map(str, label_volume.shape[:3]))} "
                    f"does not match image volume {item.image.name} "
                    f"({'x'.join(map(str, volume_shape))})"
                )
            mask = volume_slice(label_volume, item.axis or 0, item.slice)
        else:
            mask = _read_mask_2d(item, index, cfg)
        if mask.shape != image.shape[1:]:
            raise AhmError(
                f"{item.mask}: mask size {mask.shape[0]}x{mask.shape[1]} does not match image "
                f"{item.image.name} size {image.shape[1]}x{image.shape[2]}"
            )
        mask = mask.astype(np.int64, copy=False)
        if index.label_values is not None:
            bad = sorted(set(np.unique(mask).tolist()) - set(index.label_values))
            if bad:
                where = index.labels_declared_by or f"the {index.layout} layout"
                shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
                raise AhmError(
                    f"{item.mask}: label values {shown} are outside the set "
                    f"{index.label_values} declared by {where}"
                )
    return image, mask


def _source_dtype(path: Path) -> str | None:
    """Stored sample type of a 2D file, for the 'auto' normalisation (8-bit photo vs scanner data)."""
    from ahm.data.formats import read_image_info

    try:
        return read_image_info(path).dtype
    except AhmError:  # the pixels were readable; an odd header only loses the hint
        return None


def _modality(item: Item, index: DatasetIndex, cfg: DataConfig) -> tuple[Modality, str | None]:
    if cfg.modality != "auto":
        return cfg.modality, None
    if index.modality in ("mri", "ct", "photo"):
        return index.modality, None  # type: ignore[return-value]
    if item.slice is not None:
        return "mri", None
    return "auto", _source_dtype(item.image)


def normalization_rule(cfg: DataConfig, index: DatasetIndex) -> str:
    """The intensity normalisation `load_arrays` applies to this dataset, as one comparable string.

    A pretrained encoder has learned intensities mapped by this rule; fine-tuning elsewhere should map its own
    the same way ("ct -1000..1000", "mri", "photo", or "auto" when it is decided file by file). Volumes in 3D
    are z-scored instead (`VolumePipeline.normalization_rule`).
    """
    modality = cfg.modality if cfg.modality != "auto" else (index.modality or "auto")
    if modality == "ct":
        lo, hi = (float(v) for v in cfg.ct_window)
        return f"ct {lo:g}..{hi:g}"
    return modality


def unify_channels(data: np.ndarray, channels: int, path: Path, *, axis: int = 0,
                   colour_to_grey: bool = True) -> np.ndarray:
    """`data` with `channels` channels along `axis`: one channel repeated, or (`colour_to_grey`) three averaged
    to one; anything else is a user error naming the file. An array with no axis `axis` has one channel."""
    have = data.shape[axis] if data.ndim > axis else 1
    if have == channels:
        return data
    if have == 1:
        single = data if data.ndim > axis else np.expand_dims(data, axis)
        return np.repeat(single, channels, axis=axis)
    if have == 3 and channels == 1 and colour_to_grey:
        return data.mean(axis=axis, keepdims=True)
    raise AhmError(
        f"{path}: has {have} channels but the data set uses {channels} "
        f"(set data.channels, or convert the file)"
    )


def prepare_item(item: Item, index: DatasetIndex, cfg: DataConfig, labels: bool, channels: int | None,
                 cache: VolumeCache | None = None) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """One item as a network sees it: image [C, S, S] float32 (channels unified to `channels` when given,
    normalised for its modality, resized to the model grid), mask [S, S] int64 or None, and the stored (H, W).

    The one reading and preprocessing path: `load_arrays` (in memory) and the streamed corpus both call it.
    """
    from ahm.data.preprocess import normalize, resize_image, resize_mask

    image, mask = read_item(item, index, cfg, labels, cache)
    if labels and mask is None:
        raise AhmError(f"{item.image}: no mask for this image")
    if channels is not None:
        image = unify_channels(image, channels, item.image)
    modality, source_dtype = _modality(item, index, cfg)
    image = normalize(image.astype(np.float32, copy=False), modality, ct_window=cfg.ct_window,
                      source_dtype=source_dtype)
    hw = (int(image.shape[1]), int(image.shape[2]))
    resized = resize_image(image, cfg.image_size)
    if not np.isfinite(resized).all():
        raise AhmError(f"{item.image}: normalisation produced NaN or infinite values")
    return (resized.astype(np.float32, copy=False),
            None if mask is None else resize_mask(mask, cfg.image_size).astype(np.int64, copy=False), hw)


def grid_spacing(item: Item, hw: tuple[int, int], size: int,
                 cache: VolumeCache | None = None) -> tuple[tuple[float, float] | None, float | None]:
    """(model-grid pixel size in mm (rows, columns), source voxel size along the slice axis in mm) of an item
    stored at `hw` and resized to `size` by `resize_image`; None where the source records no size.

    The source pixel size is the header's (`image_pixel_size`, `slice_pixel_size`); a model-grid pixel covers
    h / new_h source rows and w / new_w source columns (`resize_image` keeps the aspect ratio).
    """
    from ahm.data.formats import image_pixel_size
    from ahm.data.preprocess import fit_geometry, slice_pixel_size

    if item.slice is not None:
        assert item.axis is not None
        voxel_mm = (cache or VolumeCache()).voxel_mm(item.image)
        source, through = slice_pixel_size(voxel_mm, item.axis), voxel_mm[item.axis]
    else:
        source, through = image_pixel_size(item.image), None
    if source is None:
        return None, through
    h, w = hw
    new_h, new_w, _, _ = fit_geometry(h, w, size)
    return (source[0] * h / new_h, source[1] * w / new_w), through


def load_arrays(
    index: DatasetIndex,
    ids: list[str],
    cfg: DataConfig,
    labels: bool,
    progress: Callable[[int, int], None] | None = None,
) -> Arrays:
    """Read, normalise and resize the items `ids` into arrays [N, C, S, S] (+ labels [N, S, S]).

    Channels follow `cfg.channels` or the first image. With `cfg.skip_bad` unreadable or inconsistent files
    are left out and listed in `Arrays.problems` (and `index.problems`); otherwise the first one raises.
    `Arrays.spacing` holds each image's model-grid pixel size in mm where its source records one (`grid_spacing`).
    """
    by_id = index.by_id()
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AhmError(f"{index.root}: unknown item id(s) {', '.join(missing[:5])}")
    if labels and not index.has_labels:
        raise AhmError(f"{index.root}: this dataset has no masks; segmentation needs labelled images")
    size = cfg.image_size
    # Visit items volume by volume (each volume read once) but return them in the order asked for.
    order = sorted(range(len(ids)), key=lambda k: (str(by_id[ids[k]].image), k))
    results: dict[int, tuple[np.ndarray, np.ndarray | None, tuple[int, int], tuple, float | None]] = {}
    problems: list[str] = []
    channels = cfg.channels
    cache = VolumeCache()
    for done, k in enumerate(order, start=1):
        item = by_id[ids[k]]
        try:
            image, mask, hw = prepare_item(item, index, cfg, labels, channels, cache)
            if channels is None:
                channels = image.shape[0]
            results[k] = (image, mask, hw, *grid_spacing(item, hw, size, cache))
        except AhmError as exc:
            if not cfg.skip_bad:
                raise
            problems.append(str(exc))
        if progress is not None:
            progress(done, len(order))
    kept = [k for k in range(len(ids)) if k in results]
    if ids and not kept:
        raise AhmError(
            f"{index.root}: none of the {len(ids)} images could be read "
            f"(first problem: {problems[0] if problems else 'unknown'})"
        )
    n_channels = channels or (cfg.channels or 1)
    images = np.zeros((len(kept), n_channels, size, size), dtype=np.float32)
    label_array = np.zeros((len(kept), size, size), dtype=np.int64) if labels else None
    for row, k in enumerate(kept):
        images[row] = results[k][0]
        mask = results[k][1]
        if label_array is not None and mask is not None:
            label_array[row] = mask
    index.problems.extend(problems)
    return Arrays(
        images=images,
        labels=label_array,
        ids=[ids[k] for k in kept],
        original_hw=[results[k][2] for k in kept],
        items=[by_id[ids[k]] for k in kept],
        problems=problems,
        normalization=normalization_rule(cfg, index),
        spacing=[results[k][3] for k in kept],
        slice_mm=[results[k][4] for k in kept],
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends on (seed, epoch, index) only, never on worker or call order."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(1)[0])


def apply_seeded(transform: Callable[[dict], dict], sample: dict[str, Any], seed: int) -> dict[str, Any]:
    """`transform(sample)` with its randomness fixed by `seed` alone (a MONAI transform is re-seeded; a plain
    callable runs on a forked torch generator), so a sample is the same in any worker, in any order."""
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)
        return transform(sample)
    # A plain callable may draw from torch's global generator; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(sample)


def epoch_key(key: int | tuple[int, ...], epoch: int) -> tuple[int, int]:
    """(epoch, index) of a sample key: an index (of the epoch a dataset was last `set_epoch` to), or a loader key
    (epoch, position, index) from `ahm.data.corpus.StepBatches`, which carries its epoch with it so that loader
    workers, persistent ones too, need no `set_epoch`."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[-1])
    return int(epoch), int(key)


class ArrayDataset(torch.utils.data.Dataset):
    """Samples `{"image": [C,S,S] float, "label": [S,S] long, "index": i}` with reproducible augmentation.

    The transform (a MONAI dict transform, or any callable on such dicts) is re-seeded for every sample from
    (seed, epoch, i): the same epoch gives the same samples again, in any DataLoader worker, after a resume.
    A sample is asked for by its index `i` (the epoch of `set_epoch`) or by a loader key (epoch, position, i)
    (`epoch_key`); the position in the epoch does not change it.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | None = None,
        transform: Callable[[dict], dict] | None = None,
        seed: int = 0,
    ) -> None:
        self.images = torch.as_tensor(images, dtype=torch.float32)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and self.labels.shape[0] != self.images.shape[0]:
            raise AhmError(f"ArrayDataset: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        epoch, i = epoch_key(key, self.epoch)
        sample: dict[str, Any] = {"image": self.images[i].clone()}
        if self.labels is not None:
            sample["label"] = self.labels[i].unsqueeze(0).clone()
        if self.transform is not None:
            sample = apply_seeded(self.transform, sample, sample_seed(self.seed, epoch, i))
        out: dict[str, Any] = {"image": plain_tensor(sample["image"]).float().contiguous(), "index": i}
        if self.labels is not None:
            label = plain_tensor(sample["label"])
            out["label"] = (label[0] if label.ndim == 3 else label).long().contiguous()
        return out


def plain_tensor(value: Any) -> torch.Tensor:
    # MONAI returns MetaTensors; batches of plain tensors collate faster and print cleanly.
    if hasattr(value, "as_tensor"):
        value = value.as_tensor()
    return torch.as_tensor(value)
