"""The 3D data path (`data.spatial_dims: 3`): whole volumes, resampled and normalised, cropped for training.

One deterministic, invertible preprocessing (`preprocess_volumes`: read, channel first, reorient, resample to
`data.spacing`, normalise per modality, pad to at least `data.crop_size`) is shared by training, validation and
prediction; `invert_prediction` maps a network output on that grid back onto the input volume's own grid
(shape, affine, orientation). Training adds random crops (`RandSpatialCropd` for pretraining,
`RandCropByPosNegLabeld` for fine-tuning, so small foreground is seen) and 3D flips, 90-degree rotations and
intensity jitter, all MONAI dictionary transforms seeded per sample like the 2D path.

Padding is always on: a volume smaller than the crop after resampling is zero-padded to it (and the padding is
undone by the inverse), so a crop never exceeds its volume and no run fails on a small scan.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ahm.config import DataConfig
from ahm.data.dataset import unify_channels
from ahm.data.layouts import DatasetIndex, Item
from ahm.data.transforms import IMAGE, LABEL, AsPlainTensors
from ahm.errors import AhmError

PRED = "pred"


# ------------------------------------------------------------------------------------------ checks


def check_crop(cfg: DataConfig, multiple: int | Sequence[int], why: str = "the backbone's patch size") -> None:
    """Refuse a `data.crop_size` whose sides are not multiples of `multiple` (per axis or one for all), in one
    line naming the option; the backbone decides `multiple` (its patch size, or its total stride)."""
    sides = tuple(int(s) for s in cfg.crop_size)
    mults = (int(multiple),) * len(sides) if isinstance(multiple, (int, np.integer)) else tuple(int(m) for m in multiple)
    if len(mults) != len(sides) or any(m < 1 for m in mults):
        raise AhmError(f"data.crop_size: cannot check against multiple {multiple!r} (one positive value per axis)")
    if any(s % m for s, m in zip(sides, mults)):
        fixed = "x".join(str(max(m, round(s / m) * m)) for s, m in zip(sides, mults))
        raise AhmError(f"data.crop_size {'x'.join(map(str, sides))}: every side must be a multiple of "
                       f"{'x'.join(map(str, mults))} ({why}); use for example {fixed}")


def volume_modality(cfg: DataConfig, index: DatasetIndex | None) -> str:
    """The intensity rule's modality for a 3D dataset: the option, else what the layout says, else MRI."""
    if cfg.modality != "auto":
        return cfg.modality
    if index is not None and index.modality in ("ct", "mri", "photo"):
        return index.modality
    return "mri"


# ------------------------------------------------------------------------------------------ reading


