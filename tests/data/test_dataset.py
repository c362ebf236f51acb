"""Arrays from items (normalised, resized, checked) and the seeded, resumable ArrayDataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import (
    ball_volume,
    make_folder_fixture,
    make_folder_volume_fixture,
    make_msd_fixture,
)
from PIL import Image

from ahm.config import DataConfig
from ahm.data import ArrayDataset, formats, load_arrays, open_dataset, pretrain_augment, segment_augment
from ahm.errors import AhmError

CFG = DataConfig(image_size=32)


def _cfg(**kw) -> DataConfig:
    return CFG.model_copy(update=kw)


def _ids(index) -> list[str]:
    return [i.id for i in index.items]


def _nii(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_arrays_are_normalised_resized_and_in_the_order_asked(tmp_path: Path):
    index = open_dataset(make_folder_fixture(tmp_path / "a", size=(40, 48)), CFG)
    ids = list(reversed(_ids(index)))
    arrays = load_arrays(index, ids, CFG, labels=True)
    assert arrays.images.shape == (6, 1, 32, 32) and arrays.images.dtype == np.float32
    assert arrays.labels.shape == (6, 32, 32) and arrays.labels.dtype == np.int64
    assert arrays.images.min() >= 0.0 and arrays.images.max() <= 1.0
    assert arrays.ids == ids and [i.id for i in arrays.items] == ids
    assert arrays.original_hw == [(40, 48)] * 6
    # 40x48 scaled to 27x32 and padded: the top and bottom rows are padding (zeros, background)
    assert arrays.images[:, :, :2].max() == 0 and arrays.labels[:, :2].max() == 0
    raw = np.asarray(Image.open(index.by_id()[ids[0]].image), dtype=np.float32)
    assert arrays.images[0, 0, 16, 16] == pytest.approx(raw[20, 24] / 255, abs=0.1)


def test_channels_follow_config_or_first_image(tmp_path: Path):
    index = open_dataset(make_folder_fixture(tmp_path / "a", rgb=True), CFG)
    assert load_arrays(index, _ids(index), CFG, labels=False).images.shape[1] == 3
    gray = load_arrays(index, _ids(index), _cfg(channels=1), labels=False).images
    assert gray.shape[1] == 1
    mono = open_dataset(make_folder_fixture(tmp_path / "b"), CFG)
    rgb = load_arrays(mono, _ids(mono), _cfg(channels=3), labels=False).images
    assert rgb.shape[1] == 3 and np.array_equal(rgb[:, 0], rgb[:, 2])


def test_mixed_channel_counts_are_unified_or_named(tmp_path: Path):
    import tifffile

    root = make_folder_fixture(tmp_path / "a", masks=False)
    Image.new("RGB", (48, 40), (30, 60, 90)).save(root / "images" / "p02__1.png")
    index = open_dataset(root, CFG)
    arrays = load_arrays(index, _ids(index), CFG, labels=False)  # first image is grey: RGB becomes its mean
    assert arrays.images.shape[1] == 1
    assert arrays.images[-1, 0, 16, 16] == pytest.approx(60 / 255, abs=1e-3)
    tifffile.imwrite(
        root / "images" / "zz.tif",
        np.zeros((40, 48, 2), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    index = open_dataset(root, CFG)
    with pytest.raises(AhmError, match=r"zz\.tif: has 2 channels but the data set uses 1"):
        load_arrays(index, _ids(index), CFG, labels=False)


def test_volumes_are_read_once_while_slicing(tmp_path: Path, monkeypatch):
    root = make_folder_volume_fixture(tmp_path / "v", volumes=2, shape=(16, 16, 5))
    index = open_dataset(root, CFG)
    calls: list[str] = []
    real = formats.read_volume
    monkeypatch.setattr(
        formats, "read_volume", lambda p, **kw: (calls.append(Path(p).name), real(p, **kw))[1]
    )
    ids = _ids(index)
    interleaved = [x for pair in zip(ids[:5], ids[5:]) for x in pair]
    arrays = load_arrays(index, interleaved, CFG, labels=True)
    assert sorted(calls) == ["case0.nii.gz", "case1.nii.gz"]
    assert arrays.ids == interleaved
    assert set(np.unique(arrays.labels).tolist()) <= {0, 1, 2} and arrays.labels.max() == 2


def test_progress_is_reported(tmp_path: Path):
    index = open_dataset(make_folder_fixture(tmp_path / "a"), CFG)
    seen: list[tuple[int, int]] = []
    load_arrays(index, _ids(index), CFG, labels=False, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (6, 6) and len(seen) == 6


# ------------------------------------------------------------------ bad files


def test_truncated_image_is_named(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a")
    bad = root / "images" / "p01__0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    index = open_dataset(root, CFG)
    with pytest.raises(AhmError) as err:
        load_arrays(index, _ids(index), CFG, labels=True)
    assert str(err.value).startswith(str(bad))
    skipped = load_arrays(index, _ids(index), _cfg(skip_bad=True), labels=True)
    assert len(skipped.ids) == 5 and "p01__0" not in skipped.ids
    assert len(skipped.problems) == 1 and skipped.problems[0].startswith(str(bad))
    assert index.problems == skipped.problems


def test_mask_size_mismatch_names_the_mask(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a", size=(40, 48))
    bad = root / "masks" / "p00__1.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(bad)
    index = open_dataset(root, CFG)
    with pytest.raises(
        AhmError, match=rf"^{bad}: mask size 40x40 does not match image p00__1\.png size 40x48"
    ):
        load_arrays(index, _ids(index), CFG, labels=True)
    # pretraining does not read masks, so it is not stopped by a bad one
    assert len(load_arrays(index, _ids(index), CFG, labels=False).ids) == 6


def test_labels_outside_the_declared_set_name_the_file(tmp_path: Path):
    root = make_msd_fixture(tmp_path, cases=(3, 4))
    bad = root / "labelsTr" / "la_004.nii.gz"
    labels = ball_volume(np.random.default_rng(1), (24, 20, 5))[1]
    labels[0, 0, :] = 3
    _nii(bad, labels)
    index = open_dataset(root, CFG)
    with pytest.raises(
        AhmError, match=rf"^{bad}: label values 3 are outside the set \[0, 1\] declared by dataset\.json"
    ):
        load_arrays(index, _ids(index), CFG, labels=True)


def test_label_volume_size_mismatch_names_the_label(tmp_path: Path):
    root = make_msd_fixture(tmp_path, cases=(3,))
    bad = root / "labelsTr" / "la_003.nii.gz"
    _nii(bad, np.zeros((24, 20, 4), np.uint8))
    index = open_dataset(root, CFG)
    with pytest.raises(AhmError, match=rf"^{bad}: label volume size 24x20x4 does not match image volume"):
        load_arrays(index, _ids(index), CFG, labels=True)


def test_nan_voxels_name_the_volume(tmp_path: Path):
    root = make_folder_volume_fixture(tmp_path / "v", volumes=2, shape=(8, 8, 3), masks=False)
    data = np.ones((8, 8, 3), np.float32)
    data[2, 2, 1] = np.nan
    _nii(root / "images" / "case1.nii.gz", data)
    index = open_dataset(root, CFG)
    with pytest.raises(AhmError, match=r"case1\.nii\.gz: contains NaN or infinite"):
        load_arrays(index, _ids(index), CFG, labels=False)


def test_all_files_bad_is_an_error_even_when_skipping(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "a", subjects=1, per_subject=2, masks=False)
    for p in (root / "images").iterdir():
        p.write_bytes(b"not an image")
    index = open_dataset(root, _cfg(skip_bad=True))
    with pytest.raises(AhmError, match=r"none of the 2 images could be read"):
        load_arrays(index, _ids(index), _cfg(skip_bad=True), labels=False)


def test_asking_for_labels_of_an_unlabelled_set_is_refused(tmp_path: Path):
    index = open_dataset(make_folder_fixture(tmp_path / "a", masks=False), CFG)
    with pytest.raises(AhmError, match="has no masks"):
        load_arrays(index, _ids(index), CFG, labels=True)


# ------------------------------------------------------------------ ArrayDataset


def _dataset(transform, seed: int = 0, labels: bool = True) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 32, 32)).astype(np.float32)
    masks = (images[:, 0] > 0.7).astype(np.int64) if labels else None
    return ArrayDataset(images, masks, transform, seed=seed)


def _segment_every(size: int):
    return segment_augment(size, min_crop_area=0.7, intensity_jitter=0.05, crop_size=size - 4)


@pytest.mark.parametrize("make", [_segment_every, pretrain_augment])
def test_same_seed_epoch_index_gives_the_same_sample(make):
    labels = make is _segment_every
    ds = _dataset(make(32), seed=7, labels=labels)
    ds.set_epoch(3)
    first = ds[2]
    for i in (0, 4, 1):  # other samples in between must not shift the stream
        ds[i]
    again = ds[2]
    fresh = _dataset(make(32), seed=7, labels=labels)
    fresh.set_epoch(3)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["image"], fresh[2]["image"])
    assert (
        first["index"] == 2 and first["image"].shape == (1, 32, 32) and first["image"].dtype == torch.float32
    )
    if labels:
        assert first["label"].shape == (32, 32) and first["label"].dtype == torch.long
        assert torch.equal(first["label"], fresh[2]["label"])
    ds.set_epoch(4)
    assert not torch.equal(ds[2]["image"], first["image"])
    other_seed = _dataset(make(32), seed=8, labels=labels)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed[2]["image"], first["image"])


def test_a_loader_key_carries_its_epoch_and_its_position_does_not_matter():
    ds = _dataset(_segment_every(32), seed=7)
    ds.set_epoch(3)
    by_index = ds[2]
    ds.set_epoch(0)  # a key needs no set_epoch: workers never see one
    for key in ((3, 0, 2), (3, 5, 2)):
        sample = ds[key]
        assert torch.equal(sample["image"], by_index["image"]) and torch.equal(sample["label"], by_index["label"])
        assert sample["index"] == 2
    assert not torch.equal(ds[(4, 0, 2)]["image"], by_index["image"])


def test_plain_callable_transform_is_seeded_without_touching_global_rng():
    def jitter(sample):
        return {**sample, "image": sample["image"] + torch.rand(1)}

    ds = _dataset(jitter, labels=False)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = ds[1]["image"]
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(ds[1]["image"], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a)


def test_without_transform_samples_are_the_arrays_and_batch():
    ds = _dataset(None)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["label"].shape == (2, 32, 32)
    assert torch.equal(batch["image"][1], torch.as_tensor(ds.images[1]))
    assert batch["index"].tolist() == [0, 1]


def test_label_count_must_match():
    with pytest.raises(AhmError, match="5 images but 4 labels"):
        ArrayDataset(np.zeros((5, 1, 8, 8), np.float32), np.zeros((4, 8, 8), np.int64))
