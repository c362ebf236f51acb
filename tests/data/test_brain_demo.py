"""The brain demo set: built offline from nilearn's template, labelled 0/1/2, split by slab with gaps."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from fixtures import snapshot
from PIL import Image
from typer.testing import CliRunner

from ahm.cli.app import _register, app
from ahm.config import DataConfig
from ahm.data import make_splits, open_dataset
from ahm.datasets import prepare_brain_demo
from ahm.datasets.brain_demo import GAP, plan_slabs
from ahm.errors import AhmError

STEM = re.compile(r"^ax(?P<axis>[012])s(?P<slab>\d\d)__(?P<slice>\d{3})$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("brain") / "demo"
    seen: list[tuple[int, int]] = []
    summary = prepare_brain_demo(out, image_size=64, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] == summary["images"]
    return out, summary


def test_writes_the_folder_layout_with_labels_0_1_2(demo):
    out, summary = demo
    images = sorted((out / "images").glob("*.png"))
    masks = sorted((out / "masks").glob("*.png"))
    assert len(images) == len(masks) == summary["images"] > 100
    assert [p.name for p in images] == [p.name for p in masks]
    assert all(STEM.match(p.stem) for p in images)
    assert {int(STEM.match(p.stem)["axis"]) for p in images} == {0, 1, 2}
    values: set[int] = set()
    for p in masks[::7]:
        mask = np.asarray(Image.open(p))
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        values |= set(np.unique(mask).tolist())
    assert values == {0, 1, 2}
    image = np.asarray(Image.open(images[len(images) // 2]))
    assert image.shape == (64, 64) and image.dtype == np.uint8 and image.max() > 100
    assert json.loads((out / "brain_demo.json").read_text())["labels"] == {
        "0": "background",
        "1": "grey matter",
        "2": "white matter",
    }


def test_splits_keep_slabs_whole_and_neighbouring_slices_apart(demo):
    out, summary = demo
    splits = json.loads((out / "splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == summary["splits"]
    assert all(summary["splits"][side] > 0 for side in ("train", "val", "test"))
    side_of_slab: dict[str, set[str]] = {}
    slices: dict[int, list[tuple[int, str]]] = {0: [], 1: [], 2: []}
    for side, stems in splits.items():
        for stem in stems:
            m = STEM.match(stem)
            side_of_slab.setdefault(stem.split("__")[0], set()).add(side)
            slices[int(m["axis"])].append((int(m["slice"]), side))
    assert all(len(sides) == 1 for sides in side_of_slab.values())
    for axis, entries in slices.items():
        entries.sort()
        assert len({k for k, _ in entries}) == len(entries)
        for (k1, s1), (k2, s2) in pairwise(entries):
            if s1 != s2:
                assert k2 - k1 > GAP, (axis, k1, s1, k2, s2)


def test_it_opens_as_a_folder_dataset_with_its_splits(demo):
    out, summary = demo
    index = open_dataset(out, DataConfig(image_size=64))
    assert index.layout == "folder" and index.has_labels and len(index.items) == summary["images"]
    splits = make_splits(index, DataConfig(split_seed=3))
    assert {k: len(v) for k, v in splits.items()} == summary["splits"]
    subject = {i.id: i.subject for i in index.items}
    assert all(re.fullmatch(r"ax[012]s\d\d", subject[i]) for i in splits["test"])


def test_plan_slabs_leaves_gaps():
    slabs = plan_slabs(list(range(10, 40)), slab_size=8, gap=2)
    assert slabs == [list(range(10, 18)), list(range(20, 28)), list(range(30, 38))]
    assert plan_slabs([]) == []


def test_refuses_an_unrelated_non_empty_folder(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    before = snapshot(tmp_path / "mine")
    with pytest.raises(AhmError, match=r"mine: folder is not empty and is not a previous brain demo"):
        prepare_brain_demo(tmp_path / "mine", image_size=64)
    _register()
    result = CliRunner().invoke(app, ["data", "prepare", "brain-demo", "--out", str(tmp_path / "mine")])
    assert result.exit_code != 0
    assert (
        "is not empty and is not a previous brain demo" in result.output and "Traceback" not in result.output
    )
    assert snapshot(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left behind


@pytest.mark.slow
def test_rebuilding_replaces_a_previous_demo(tmp_path: Path):
    out = tmp_path / "demo"
    prepare_brain_demo(out, image_size=32)
    (out / "images" / "stale.png").write_bytes(b"x")
    prepare_brain_demo(out, image_size=32)
    assert not (out / "images" / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.slow
def test_bundled_files_match_nilearn_loaders_offline():
    from ahm.datasets.brain_demo import read_bundled, read_with_loaders

    bundled, loaded = read_bundled(), read_with_loaders()
    assert bundled is not None
    for name in ("t1", "gm", "wm"):
        assert bundled[name].shape == loaded[name].shape == (197, 233, 189)
        scaled = bundled[name] / bundled[name].max()
        assert np.allclose(scaled, loaded[name] / loaded[name].max(), atol=1e-5), name


def test_labels_are_decided_on_the_model_grid_and_align_with_the_image(tmp_path, monkeypatch):
    # A synthetic template: a grey-matter core (T1 200) inside a white-matter shell (T1 100) inside background,
    # with boundaries that fall inside the pixels of the coarser model grid. A label must say what most of its
    # pixel's area is (area-averaged probabilities) and sit where the image shows that tissue, on every axis.
    from ahm.datasets import brain_demo

    shape = (41, 47, 53)
    gm = np.zeros(shape, np.float32)
    wm = np.zeros(shape, np.float32)
    wm[5:36, 6:41, 7:46] = 1.0
    wm[11:29, 13:33, 15:38] = 0.0
    gm[11:29, 13:33, 15:38] = 1.0
    t1 = 200.0 * gm + 100.0 * wm
    probs = np.stack([gm, wm])
    monkeypatch.setattr(brain_demo, "_load_template", lambda: (t1, probs, brain_demo.tissue_labels(probs)))
    out = tmp_path / "synthetic"
    prepare_brain_demo(out, image_size=32)
    assert json.loads((out / "brain_demo.json").read_text())["format"] == 2
    checked = 0
    for path in sorted((out / "images").glob("*.png")):
        image = np.asarray(Image.open(path)).astype(float)
        mask = np.asarray(Image.open(out / "masks" / path.name))
        # After scaling, grey is 255 and white 128; grey only borders white, white borders background, so the
        # area-averaged intensity tells each pixel's majority tissue.
        assert (mask[image >= 200] == 1).all(), path.name  # mostly grey
        assert (mask[(image >= 70) & (image <= 126)] == 2).all(), path.name  # mostly white, rest background
        assert (mask[image <= 58] == 0).all(), path.name  # mostly background
        checked += int((image >= 200).any())
    assert checked > 20


def test_acquisition_shift_is_a_fixed_per_slice_draw_that_keeps_the_background():
    from ahm.datasets.brain_demo import acquisition_shift

    image = np.zeros((48, 40), np.uint8)
    image[8:40, 6:34] = np.linspace(40, 220, 28, dtype=np.uint8)[None, :]
    a = acquisition_shift(image, "ax0s01__010")
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, acquisition_shift(image, "ax0s01__010"))  # same name, same draw
    b = acquisition_shift(image, "ax0s01__011")
    assert not np.array_equal(a, b)  # each slice its own acquisition
    assert (a[image == 0] == 0).all() and a.max() == 255  # no noise outside the head; full scale kept
    # Not a monotone remapping of the original: the bias field and noise make equal inputs differ.
    assert len(np.unique(a[8:40, 6][image[8:40, 6] == image[8, 6]])) > 1


def test_shifted_set_keeps_masks_and_splits_and_defeats_the_intensity_lookup(demo, tmp_path):
    from ahm.bench.baseline import run_baseline

    plain, _ = demo
    shifted = tmp_path / "shifted"
    _register()
    result = CliRunner().invoke(
        app, ["data", "prepare", "brain-demo", "--out", str(shifted), "--image-size", "64", "--shift"]
    )
    assert result.exit_code == 0, result.output
    assert "simulated acquisition shift" in result.output
    assert json.loads((shifted / "brain_demo.json").read_text())["shift"]["gamma"] == [0.6, 1.6]
    assert json.loads((plain / "brain_demo.json").read_text())["shift"] is None
    assert (shifted / "splits.json").read_text() == (plain / "splits.json").read_text()
    names = sorted(p.name for p in (plain / "masks").glob("*.png"))
    assert names == sorted(p.name for p in (shifted / "masks").glob("*.png"))
    changed = 0
    for name in names[::9]:
        assert (shifted / "masks" / name).read_bytes() == (plain / "masks" / name).read_bytes()
        changed += not np.array_equal(
            np.asarray(Image.open(shifted / "images" / name)), np.asarray(Image.open(plain / "images" / name))
        )
    assert changed == len(names[::9])
    floors = {
        name: run_baseline(path, 0.1, seeds=1, image_size=64)["summary"]["val_dice"]["mean"]
        for name, path in (("plain", plain), ("shifted", shifted))
    }
    assert floors["plain"] > 0.85 and floors["shifted"] < floors["plain"] - 0.08, floors


def test_lesion_variant_labels_small_lesions_in_about_a_third_of_the_slices(tmp_path: Path, demo):
    plain, _ = demo
    out = tmp_path / "lesions"
    summary = prepare_brain_demo(out, image_size=64, lesions=True)
    assert summary["labels"] == {"0": "background", "1": "lesion"}
    assert json.loads((out / "labels.json").read_text()) == {"0": "background", "1": "lesion"}
    index = open_dataset(out, DataConfig(path=str(out), image_size=64))
    assert index.class_names == {0: "background", 1: "lesion"}
    masks = {p.stem: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}
    assert set(np.unique(np.stack(list(masks.values()))).tolist()) == {0, 1}
    with_lesion = [stem for stem, m in masks.items() if m.any()]
    assert 0.2 < len(with_lesion) / len(masks) < 0.5
    sizes = [int(masks[s].sum()) for s in with_lesion]
    assert max(sizes) < 0.02 * 64 * 64  # a small structure: under 2% of a slice
    # same slices and splits as the tissue set; lesions are darker than the tissue they replace
    assert sorted(masks) == sorted(p.stem for p in (plain / "masks").glob("*.png"))
    assert json.loads((out / "splits.json").read_text()) == json.loads((plain / "splits.json").read_text())
    darker = []
    for stem in with_lesion[:10]:
        image = np.asarray(Image.open(out / "images" / f"{stem}.png")).astype(float)
        before = np.asarray(Image.open(plain / "images" / f"{stem}.png")).astype(float)
        darker.append(image[masks[stem] > 0].mean() < before[masks[stem] > 0].mean())
    assert all(darker)
    again = prepare_brain_demo(tmp_path / "again", image_size=64, lesions=True)
    assert again["splits"] == summary["splits"]
    assert all((np.asarray(Image.open(tmp_path / "again" / "masks" / f"{s}.png")) == m).all() for s, m in masks.items())