class ReadVolumed(MapTransform):
    """Read `image` (and `label`) paths with ahm's readers into MetaTensors carrying the voxel -> RAS affine.

    Used instead of MONAI's LoadImaged so that every volume format goes through one reader with ahm's checks
    (sizes refused from the header before decoding, NaN voxels, DICOM slice order, label maps that are not
    labels), each failure one AhmError naming the file. Label volumes are checked against the image's shape and
    the dataset's declared label values.
    """

    def __init__(self, label_values: Sequence[int] | None = None, channels: int | None = None) -> None:
        super().__init__(keys=[IMAGE, LABEL], allow_missing_keys=True)
        self.label_values = None if label_values is None else sorted(int(v) for v in label_values)
        self.channels = channels

    @staticmethod
    def _meta_tensor(data: np.ndarray, affine: np.ndarray, path: Path) -> MetaTensor:
        affine_t = torch.as_tensor(affine, dtype=torch.float64)
        meta = {
            "filename_or_obj": str(path),
            "original_affine": affine_t.clone(),
            "spatial_shape": np.asarray(data.shape[:3]),
            # EnsureChannelFirstd reads this: channels, when there are any, are the last axis of ahm's volumes.
            "original_channel_dim": -1 if data.ndim == 4 else "no_channel",
            "space": "RAS",
        }
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(data)), affine=affine_t, meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from ahm.data.formats import read_label_volume, read_volume, volume_spacing_problem

        out = dict(data)
        # Layouts refuse these when a dataset is opened; checked again here for paths that come another way.
        problem = volume_spacing_problem(out[IMAGE])
        if problem is not None:
            raise AhmError(problem)
        image = read_volume(out[IMAGE])
        vol = image.data
        extra = out.pop(CHANNEL_FILES, None) or ()
        if extra:
            vol = _join_channels(vol, [read_volume(path) for path in extra], image.path)
        if self.channels is not None:
            # channels, when a volume has any, are its last axis
            vol = unify_channels(vol, self.channels, image.path, axis=3, colour_to_grey=False)
        out[IMAGE] = self._meta_tensor(vol, image.affine, image.path)
        if out.get(LABEL) is not None:
            label = read_label_volume(out[LABEL])
            if label.data.shape[:3] != image.data.shape[:3]:
                raise AhmError(f"{label.path}: label volume size {'x'.join(map(str, label.data.shape[:3]))} does "
                               f"not match image volume {image.path.name} "
                               f"({'x'.join(map(str, image.data.shape[:3]))})")
            shift = _grid_shift_mm(image.affine, label.affine, image.data.shape[:3])
            if shift > _GRID_TOLERANCE * _voxel_size(image.affine):
                raise AhmError(f"{label.path}: label volume lies on another grid than image volume {image.path} "
                               f"(its affine places voxels up to {shift:.3g} mm away; another orientation or "
                               "origin); save the label on the image's grid")
            if self.label_values is not None:
                bad = sorted(set(np.unique(label.data).tolist()) - set(self.label_values))
                if bad:
                    raise AhmError(f"{label.path}: label values {', '.join(map(str, bad[:8]))} are outside the "
                                   f"declared set {self.label_values}")
            # The label lives on the image's grid: the image's affine is the one resampling follows.
            out[LABEL] = self._meta_tensor(label.data.astype(np.float32), image.affine, label.path)
        elif LABEL in out:
            del out[LABEL]
        return out


# How far (in image voxels) a label's grid may sit from its image's before it is refused: float32 header
# round-off and qform/sform re-encoding move corners by far less, a flipped axis or another origin by much more.
_GRID_TOLERANCE = 0.1


