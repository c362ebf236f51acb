"""The 3D data path (data.spatial_dims 3): volumes kept whole, resampled, cropped, and inverted back."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fixtures import make_busi_fixture, make_folder_fixture, make_msd_volume_fixture, oblique_affine

from ahm.config import DataConfig, PretrainConfig
from ahm.data.layouts import open_dataset
from ahm.data.splits import make_splits
from ahm.data.volumes import (
    check_crop,
    input_grid,
    invert_prediction,
    preprocessed_spacing,
    volume_dataset,
)
from ahm.errors import AhmError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_msd_volume_fixture(tmp_path_factory.mktemp("msd3d"))


def _cfg(**kw) -> DataConfig:
    return DataConfig(spatial_dims=3, crop_size=(8, 8, 8), **kw)


def _all(task: Path, cfg: DataConfig, **kw):
    index = open_dataset(task, cfg)
    return index, volume_dataset(index, [item.id for item in index.items], cfg, **kw)


def test_msd_in_3d_lists_each_volume_once(task):
    index = open_dataset(task, _cfg())
    assert [item.id for item in index.items] == [f"ball_{n:03d}" for n in (1, 2, 3, 4, 5)]
    assert all(item.spatial_dims == 3 and item.slice is None and item.mask is not None for item in index.items)
    sliced = open_dataset(task, DataConfig())  # 2D: the same folder gives slices, as before
    assert len(sliced.items) == 5 * 10 and all(item.slice is not None for item in sliced.items)


def test_resampling_reorients_to_ras_at_the_target_spacing(task):
    index, dataset = _all(task, _cfg(spacing=(1.5, 1.5, 1.5)), labels=True, train=False)
    sample = dataset[0]
    assert preprocessed_spacing(sample) == pytest.approx((1.5, 1.5, 1.5))
    assert nib.aff2axcodes(sample["image"].affine.numpy()) == ("R", "A", "S")
    # The fixture's voxel axes run (i: -y, 1.2 mm), (j: +x, 0.8 mm), (k: -z, 3 mm); RAS puts j first.
    stored = nib.load(str(index.items[0].image)).shape  # (25, 30, 10)
    extent_ras = [(stored[1] - 1) * 0.8, (stored[0] - 1) * 1.2, (stored[2] - 1) * 3.0]
    for got, mm in zip(sample["image"].shape[1:], extent_ras):
        assert abs(got - (mm / 1.5 + 1)) <= 1
    assert sample["label"].shape == sample["image"].shape
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}
    # MRI: z-scored over the body (non-zero voxels); the background stays 0.
    body = sample["image"][sample["image"] != 0]
    assert abs(float(body.mean())) < 0.1 and abs(float(body.std()) - 1) < 0.1


def test_keeping_the_spacing_only_reorients(task):
    _, dataset = _all(task, _cfg(spacing=None), labels=False, train=False)
    sample = dataset[0]
    assert preprocessed_spacing(sample) == pytest.approx((0.8, 1.2, 3.0))
    assert tuple(sample["image"].shape[1:]) == (30, 25, 10)


@pytest.mark.parametrize("labels", [False, True])
def test_training_crops_have_the_configured_shape(task, labels):
    _, dataset = _all(task, DataConfig(spatial_dims=3, crop_size=(8, 12, 16)), labels=labels, train=True,
                      cache=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample["image"].shape == (1, 8, 12, 16) and sample["image"].dtype == torch.float32
            if labels:
                assert sample["label"].shape == (8, 12, 16) and sample["label"].dtype == torch.int64
                assert set(torch.unique(sample["label"]).tolist()) <= {0, 1}


def test_a_crop_larger_than_the_volume_is_padded_and_the_padding_undone(task):
    cfg = _cfg(spacing=(1.5, 1.5, 1.5)).model_copy(update={"crop_size": (24, 24, 24)})  # volumes are ~16x20x19
    index, train = _all(task, cfg, labels=True, train=True)
    assert train[0]["image"].shape == (1, 24, 24, 24)
    whole = volume_dataset(index, [index.items[0].id], cfg, labels=True, train=False)
    sample = whole[0]
    assert all(s >= 24 for s in sample["image"].shape[1:])
    back = invert_prediction(sample["label"], sample, whole.preprocess, nearest=True)
    assert tuple(back.shape[1:]) == nib.load(str(index.items[0].mask)).shape


def test_fine_tuning_crops_contain_foreground_at_the_configured_rate(task):
    rates = {}
    for ratio in (0.0, 0.5, 1.0):
        _, dataset = _all(task, _cfg(pos_neg_ratio=ratio), labels=True, train=True, cache=True)
        hits = []
        for epoch in range(8):
            dataset.set_epoch(epoch)
            hits += [bool(dataset[i]["label"].any()) for i in range(len(dataset))]
        rates[ratio] = float(np.mean(hits))
    assert rates[1.0] == 1.0  # a crop centred on a foreground voxel contains it
    # A background-centred crop still catches the ball at the rate seen with ratio 0.
    assert rates[0.0] < 0.6
    assert abs(rates[0.5] - (0.5 + 0.5 * rates[0.0])) <= 0.15


def test_same_seed_same_crop(task):
    _, a = _all(task, _cfg(), labels=True, train=True, seed=3)
    _, b = _all(task, _cfg(), labels=True, train=True, seed=3, cache=True)
    for i in range(3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], b[0]["image"])


def test_training_crops_leave_the_cached_volumes_as_they_were(task):
    """The augmentation gets the cached voxels themselves: it may neither write into them nor record itself in
    their metadata, and a crop the size of its volume is still a copy."""
    import copy

    cfg = _cfg(spacing=(1.5, 1.5, 1.5)).model_copy(update={"crop_size": (16, 16, 16)})  # volumes ~16x20x19
    _, cached = _all(task, cfg, labels=True, train=True, seed=3, cache=True)
    _, fresh = _all(task, cfg, labels=True, train=True, seed=3)
    cached.preload()
    before = copy.deepcopy(cached._cache)
    for epoch in range(3):
        for i in range(len(cached)):
            sample = cached[(epoch, 0, i)]
            fresh.set_epoch(epoch)
            again = fresh[i]
            assert torch.equal(sample["image"], again["image"]) and torch.equal(sample["label"], again["label"])
            sample["image"].fill_(7.0)  # a later in-place step of the caller's
    for i, volume in before.items():
        for key, value in volume.items():
            now = cached._cache[i][key]
            assert torch.equal(now.as_tensor(), value.as_tensor()), (i, key)
            assert repr(now.applied_operations) == repr(value.applied_operations) and repr(now.meta) == repr(value.meta)


def test_inverse_returns_the_input_grid_and_labels(task):
    stored = nib.load(str(task / "labelsTr" / "ball_002.nii.gz"))
    truth = np.asarray(stored.dataobj)
    for spacing in (None, (1.5, 1.5, 1.5)):
        cfg = _cfg(spacing=spacing)
        index = open_dataset(task, cfg)
        dataset = volume_dataset(index, ["ball_002"], cfg, labels=True, train=False)
        sample = dataset[0]
        affine, shape = input_grid(sample)
        assert shape == truth.shape and np.allclose(affine, stored.affine)
        back = invert_prediction(sample["label"], sample, dataset.preprocess, nearest=True)
        assert tuple(back.shape) == (1, *truth.shape)
        assert np.allclose(back.affine.numpy(), stored.affine)
        agree = back[0].numpy() == truth
        if spacing is None:  # reorientation and padding only: exact
            assert agree.all()
        else:  # nearest there and back on another grid: the ball's edge may move by a voxel
            inter = float(((back[0].numpy() == 1) & (truth == 1)).sum())
            assert agree.mean() > 0.97 and 2 * inter / ((back[0].numpy() == 1).sum() + truth.sum()) > 0.6
        # A two-channel soft prediction is inverted linearly, channels kept.
        probs = torch.cat([1 - sample["label"], sample["label"]]).float()
        soft = invert_prediction(probs, sample, dataset.preprocess)
        assert tuple(soft.shape) == (2, *truth.shape) and np.allclose(soft.affine.numpy(), stored.affine)


def test_inverse_refuses_a_prediction_of_another_shape(task):
    _, dataset = _all(task, _cfg(), labels=False, train=False)
    sample = dataset[0]
    with pytest.raises(AhmError, match="does not match"):
        invert_prediction(torch.zeros(1, 5, 5, 5), sample, dataset.preprocess)


def test_ct_is_clipped_to_its_window_and_scaled(tmp_path):
    root = tmp_path / "ct"
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / "images").mkdir(parents=True, exist_ok=True)
        data = rng.uniform(-3000, 3000, (10, 12, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, oblique_affine()), str(root / "images" / f"s{k}.nii.gz"))
    cfg = _cfg(modality="ct", ct_window=(-500.0, 500.0), spacing=None)
    index, dataset = _all(root, cfg, labels=False, train=False)
    image = dataset[0]["image"]
    inside = image[image != 0]
    assert float(inside.min()) >= 0.0 and float(inside.max()) <= 1.0
    assert float((image == 1.0).float().mean()) > 0.2  # the clipped bright end


def test_splits_move_whole_subjects_in_3d(tmp_path):
    root = tmp_path / "folder3d"
    rng = np.random.default_rng(1)
    for s in range(6):
        for visit in ("a", "b"):
            data = rng.random((8, 8, 4)).astype(np.float32) + 1
            for sub, arr in (("images", data), ("masks", (data > 1.5).astype(np.uint8))):
                (root / sub).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(arr, oblique_affine()), str(root / sub / f"p{s}__{visit}.nii.gz"))
    cfg = _cfg(val_fraction=0.3, test_fraction=0.3)
    index = open_dataset(root, cfg)
    assert len(index.items) == 12 and all(item.spatial_dims == 3 for item in index.items)
    splits = make_splits(index, cfg)
    subject = {item.id: item.subject for item in index.items}
    sides = {name: {subject[i] for i in ids} for name, ids in splits.items()}
    assert all(sides[a].isdisjoint(sides[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    assert sum(len(ids) for ids in splits.values()) == 12 and all(sides.values())


def test_3d_corpus_streams_crops_the_same_with_workers_cache_and_preload(task, tmp_path):
    from ahm.data.corpus import open_corpus, pretraining_loader

    batches, entries = [], set()
    for preload, cache, workers in (("no", None, 0), ("no", str(tmp_path / "c"), 1), ("no", str(tmp_path / "c"), 0),
                                    ("yes", None, 0)):
        cfg = PretrainConfig(data={"path": str(task), "spatial_dims": 3, "crop_size": [8, 8, 8]},
                             train={"batch_size": 2, "workers": workers}, preload=preload, cache=cache,
                             all_splits=True)
        corpus = open_corpus(cfg)
        assert len(corpus) == 5 and corpus.spatial_dims == 3
        _, loader, problems = pretraining_loader(corpus, cfg, 0, 3)
        got = []
        for batch in loader:
            got.append(batch["image"])
            entries.update(batch["entry"])
        assert not problems and all(b.shape == (2, 1, 8, 8, 8) for b in got)
        batches.append(got)
    for other in batches[1:]:
        assert all(torch.equal(x, y) for x, y in zip(batches[0], other))
    assert len(list((tmp_path / "c").glob("volumes-*/*.npy"))) == len(entries)  # one file per volume drawn


# ------------------------------------------------------------------------------------------ refusals


def test_a_2d_layout_is_refused_in_3d(tmp_path):
    root = make_busi_fixture(tmp_path / "busi")
    with pytest.raises(AhmError, match=r"data.spatial_dims 3: layout 'busi'"):
        open_dataset(root, _cfg())


def test_2d_files_have_no_spacing_in_3d(tmp_path):
    root = make_folder_fixture(tmp_path / "pngs")
    with pytest.raises(AhmError, match=r"p00__0\.png: a 2D image has no voxel spacing"):
        open_dataset(root, _cfg())


def test_a_dicom_series_without_pixel_spacing_is_refused(tmp_path):
    import pydicom
    from reader_samples import write_dicom_series

    root = tmp_path / "dicom"
    series = root / "images" / "case0"
    for path in write_dicom_series(series, np.zeros((3, 6, 5), np.int16)):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    with pytest.raises(AhmError, match=r"case0: the DICOM series has no PixelSpacing"):
        open_dataset(root, _cfg())


def _frames(k: int = 4) -> np.ndarray:
    return np.stack([np.full((6, 5), 100 * (j + 1), np.int16) for j in range(k)])


_GEOMETRY = dict(ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, 0])


@pytest.mark.parametrize("fields,why", [
    (dict(SliceThickness=2.0, **_GEOMETRY), "no PixelSpacing > 0"),
    (dict(PixelSpacing=[0.0, 0.5], SliceThickness=2.0, **_GEOMETRY), "no PixelSpacing > 0"),
    (dict(PixelSpacing=[0.5, 0.5], **_GEOMETRY), "no slice step"),
    (dict(PixelSpacing=[0.5, 0.5], SliceThickness=0.0, **_GEOMETRY), "no slice step"),
])
def test_a_multiframe_dicom_without_voxel_size_is_refused_in_3d_and_read_in_2d(tmp_path, fields, why):
    from reader_samples import write_dicom_frames

    root = tmp_path / "mf"
    path = write_dicom_frames(root / "images" / "vol.dcm", _frames(), **fields)
    with pytest.raises(AhmError, match=rf"vol\.dcm: the multi-frame DICOM file .*{why}") as info:
        open_dataset(root, _cfg())
    assert "\n" not in str(info.value)
    # Also when the path reaches the 3D reading another way than through a layout.
    from ahm.data.volumes import preprocess_volumes

    with pytest.raises(AhmError, match=why):
        preprocess_volumes(_cfg())({"image": path})
    # 2D is unchanged: the frames are slices, read as before.
    sliced = open_dataset(root, DataConfig())
    assert len(sliced.items) == 4


def test_a_multiframe_dicom_with_its_geometry_in_functional_groups_is_read_in_3d(tmp_path):
    from reader_samples import write_dicom_frames

    root = tmp_path / "mf"
    write_dicom_frames(root / "images" / "vol.dcm", _frames(),
                       PixelMeasuresSequence={"PixelSpacing": [0.5, 0.75], "SpacingBetweenSlices": 2.5},
                       PlaneOrientationSequence={"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]})
    _, dataset = _all(root, _cfg(spacing=None, orientation="LPS"), labels=False, train=False)
    # PixelSpacing is (rows, columns): x steps by the column spacing 0.75, y by the row spacing 0.5.
    assert preprocessed_spacing(dataset[0]) == pytest.approx((0.75, 0.5, 2.5))


@pytest.mark.parametrize("edit,why", [
    (lambda ds: setattr(ds, "PixelSpacing", [0.0, 0.0]), "no PixelSpacing > 0"),
    (lambda ds: (delattr(ds, "ImagePositionPatient"), delattr(ds, "SliceThickness")), "no slice step"),
    (lambda ds: (setattr(ds, "ImagePositionPatient", [0, 0, 0]), delattr(ds, "SliceThickness")),
     "no slice step"),  # every slice at one place: no distance between them
])
def test_a_dicom_series_without_voxel_size_is_refused_in_3d_and_read_in_2d(tmp_path, edit, why):
    import pydicom
    from reader_samples import write_dicom_series

    root = tmp_path / "dicom"
    for path in write_dicom_series(root / "images" / "case0", np.zeros((3, 6, 5), np.int16)):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)
    with pytest.raises(AhmError, match=rf"case0: the DICOM series .*{why}"):
        open_dataset(root, _cfg())
    assert len(open_dataset(root, DataConfig()).items) == 3


def test_a_dicom_series_without_positions_steps_by_its_slice_spacing(tmp_path):
    import pydicom
    from reader_samples import write_dicom_series

    root = tmp_path / "dicom"
    for path in write_dicom_series(root / "images" / "case0", np.zeros((3, 6, 5), np.int16), positions=False):
        ds = pydicom.dcmread(path)
        ds.SpacingBetweenSlices = 2.5  # the step between slices; SliceThickness (2) is how thick each is
        ds.save_as(path)
    _, dataset = _all(root, _cfg(modality="ct", spacing=None, orientation="LPS"), labels=False, train=False)
    assert preprocessed_spacing(dataset[0]) == pytest.approx((0.75, 0.5, 2.5))


def test_a_dicom_series_in_3d_is_one_ct_volume(tmp_path):
    from reader_samples import write_dicom_series

    root = tmp_path / "dicom"
    write_dicom_series(root / "images" / "case0", np.full((4, 6, 5), 1024, np.int16))
    cfg = _cfg(modality="ct", spacing=None)
    index, dataset = _all(root, cfg, labels=False, train=False)
    assert [item.id for item in index.items] == ["case0"]
    sample = dataset[0]
    assert input_grid(sample)[1] == (5, 6, 4)
    assert preprocessed_spacing(sample) == pytest.approx((0.75, 0.5, 2.0))


def test_crop_must_be_a_multiple_of_what_the_backbone_asks():
    check_crop(_cfg().model_copy(update={"crop_size": (32, 32, 16)}), 16)
    check_crop(_cfg().model_copy(update={"crop_size": (32, 32, 8)}), (16, 16, 8))
    with pytest.raises(AhmError, match=r"data.crop_size 32x32x20: every side must be a multiple of 16x16x16"):
        check_crop(_cfg().model_copy(update={"crop_size": (32, 32, 20)}), 16, "the patch size")


def test_a_2d_item_is_refused_by_the_3d_dataset(task):
    index = open_dataset(task, DataConfig())
    with pytest.raises(AhmError, match="a 2D item"):
        volume_dataset(index, [index.items[0].id], _cfg(), labels=False, train=True)


@pytest.mark.parametrize("field,value", [("orientation", "RAX"), ("spacing", (1.0, 0.0, 1.0)),
                                         ("crop_size", (8, 0, 8)), ("pos_neg_ratio", 1.5), ("spatial_dims", 4)])
def test_bad_3d_options_are_refused_naming_them(field, value):
    from ahm.config import build_config

    with pytest.raises(AhmError, match=field):
        build_config(DataConfig, overrides={field: value})


def test_data_check_reads_3d_volumes_whole(task):
    from ahm.data.check import check_dataset

    report = check_dataset(task, _cfg())
    assert report.ok and report.readable == 5 and report.volumes == 5
    assert set(report.sizes) == {"25x30x10", "26x30x10", "24x30x10"}
    assert report.label_values == [0, 1]


def test_an_nrrd_volume_in_3d_keeps_its_spacing(tmp_path):
    import SimpleITK as sitk

    root = tmp_path / "nrrd"
    (root / "images").mkdir(parents=True)
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4) + 1)  # z, y, x
    image.SetSpacing((0.7, 0.9, 2.0))
    sitk.WriteImage(image, str(root / "images" / "vol.nrrd"))
    cfg = _cfg(spacing=None, orientation="LPS")
    _, dataset = _all(root, cfg, labels=False, train=False)
    sample = dataset[0]
    assert preprocessed_spacing(sample) == pytest.approx((0.7, 0.9, 2.0))
    assert nib.aff2axcodes(sample["image"].affine.numpy()) == ("L", "P", "S")
    assert input_grid(sample)[1] == (4, 5, 6)


def test_whole_volumes_batch_through_the_evaluation_loader_and_invert(task):
    from monai.data import decollate_batch

    from ahm.data.volumes import evaluation_loader
    from ahm.pipeline import pipeline_for

    cfg = _cfg(spacing=(1.5, 1.5, 1.5))  # resampled and padded: every inverse step has work to do
    index, dataset = _all(task, cfg, labels=True, train=False)
    assert pipeline_for(cfg).normalization_rule(cfg, index) == "mri z-score"
    seen = []
    for batch in evaluation_loader(dataset):
        assert batch["image"].ndim == 5
        sample = decollate_batch(batch)[0]
        back = invert_prediction(sample["label"], sample, dataset.preprocess, nearest=True)
        stored = nib.load(str(index.by_id()[sample["id"]].mask))
        assert tuple(back.shape[1:]) == stored.shape and np.allclose(back.affine.numpy(), stored.affine)
        seen.append(sample["id"])
    assert seen == [item.id for item in index.items]


def test_torch_default_collate_is_refused_by_the_inverse_in_one_line(task, monkeypatch):
    from monai.data import MetaTensor, decollate_batch
    from torch.utils.data._utils.collate import default_collate_fn_map

    from ahm.data.volumes import evaluation_loader

    # list_data_collate teaches torch's default collate about MetaTensors for the rest of the process, once it
    # has run; a process (or loader worker) where it never ran merges the records, which is the case here.
    monkeypatch.delitem(default_collate_fn_map, MetaTensor, raising=False)
    cfg = _cfg(spacing=(1.5, 1.5, 1.5))
    index, dataset = _all(task, cfg, labels=True, train=False)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=1)))  # torch's default collate
    sample = decollate_batch(batch)[0]
    with pytest.raises(AhmError, match="merged by torch's default collate; .*evaluation_loader"):
        invert_prediction(sample["label"], sample, dataset.preprocess, nearest=True)
    batch = next(iter(evaluation_loader(dataset)))
    with pytest.raises(AhmError, match="the sample is a batch"):
        invert_prediction(batch["label"][0], batch, dataset.preprocess, nearest=True)
    _, train = _all(task, cfg, labels=True, train=True)
    with pytest.raises(AhmError, match="evaluation_loader: the dataset gives random training crops"):
        evaluation_loader(train)


# ------------------------------------------------------------------------------------------ label grid


def _labelled_pair(root: Path, label_affine: np.ndarray, label: np.ndarray | None = None) -> Path:
    image = (np.arange(8 * 9 * 5, dtype=np.float32).reshape(8, 9, 5) + 1)
    label = (image > 200).astype(np.uint8) if label is None else label
    for sub, arr, affine in (("images", image, oblique_affine()), ("masks", label, label_affine)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(root / sub / "case.nii.gz"))
    return root


def _shifted(dx: float) -> np.ndarray:
    affine = oblique_affine()
    affine[0, 3] += dx
    return affine


def _flipped() -> np.ndarray:
    # The same voxels stored the other way along the first axis: a label saved in another orientation.
    affine = oblique_affine()
    return affine @ np.array([[-1.0, 0, 0, 7], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("label_affine", [_shifted(2.0), _flipped()], ids=["origin", "orientation"])
def test_a_label_on_another_grid_than_its_image_is_refused_naming_both(tmp_path, label_affine):
    root = _labelled_pair(tmp_path / "set", label_affine)
    cfg = _cfg(spacing=None)
    index, dataset = _all(root, cfg, labels=True, train=False)
    with pytest.raises(AhmError) as info:
        dataset[0]
    message = str(info.value)
    assert message.startswith(str(root / "masks" / "case.nii.gz")) and str(root / "images" / "case.nii.gz") in message
    assert "another grid" in message and "\n" not in message


def test_a_label_grid_within_round_off_of_its_image_is_accepted(tmp_path):
    root = _labelled_pair(tmp_path / "set", _shifted(1e-4))  # far below a tenth of the 0.8 mm voxel
    _, dataset = _all(root, _cfg(spacing=None), labels=True, train=False)
    assert tuple(dataset[0]["label"].shape) == tuple(dataset[0]["image"].shape)
