"""Simulated brain subjects: deterministic, lazily generated, different in anatomy and contrast, labels aligned
with the image, split by subject, readable by every command (`data check`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ahm.cli.app import _register, app
from ahm.config import DataConfig
from ahm.data import check_dataset, make_splits, open_dataset
from ahm.datasets.brain_subjects import (
    MARKER,
    MONTAGE,
    BrainSimulator,
    SimulationSettings,
    prepare_brain_subject_volumes,
    prepare_brain_subjects,
    subject_sides,
)
from ahm.errors import AhmError

SIZE = 64


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("subjects") / "set"
    seen: list[tuple[int, int]] = []
    summary = prepare_brain_subjects(out, subjects=5, seed=3, image_size=SIZE, slices_per_axis=2,
                                     progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (5, 5)
    return out, summary


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    prepare_brain_subjects(again, subjects=5, seed=3, image_size=SIZE, slices_per_axis=2)
    assert _digest(again) == _digest(out)
    other = tmp_path / "other"
    prepare_brain_subjects(other, subjects=5, seed=4, image_size=SIZE, slices_per_axis=2)
    assert (other / "images" / "sub00000__x00.png").read_bytes() != (out / "images" / "sub00000__x00.png").read_bytes()


def test_subject_k_alone_equals_subject_k_of_a_full_run(small):
    out, _ = small
    alone = BrainSimulator(seed=3, image_size=SIZE, slices_per_axis=2).subject(4)
    assert len(alone["slices"]) == 6
    for stem, (image, label) in alone["slices"].items():
        assert stem.startswith("sub00004__")
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{stem}.png")), image)
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{stem}.png")), label)


def test_layout_check_and_splits_by_subject(small):
    out, summary = small
    cfg = DataConfig(path=str(out))
    index = open_dataset(out, cfg)
    assert index.layout == "folder" and len(index.items) == 5 * 3 * 2
    assert index.class_names == {0: "background", 1: "grey matter", 2: "white matter"}
    report = check_dataset(out, cfg)
    assert not report.problems
    splits = make_splits(index, cfg)
    subject_of = {item.id: item.subject for item in index.items}
    sides = {name: {subject_of[i] for i in ids} for name, ids in splits.items()}
    assert sides == {"test": {"sub00000"}, "val": {"sub00001"}, "train": {"sub00002", "sub00003", "sub00004"}}
    assert summary["split_subjects"] == {"train": 3, "val": 1, "test": 1}
    info = json.loads((out / MARKER).read_text())
    assert info["simulated"] is True and info["labels"] == {"0": "background", "1": "grey matter",
                                                           "2": "white matter"}
    montage = np.asarray(Image.open(out / MONTAGE))
    assert montage.shape == (5 * SIZE, 6 * SIZE, 3)


def test_subjects_differ_in_anatomy_and_in_contrast():
    sim = BrainSimulator(seed=0, image_size=SIZE, slices_per_axis=2)
    subjects = [sim.subject(k) for k in range(6)]
    stem = "__y01"
    labels = [s["slices"][s["id"] + stem][1] for s in subjects]
    # Anatomy: the label maps of one slice position disagree on a sizeable share of the brain.
    for a, b in zip(labels, labels[1:]):
        brain = (a > 0) | (b > 0)
        assert (a != b)[brain].mean() > 0.15
    # Contrast: the grey/white mean intensity ratio varies between subjects, and some draw the mixture contrast.
    ratios = []
    for s in subjects:
        image, label = s["slices"][s["id"] + stem]
        ratios.append(image[label == 1].mean() / image[label == 2].mean())
    assert max(ratios) - min(ratios) > 0.2
    more = [sim.subject(k)["contrast"] for k in range(6, 20)] + [s["contrast"] for s in subjects]
    assert {"gmm", "t1-remap"} <= set(more)


def test_labels_are_aligned_with_the_image():
    # With a plain T1 contrast (identity-like curve, no bias, no noise) intensities sort background < grey < white.
    settings = SimulationSettings(gmm_share=0.0, remap_concentration=1e6, bias_sd=0.0, noise_sd=(0.0, 0.0),
                                  blur_px=(0.0, 0.0))
    for k in range(3):
        sub = BrainSimulator(seed=k, image_size=SIZE, slices_per_axis=2, settings=settings).subject(0)
        for image, label in sub["slices"].values():
            means = [image[label == c].mean() for c in (0, 1, 2)]
            assert means[0] + 20 < means[1] < means[2] - 20
    # Under any contrast, each class's intensities are far more alike within it than across classes.
    sub = BrainSimulator(seed=0, image_size=SIZE, slices_per_axis=2).subject(1)
    image, label = sub["slices"]["sub00001__z01"]
    inside = [image[label == c].astype(float) for c in (1, 2)]
    assert abs(inside[0].mean() - inside[1].mean()) > 0.5 * max(inside[0].std(), inside[1].std())


def test_sides_and_refusals(tmp_path):
    assert subject_sides(60) == ["test"] * 9 + ["val"] * 9 + ["train"] * 42
    assert subject_sides(1000, val=9, test=9)[:18] == subject_sides(60)[:18]
    with pytest.raises(AhmError, match="leave no training subject"):
        subject_sides(4, val=2, test=2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(AhmError, match="not an earlier brain-subjects set"):
        prepare_brain_subjects(busy, subjects=2, image_size=32, slices_per_axis=1)
    assert (busy / "mine.txt").read_text() == "keep"
    with pytest.raises(AhmError, match="simulation setting 'warp'"):
        SimulationSettings.from_dict({"warp": 3})


def test_cli_says_simulated_and_writes_the_set(tmp_path):
    _register()
    runner = CliRunner()
    shown = runner.invoke(app, ["data", "prepare", "brain-subjects", "--help"], terminal_width=200)
    assert shown.exit_code == 0 and "SIMULATED" in shown.output
    settings = tmp_path / "sim.yaml"
    settings.write_text("gmm_share: 1.0\n")
    result = runner.invoke(app, ["data", "prepare", "brain-subjects", "--out", str(tmp_path / "s"), "--subjects",
                                 "3", "--image-size", "32", "--slices-per-axis", "1", "--settings", str(settings)])
    assert result.exit_code == 0, result.output
    assert "3 simulated subjects" in result.output
    info = json.loads((tmp_path / "s" / MARKER).read_text())
    assert info["contrasts"] == {"t1-remap": 0, "gmm": 3} and info["settings"]["gmm_share"] == 1.0


def test_min_contrast_keeps_grey_and_white_matter_apart():
    clean = dict(bias_sd=0.0, noise_sd=(0.0, 0.0), blur_px=(0.0, 0.0))

    def separations(**settings) -> list[float]:
        sim = BrainSimulator(seed=0, image_size=SIZE, slices_per_axis=1, settings=SimulationSettings(**clean,
                                                                                                   **settings))
        out = []
        for k in range(20):
            image, label = sim.subject(k)["slices"][f"sub{k:05d}__z00"]
            out.append(abs(float(image[label == 1].mean()) - float(image[label == 2].mean())))
        return out

    assert min(separations()) > 20  # the default 0.2 of full scale, less partial volume
    assert min(separations(min_contrast=0.0)) < 20  # without it some draws leave the tissues nearly alike


VOL, MM = 32, 6.0  # a 192 mm field of view, as the slice set's default, at 6 mm


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("volumes") / "set"
    seen: list[tuple[int, int]] = []
    summary = prepare_brain_subject_volumes(out, subjects=4, seed=3, volume_size=VOL, spacing_mm=MM,
                                            image_size=VOL, slices_per_axis=1,
                                            progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4, 4)
    return out, summary


def test_volume_set_reads_in_3d_with_its_spacing_labels_and_subject_splits(volumes):
    import nibabel as nib

    from ahm.data.volumes import volume_dataset

    out, summary = volumes
    cfg = DataConfig(path=str(out), spatial_dims=3)
    index = open_dataset(out, cfg)
    assert index.layout == "msd" and index.modality == "mri" and index.label_values == [0, 1, 2]
    assert index.class_names == {0: "background", 1: "grey matter", 2: "white matter"}
    assert [(item.id, item.subject, item.spatial_dims) for item in index.items] == \
        [(f"sub{k:05d}", f"sub{k:05d}", 3) for k in range(4)]
    # The same subjects on the same sides as the slice set of 4 subjects.
    assert make_splits(index, cfg) == {"test": ["sub00000"], "val": ["sub00001"], "train": ["sub00002", "sub00003"]}
    assert summary["split_subjects"] == {"train": 2, "val": 1, "test": 1}
    image = nib.load(str(out / "imagesTr" / "sub00000.nii.gz"))
    label = nib.load(str(out / "labelsTr" / "sub00000.nii.gz"))
    assert image.shape == label.shape == (VOL, VOL, VOL)
    assert np.allclose(image.header.get_zooms(), (MM, MM, MM))
    assert np.allclose(image.affine, label.affine) and np.allclose(np.diag(image.affine)[:3], MM)
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["modality"] == {"0": "MRI"} and "SIMULATED" in meta["description"]
    sample = volume_dataset(index, ["sub00001"], cfg, labels=True, train=False)[0]
    assert sample["image"].ndim == 4 and set(np.unique(sample["label"].numpy())) == {0, 1, 2}
    report = check_dataset(out, cfg)
    assert not report.problems
    assert np.asarray(Image.open(out / MONTAGE)).shape == (4 * VOL, 6 * VOL, 3)


def test_a_volume_is_the_slice_sets_subject():
    # The slice set puts its one axial plane within 2 mm of the centre; the volume's two middle planes sit at
    # -3 and +3 mm. Same anatomy and scan: the labels mostly agree and the images correlate, far more than
    # with another subject's slice.
    sim = BrainSimulator(seed=3, image_size=VOL, slices_per_axis=1)
    for k in range(2):
        vol = sim.volume(k, VOL, MM)
        sub = sim.subject(k)
        assert vol["contrast"] == sub["contrast"] and vol["noise_sd"] == sub["noise_sd"]
        image, label = sub["slices"][f"sub{k:05d}__z00"]
        other = sim.subject(k + 1)["slices"][f"sub{k + 1:05d}__z00"][1]

        def agreement(a: np.ndarray, b: np.ndarray) -> float:
            brain = (a > 0) | (b > 0)
            return float((a == b)[brain].mean())

        planes = [(vol["image"][:, ::-1, z].T, vol["label"][:, ::-1, z].T) for z in (VOL // 2 - 1, VOL // 2)]
        assert max(agreement(lab, label) for _, lab in planes) > 0.75
        assert agreement(other, label) < 0.6
        assert max(np.corrcoef(img.ravel().astype(float), image.ravel())[0, 1] for img, _ in planes) > 0.9


def test_volumes_repeat_exactly_and_subjects_differ(volumes, tmp_path):
    out, _ = volumes
    again = tmp_path / "again"
    prepare_brain_subject_volumes(again, subjects=4, seed=3, volume_size=VOL, spacing_mm=MM, image_size=VOL,
                                  slices_per_axis=1)
    assert _digest(again) == _digest(out)
    sim = BrainSimulator(seed=3, image_size=VOL, slices_per_axis=1)
    a, b = sim.volume(0, VOL, MM)["label"], sim.volume(1, VOL, MM)["label"]
    assert (a != b)[(a > 0) | (b > 0)].mean() > 0.15
    with pytest.raises(AhmError, match="--volume-size"):
        prepare_brain_subject_volumes(tmp_path / "bad", subjects=2, volume_size=4)
    assert not (tmp_path / "bad").exists()


def test_cli_volumes_and_check_in_3d(tmp_path):
    _register()
    runner = CliRunner()
    shown = runner.invoke(app, ["data", "prepare", "brain-subjects", "--help"], terminal_width=200)
    assert "--volumes" in shown.output and "--volume-size" in shown.output
    target = tmp_path / "v"
    result = runner.invoke(app, ["data", "prepare", "brain-subjects", "--out", str(target), "--subjects", "3",
                                 "--volumes", "--volume-size", "24", "--spacing", "8", "--image-size", "32",
                                 "--slices-per-axis", "1"])
    assert result.exit_code == 0, result.output
    assert "3 simulated subjects as 3D volumes" in result.output
    checked = runner.invoke(app, ["data", "check", str(target), "--spatial-dims", "3"])
    assert checked.exit_code == 0, checked.output