def _grid_shift_mm(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """The largest distance in mm between where affines `a` and `b` put the same voxel of a `shape` grid
    (checked at its corners, where an affine's difference is largest)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    return float(np.linalg.norm((np.asarray(a, np.float64) @ corners - np.asarray(b, np.float64) @ corners)[:3],
                                axis=0).max())


def _voxel_size(affine: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0).min())


# The extra channel files of an item stored one file per channel (nnU-Net's CASE_0001...), for ReadVolumed.
CHANNEL_FILES = "channel_files"


def _join_channels(vol: np.ndarray, extra: list, first: Path) -> np.ndarray:
    """`vol` [X, Y, Z(, C)] with each of `extra`'s volumes appended as channels (last axis)."""
    parts = [vol if vol.ndim == 4 else vol[..., None]]
    for volume in extra:
        if volume.data.shape[:3] != vol.shape[:3]:
            raise AhmError(f"{volume.path}: channel volume size {'x'.join(map(str, volume.data.shape[:3]))} does "
                           f"not match {first.name} ({'x'.join(map(str, vol.shape[:3]))})")
        parts.append(volume.data if volume.data.ndim == 4 else volume.data[..., None])
    return np.concatenate([p.astype(np.float32, copy=False) for p in parts], axis=3)


class _Normalised(MapTransform):
    """Checks that normalisation left finite values (a constant volume z-scored, for example, must not NaN)."""

    def __init__(self) -> None:
        super().__init__(keys=[IMAGE])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        image = data[IMAGE]
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise AhmError(f"{image.meta.get('filename_or_obj', 'volume')}: normalisation produced NaN or "
                           "infinite values")
        return dict(data)


def _intensity(cfg: DataConfig, modality: str) -> list:
    if modality == "ct":
        lo, hi = (float(v) for v in cfg.ct_window)
        return [ScaleIntensityRanged(keys=[IMAGE], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    if modality == "photo":  # 8-bit values, as the 2D path reads them (value / 255)
        return [ScaleIntensityRanged(keys=[IMAGE], a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=False)]
    return [NormalizeIntensityd(keys=[IMAGE], nonzero=True, channel_wise=True)]


def preprocess_volumes(
    cfg: DataConfig, modality: str = "mri", label_values: Sequence[int] | None = None
) -> Compose:
    """The deterministic, invertible 3D preprocessing of `{"image": path, "label": path (optional)}`: read,
    channel first, reorient to `cfg.orientation`, resample to `cfg.spacing` (image bilinear, label nearest; None
    keeps the spacing), normalise for `modality` ("ct": `cfg.ct_window` to [0, 1]; "mri": z-score over non-zero
    voxels per channel; "photo": / 255), zero-pad to at least `cfg.crop_size`. Gives MetaTensors image
    [C, X, Y, Z] float32 and label [1, X, Y, Z] float (integral values), carrying what `invert_prediction`
    needs."""
    keys = [IMAGE, LABEL]
    steps: list = [
        ReadVolumed(label_values, cfg.channels),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
        Orientationd(keys=keys, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")),
                     allow_missing_keys=True),
    ]
    if cfg.spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=tuple(float(s) for s in cfg.spacing), mode=("bilinear", "nearest"),
                              dtype=np.float32, allow_missing_keys=True))
    steps += _intensity(cfg, modality)
    steps += [
        _Normalised(),
        SpatialPadd(keys=keys, spatial_size=tuple(int(s) for s in cfg.crop_size), mode="constant",
                    allow_missing_keys=True),
    ]
    return _Preprocess(steps)


class _Preprocess(Compose):
    """MONAI wraps what a transform raises in a RuntimeError("applying transform ..."); a user error from
    reading (a file named in one line) is raised as itself, so the caller sees that line, not a traceback."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # Compose's own
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, AhmError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


# ------------------------------------------------------------------------------------------ training crops


class _CopyCrop(MapTransform):
    """Copy a crop out of its volume: a crop is a view of the voxels it was cut from, which `VolumeDataset` keeps
    cached and hands to the crop uncopied. Not random, so the seeds a Compose gives the transforms after it stay
    those they had without it."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys=keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = out[key].clone()
        return out


def _augment(keys: list[str], intensity: float) -> list:
    return [
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2, allow_missing_keys=True),
        # In the axial plane only: with anisotropic crops a turn through the slice axis would change the shape.
        RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1), allow_missing_keys=True),
        RandScaleIntensityd(keys=[IMAGE], factors=intensity, prob=0.8),
        RandShiftIntensityd(keys=[IMAGE], offsets=intensity, prob=0.8),
    ]


def _square_plane(cfg: DataConfig) -> bool:
    return cfg.crop_size[0] == cfg.crop_size[1]


def volume_pretrain_augment(cfg: DataConfig, intensity: float = 0.1) -> Compose:
    """On a preprocessed `{"image"}`: a random `cfg.crop_size` crop, 3D flips, 90-degree turns in the first two
    axes (when those crop sides are equal), intensity scale/shift of +-`intensity`. Seed with
    `.set_random_state(seed=...)`."""
    keys = [IMAGE]
    steps = _augment(keys, intensity)
    if not _square_plane(cfg):
        steps = [t for t in steps if not isinstance(t, RandRotate90d)]
    return Compose([RandSpatialCropd(keys=keys, roi_size=tuple(cfg.crop_size), random_size=False), _CopyCrop(keys)]
                   + steps + [AsPlainTensors(drop_label_channel=True)])


