"""`ahm data check` through the CLI: every bad input gives a line naming the file, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures import (
    ball_volume,
    make_folder_fixture,
    make_folder_volume_fixture,
    make_kvasir_fixture,
    make_lgg_fixture,
    make_msd_fixture,
    snapshot,
)
from PIL import Image
from typer.testing import CliRunner

from ahm.cli.app import _register, app

_register()


def ahm(*args: str):
    return CliRunner().invoke(app, ["--quiet", *args])


def _nii(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_check_reports_a_good_dataset(tmp_path: Path):
    root = make_lgg_fixture(tmp_path)
    result = ahm("data", "check", str(root))
    assert result.exit_code == 0, result.output
    assert "layout    lgg" in result.output
    assert "9 (9 readable), 3 subject(s)" in result.output
    assert "32x32 (9)" in result.output and "channels  3 (9)" in result.output
    assert "labels    [0, 1] (declared: [0, 1])" in result.output
    assert "problems  none" in result.output


def test_check_json(tmp_path: Path):
    root = make_folder_volume_fixture(tmp_path / "v")
    result = ahm("data", "check", str(root), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "folder" and report["volumes"] == 2 and report["items"] == 12
    assert report["label_values"] == [0, 1, 2]
    assert sum(report["class_balance"].values()) == pytest.approx(1.0)
    assert report["problems"] == []


def _truncated(root: Path) -> tuple[Path, str]:
    bad = root / "images" / "p01__0.png"
    bad.write_bytes(bad.read_bytes()[:70])
    return bad, "truncated or unreadable"


def _size_mismatch(root: Path) -> tuple[Path, str]:
    bad = root / "masks" / "p00__1.png"
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(bad)
    return bad, "mask size 12x12 does not match image p00__1.png size 40x48"


def _unpaired_mask(root: Path) -> tuple[Path, str]:
    (root / "images" / "p02__1.png").unlink()
    return root / "masks" / "p02__1.png", "mask without an image"


def _unpaired_image(root: Path) -> tuple[Path, str]:
    (root / "masks" / "p02__1.png").unlink()
    return root / "images" / "p02__1.png", "no mask for this image"


def _splits_escape(root: Path) -> tuple[Path, str]:
    (root / "splits.json").write_text(json.dumps({"train": ["../../etc/passwd"], "val": [], "test": []}))
    return root / "splits.json", "points outside the dataset folder"


@pytest.mark.parametrize(
    "spoil", [_truncated, _size_mismatch, _unpaired_mask, _unpaired_image, _splits_escape]
)
def test_check_names_each_bad_file(tmp_path: Path, spoil):
    root = make_folder_fixture(tmp_path / "set")
    bad, what = spoil(root)
    before = snapshot(root)
    result = ahm("data", "check", str(root))
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if str(bad) in line)
    assert what in line
    assert "Traceback" not in result.output
    assert snapshot(root) == before


def test_check_lists_every_problem_not_just_the_first(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "set")
    _truncated(root)
    _size_mismatch(root)
    (root / "images" / "x.docx").write_bytes(b"?")
    result = ahm("data", "check", str(root))
    assert result.exit_code == 1
    assert "problems  3" in result.output
    assert "p01__0.png" in result.output and "p00__1.png" in result.output and "x.docx" in result.output


def test_check_msd_labels_outside_declared_set_and_nan_voxels(tmp_path: Path):
    root = make_msd_fixture(tmp_path, cases=(3, 4, 5))
    labels = ball_volume(np.random.default_rng(0), (24, 20, 5))[1]
    labels[3, 3, 2] = 4
    _nii(root / "labelsTr" / "la_004.nii.gz", labels)
    data = np.ones((24, 20, 5), np.float32)
    data[1, 1, 1] = np.inf
    _nii(root / "imagesTr" / "la_005.nii.gz", data)
    result = ahm("data", "check", str(root))
    assert result.exit_code == 1
    out = result.output
    assert (
        f"{root / 'labelsTr' / 'la_004.nii.gz'}: label values 4 are outside the set [0, 1] declared by "
        "dataset.json" in out.replace("\n", "")
    )
    assert f"{root / 'imagesTr' / 'la_005.nii.gz'}: contains NaN or infinite" in out.replace("\n", "")
    assert out.count("la_005.nii.gz") == 1  # one line per broken volume, not one per slice
    assert "Traceback" not in out


def test_check_msd_path_escaping_dataset_json(tmp_path: Path):
    root = make_msd_fixture(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = "/etc/passwd"
    (root / "dataset.json").write_text(json.dumps(meta))
    result = ahm("data", "check", str(root))
    assert result.exit_code == 1
    assert (
        f"{root / 'dataset.json'}: training[0].label '/etc/passwd' points outside the dataset folder"
        in result.output.replace("\n", "")
    )


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.mkdir(), "the dataset folder is empty"),
        (
            lambda p: (p / "misc").mkdir(parents=True) or (p / "misc" / "a.txt").write_text("x"),
            "no known dataset layout",
        ),
        (lambda p: None, "dataset folder not found"),
    ],
)
def test_fatal_problems_are_one_line_and_debug_shows_the_traceback(tmp_path: Path, setup, message):
    target = tmp_path / "data"
    setup(target)
    result = ahm("data", "check", str(target))
    assert result.exit_code == 2
    assert f"error: {target}: {message}" in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(app, ["--debug", "data", "check", str(target)])
    assert debug.exit_code == 2 and "Traceback" in debug.output


def test_skip_bad_turns_problems_into_a_warning_count(tmp_path: Path):
    root = make_kvasir_fixture(tmp_path)
    bad = root / "images" / "cju0qoxqj9q6s0835b43399p4.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    result = ahm("data", "check", str(root), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "warning: 1 bad file(s) would be skipped (2 of 3 images usable)" in result.output.replace(
        "\n", " "
    )
    assert str(bad) in result.output.replace("\n", "")


def test_check_in_3d_reads_whole_volumes_and_names_what_3d_refuses(tmp_path: Path):
    import pydicom
    from fixtures import make_msd_volume_fixture
    from reader_samples import write_dicom_series

    task = make_msd_volume_fixture(tmp_path / "msd")
    result = ahm("data", "check", str(task), "--spatial-dims", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["items"] == report["volumes"] == 5 and report["problems"] == []
    assert "25x30x10" in report["sizes"]  # whole volumes, not the slices the 2D check counts
    assert json.loads(ahm("data", "check", str(task), "--json").stdout)["items"] == 50

    pngs = make_folder_fixture(tmp_path / "pngs")
    assert ahm("data", "check", str(pngs)).exit_code == 0
    result = ahm("data", "check", str(pngs), "--spatial-dims", "3")
    assert result.exit_code == 2  # nothing left to check: one error line, the first problem named
    assert "p00__0.png: a 2D image has no voxel spacing" in result.output.replace("\n", "")

    dicom = tmp_path / "dicom"
    for path in write_dicom_series(dicom / "images" / "case0", np.zeros((3, 6, 5), np.int16)):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    assert ahm("data", "check", str(dicom)).exit_code == 0  # 2D reads the slices, as before
    result = ahm("data", "check", str(dicom), "--spatial-dims", "3")
    assert result.exit_code == 2
    assert "case0: the DICOM series has no PixelSpacing > 0" in result.output.replace("\n", "")
    assert "Traceback" not in result.output

    # One label saved on a shifted grid among good volumes: listed as a problem naming both files, exit 1.
    import nibabel as nib

    mixed = make_folder_volume_fixture(tmp_path / "mixed")
    label = mixed / "masks" / "case1.nii.gz"
    stored = nib.load(str(label))
    shifted = stored.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj), shifted), str(label))
    assert ahm("data", "check", str(mixed)).exit_code == 0  # 2D slices never compare the grids
    result = ahm("data", "check", str(mixed), "--spatial-dims", "3")
    text = result.output.replace("\n", "")
    assert result.exit_code == 1 and "images    2 (1 readable)" in text
    assert f"{label}: label volume lies on another grid than image volume {mixed / 'images' / 'case1.nii.gz'}" in text

    result = ahm("data", "check", str(task), "--spatial-dims", "4")
    assert result.exit_code == 2 and "spatial_dims" in result.output


def test_bad_option_is_named(tmp_path: Path):
    root = make_folder_fixture(tmp_path / "set")
    result = ahm("data", "check", str(root), "--slice-axis", "5")
    assert result.exit_code == 2 and "slice_axis must be 0, 1 or 2" in result.output
    result = ahm("data", "check", str(root), "--layout", "dicomish")
    assert result.exit_code == 2 and "unknown layout 'dicomish'" in result.output


def test_the_installed_command_runs(tmp_path: Path):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "ahm"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [str(exe), "data", "check", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "the dataset folder is empty" in proc.stderr and "Traceback" not in proc.stderr