def volume_segment_augment(cfg: DataConfig, intensity: float = 0.1) -> Compose:
    """On a preprocessed `{"image", "label"}`: a `cfg.crop_size` crop centred on a foreground voxel with
    probability `cfg.pos_neg_ratio` (else on background; MONAI RandCropByPosNegLabeld), the same flips and turns
    for image and label, intensity jitter on the image. Gives one sample dict (image [C, *crop] float, label
    [*crop] long). Seed with `.set_random_state(seed=...)`."""
    keys = [IMAGE, LABEL]
    ratio = float(cfg.pos_neg_ratio)
    steps = _augment(keys, intensity)
    if not _square_plane(cfg):
        steps = [t for t in steps if not isinstance(t, RandRotate90d)]
    return _OneSample([RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=tuple(cfg.crop_size),
                                              pos=ratio, neg=1.0 - ratio, num_samples=1), _CopyCrop(keys)]
                      + steps + [AsPlainTensors(drop_label_channel=True)])


class _OneSample(Compose):
    """RandCropByPosNegLabeld makes a list of `num_samples` dicts (Compose maps the rest over it); with one
    sample, that dict."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # Compose's own
        out = super().__call__(input_, *args, **kwargs)
        return out[0] if isinstance(out, list) else out


# ------------------------------------------------------------------------------------------ inverse


def invert_prediction(prediction: torch.Tensor, sample: Mapping[Hashable, Any], preprocess: Compose,
                      nearest: bool = False) -> MetaTensor:
    """A prediction [C, *spatial] on the preprocessed grid of `sample` mapped back onto the input volume's grid:
    [C, *original spatial shape] with the input's affine, padding removed, orientation and spacing undone.
    `nearest` for label maps (exact where no resampling happened), else linear (probabilities, logits).

    `sample` is one unbatched output of `preprocess_volumes`, a `VolumeDataset` sample without augmentation,
    or one element of `monai.data.decollate_batch` of a batch from `evaluation_loader`. A batch made by torch's
    default collate has lost the per-transform record the inverse needs and is refused."""
    image = sample[IMAGE]
    if not isinstance(image, MetaTensor) or not image.applied_operations:
        raise AhmError("invert_prediction: the sample carries no preprocessing record (use a whole-volume sample "
                       "from preprocess_volumes)")
    if image.is_batch:
        raise AhmError("invert_prediction: the sample is a batch; pass one element of "
                       "monai.data.decollate_batch(batch)")
    ops = image.applied_operations
    if not isinstance(ops, list) or not all(isinstance(op, Mapping) and "class" in op for op in ops):
        raise AhmError("invert_prediction: the sample's preprocessing record was merged by torch's default "
                       "collate; load whole volumes with ahm.data.volumes.evaluation_loader (MONAI "
                       "list_data_collate) and decollate_batch each batch")
    pred = torch.as_tensor(prediction.as_tensor() if hasattr(prediction, "as_tensor") else prediction)
    if tuple(pred.shape[1:]) != tuple(image.shape[1:]):
        raise AhmError(f"invert_prediction: prediction of spatial shape {tuple(pred.shape[1:])} does not match "
                       f"the preprocessed volume {tuple(image.shape[1:])}")
    inverse = Invertd(keys=PRED, transform=preprocess, orig_keys=IMAGE, nearest_interp=nearest, to_tensor=True)
    data: dict[Hashable, Any] = {PRED: MetaTensor(pred.float(), meta=copy.deepcopy(dict(image.meta))), IMAGE: image}
    return inverse(data)[PRED]


def evaluation_loader(dataset: VolumeDataset, workers: int = 0) -> torch.utils.data.DataLoader:
    """The loader for whole preprocessed volumes (validation, evaluation, prediction): one volume a batch (their
    shapes differ), in order, collated by MONAI's `list_data_collate`, which keeps each MetaTensor's
    preprocessing record; `monai.data.decollate_batch(batch)[0]` is then a sample `invert_prediction` takes.
    A training (augmented) dataset is refused: its random crops have no inverse onto the input grid."""
    from monai.data import list_data_collate

    if dataset.augment is not None:
        raise AhmError("evaluation_loader: the dataset gives random training crops; open it with train=False "
                       "for whole volumes")
    return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=int(workers),
                                       collate_fn=list_data_collate)


def preprocessed_spacing(sample: Mapping[Hashable, Any]) -> tuple[float, ...]:
    """Voxel spacing in mm of a preprocessed sample (what a metric in millimetres, HD95, needs)."""
    return tuple(float(s) for s in affine_to_spacing(sample[IMAGE].affine, r=3))


def input_grid(sample: Mapping[Hashable, Any]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The input volume's voxel -> RAS affine (4x4) and spatial shape, as read from the file: where an
    inverted prediction lives and what a written NIfTI mask must carry."""
    meta = sample[IMAGE].meta
    return (np.asarray(torch.as_tensor(meta["original_affine"]), dtype=np.float64),
            tuple(int(s) for s in np.asarray(meta["spatial_shape"]).tolist()))


# ------------------------------------------------------------------------------------------ dataset


def volume_paths(item: Item, labels: bool) -> dict[str, Any]:
    """The `{"image": path, "label": path}` dict `preprocess_volumes` reads, for one 3D item."""
    if item.spatial_dims != 3:  # a guard: the 3D reader refuses a 2D item rather than choosing a reader
        raise AhmError(f"{item.image}: a 2D item ({item.id}); open the dataset with data.spatial_dims 3")
    if labels and item.mask is None:
        raise AhmError(f"{item.image}: no label volume for this image")
    out = {IMAGE: item.image, LABEL: item.mask if labels else None}
    if item.channel_files:
        out[CHANNEL_FILES] = item.channel_files
    return out


class VolumeDataset(torch.utils.data.Dataset):
    """3D samples of `items`: the preprocessed volume (`preprocess`), then, when `augment` is given, its random
    crop `{"image": [C, *crop] float, "label": [*crop] long, "index": i}` seeded by (seed, epoch, i) like
    `ArrayDataset` (asked for by index or by a loader key (epoch, position, i), `ahm.data.dataset.epoch_key`);
    without `augment` the whole preprocessed volume as MetaTensors (image [C, ...], label [1, ...]) with `"id"`
    and `"index"`, for sliding-window inference and `invert_prediction`, loaded with `evaluation_loader` (torch's
    default collate loses what the inverse needs). `cache` keeps preprocessed volumes in memory after their first
    read (`preload` reads them all at once).

    `augment` is given the cached voxels themselves (a volume is not copied for each crop): it must crop before
    it writes into anything, and copy its crop (`volume_segment_augment` and `volume_pretrain_augment` do)."""

    def __init__(self, items: list[Item], preprocess: Compose, augment: Compose | None = None, *,
                 labels: bool = False, seed: int = 0, cache: bool = False) -> None:
        self.items, self.preprocess, self.augment = list(items), preprocess, augment
        self.labels, self.seed, self.epoch = labels, int(seed), 0
        self._cache: dict[int, dict] | None = {} if cache else None
        for item in self.items:
            volume_paths(item, labels)  # refuse 2D items and missing labels before any volume is read

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _volume(self, i: int) -> dict[Hashable, Any]:
        # the cached sample itself when cached: read, never written to
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        sample = self.preprocess(volume_paths(self.items[i], self.labels))
        if self._cache is not None:
            self._cache[i] = sample
        return sample

    def prepared(self, i: int) -> dict[Hashable, Any]:
        """Item `i` after the deterministic preprocessing (a copy of the cached one when cached)."""
        sample = self._volume(i)
        return copy.deepcopy(sample) if self._cache is not None else sample

    def preload(self) -> None:
        """Preprocess every item into the cache now (nothing without one): DataLoader workers forked afterwards
        share these volumes instead of each reading, resampling and holding its own copy of all of them."""
        if self._cache is not None:
            for i in range(len(self)):
                self._volume(i)

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        from ahm.data.dataset import apply_seeded, epoch_key, sample_seed

        epoch, i = epoch_key(key, self.epoch)
        if self.augment is None:
            return {**{str(k): v for k, v in self.prepared(i).items()}, "index": i, "id": self.items[i].id}
        sample: dict[str, Any] = {str(k): _shared_voxels(v) for k, v in self._volume(i).items()}
        out = apply_seeded(self.augment, sample, sample_seed(self.seed, epoch, i))
        result: dict[str, Any] = {"image": out[IMAGE].contiguous(), "index": i}
        if self.labels:
            result["label"] = out[LABEL].contiguous()
        return result


def _shared_voxels(value: Any) -> Any:
    """A MetaTensor on the same voxels as `value` with a copy of its metadata (what `copy.deepcopy` would give
    but for the voxels): a transform records itself in the metadata of what it is given, and that must not reach
    the cached volume."""
    if not isinstance(value, MetaTensor):
        return value
    view = value.as_tensor().as_subclass(MetaTensor)
    view.__dict__ = copy.deepcopy(value.__dict__)
    return view


def volume_dataset(index: DatasetIndex, ids: list[str], cfg: DataConfig, *, labels: bool, train: bool,
                   seed: int = 0, cache: bool = False) -> VolumeDataset:
    """The 3D dataset of items `ids` of `index`: training crops (`train`; fine-tuning crops by foreground when
    `labels`) or whole preprocessed volumes for validation/test."""
    by_id = index.by_id()
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AhmError(f"{index.root}: unknown item id(s) {', '.join(missing[:5])}")
    if labels and not index.has_labels:
        raise AhmError(f"{index.root}: this dataset has no masks; segmentation needs labelled volumes")
    preprocess = preprocess_volumes(cfg, volume_modality(cfg, index), index.label_values if labels else None)
    augment = None
    if train:
        augment = volume_segment_augment(cfg) if labels else volume_pretrain_augment(cfg)
    return VolumeDataset([by_id[i] for i in ids], preprocess, augment, labels=labels, seed=seed, cache=cache)


def prepare_volume(item: Item, index: DatasetIndex, cfg: DataConfig, channels: int | None = None) -> np.ndarray:
    """One unlabelled 3D item preprocessed (`preprocess_volumes`) as a plain float32 array [C, X, Y, Z]: what the
    streamed pretraining corpus reads, crops and caches."""
    if channels is not None and channels != cfg.channels:
        cfg = cfg.model_copy(update={"channels": channels})
    sample = preprocess_volumes(cfg, volume_modality(cfg, index))(volume_paths(item, labels=False))
    return np.ascontiguousarray(sample[IMAGE].as_tensor().numpy(), dtype=np.float32)


def raw_volume_bytes(item: Item) -> int:
    """Float32 bytes of a volume as stored (from its header; resampling changes it by the spacing ratio)."""
    from ahm.data.formats import read_volume_info

    shape, channels = read_volume_info(item.image)
    return int(np.prod(shape)) * int(channels) * 4


def read_volume_item(item: Item, index: DatasetIndex, cfg: DataConfig,
                     labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A 3D item as stored, checked like training reads it (`ReadVolumed`): image [C, X, Y, Z] float32 and label
    [X, Y, Z] integers (or None); for `ahm data check`, which reports sizes and label counts before resampling."""
    read = ReadVolumed(index.label_values if labels else None, cfg.channels)
    sample = read(volume_paths(item, labels=labels and item.mask is not None))
    image = sample[IMAGE].as_tensor().numpy()
    image = image[None] if image.ndim == 3 else np.moveaxis(image, -1, 0)
    label = sample.get(LABEL)
    return np.ascontiguousarray(image), None if label is None else label.as_tensor().numpy().astype(np.int64)
