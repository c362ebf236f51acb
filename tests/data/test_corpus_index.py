"""`ahm data index`: a manifest of several sources, counted from headers only, with every problem named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fixtures import make_folder_fixture, make_folder_volume_fixture, make_msd_fixture
from PIL import Image
from typer.testing import CliRunner

from ahm.cli.app import _register, app

_register()


def ahm(*args: str):
    return CliRunner().invoke(app, ["--quiet", *args])


def _corpus(tmp_path: Path) -> list[Path]:
    import SimpleITK as sitk
    from test_readers_dicom_file import _ramp
    from test_readers_dicom_file import _write as write_dicom

    photos = make_folder_fixture(tmp_path / "corpus" / "photos", masks=False, subjects=2, per_subject=2)
    heart = make_msd_fixture(tmp_path / "corpus" / "msd")  # 3 volumes of 24x20x5, MRI
    mixed = tmp_path / "elsewhere" / "mixed"
    (mixed / "images").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((7, 16, 12), np.int16)), str(mixed / "images" / "ct.mha"))
    write_dicom(mixed / "images" / "xray.dcm", _ramp(30, 20))
    return [photos, heart, mixed]


def test_index_counts_sources_from_headers_and_writes_a_manifest(tmp_path: Path):
    sources = _corpus(tmp_path)
    # A PNG whose pixel data is garbage but whose header is sound: indexing reads headers only, so it counts.
    good = (sources[0] / "images" / "p00__0.png").read_bytes()
    (sources[0] / "images" / "p00__0.png").write_bytes(good[:60] + b"\0" * (len(good) - 60))
    manifest_path = tmp_path / "corpus" / "corpus.json"
    result = ahm("data", "index", *map(str, sources), "--out", str(manifest_path))
    assert result.exit_code == 0, result.output
    manifest = json.loads(manifest_path.read_text())
    assert manifest["version"] == 1
    photos, heart, mixed = manifest["sources"]
    # Inside the manifest's folder: relative paths; outside it: absolute.
    assert photos["path"] == "photos" and heart["path"] == "msd/Task02_Heart"
    assert mixed["path"] == str(sources[2].resolve())
    assert photos["index"]["images"] == 4 and photos["index"]["volumes"] == 0
    assert photos["index"]["labelled"] is False and photos["index"]["sizes"] == {"40x48": 4}
    assert heart["modality"] == "mri" and heart["index"]["labelled"] is True
    assert (heart["index"]["volumes"], heart["index"]["slices"], heart["index"]["files"]) == (3, 15, 3)
    assert heart["index"]["sizes"] == {"24x20": 15}
    m = mixed["index"]
    assert (m["images"], m["volumes"], m["slices"], m["files"]) == (1, 1, 7, 2)
    assert m["sizes"] == {"30x20": 1, "12x16": 7} and m["channels"] == {"1": 8}
    t = manifest["totals"]
    assert (t["sources"], t["files"], t["samples"], t["problems"]) == (3, 9, 4 + 15 + 8, 0)
    assert t["modalities"] == {"mri": 15, "unknown": 12}
    assert "corpus: 3 source(s), 9 file(s), 27 2D samples" in result.output


def test_problems_are_listed_exit_1_and_skip_bad_exits_0(tmp_path: Path):
    vols = make_folder_volume_fixture(tmp_path / "vols", masks=False)
    data = (vols / "images" / "case0.nii.gz").read_bytes()
    import gzip

    (vols / "images" / "cut.nii").write_bytes(gzip.decompress(data)[:400])  # header needs more than 400 bytes
    rgb = make_folder_fixture(tmp_path / "mixed", masks=False, subjects=1, per_subject=1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb / "images" / "colour.png")
    out = tmp_path / "c.json"
    result = ahm("data", "index", str(vols), str(rgb), "--out", str(out))
    assert result.exit_code == 1
    manifest = json.loads(out.read_text())  # written all the same, problems inside
    problems = [p for s in manifest["sources"] for p in s["index"]["problems"]]
    assert any(p.startswith(str(vols / "images" / "cut.nii")) and "truncated" in p for p in problems), problems
    assert any("mixed channel counts (1 file(s) with 1, 1 file(s) with 3)" in p for p in problems), problems
    assert manifest["sources"][0]["index"]["volumes"] == 2  # the good volumes are still counted
    assert f"  - {vols / 'images' / 'cut.nii'}" in result.output
    again = ahm("data", "index", str(vols), "--out", str(out), "--skip-bad", "--force")
    assert again.exit_code == 0, again.output


def test_bad_arguments_are_one_line(tmp_path: Path):
    src = make_folder_fixture(tmp_path / "a", masks=False, subjects=1, per_subject=1)
    out = tmp_path / "c.json"
    out.write_text("{}")
    for args, message in (
        ((str(src), "--out", str(out)), "already exists; use --force"),
        ((str(src), str(src), "--out", str(tmp_path / "n.json")), "given twice"),
        ((str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.json")), "not found"),
    ):
        result = ahm("data", "index", *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert out.read_text() == "{}"  # nothing overwritten
    junk = tmp_path / "junk"
    (junk / "images").mkdir(parents=True)
    (junk / "images" / "x.png").write_bytes(b"not a png at all")
    result = ahm("data", "index", str(junk), "--out", str(tmp_path / "n.json"))
    assert result.exit_code == 2 and "the corpus holds no readable images (first problem: " in result.output
    assert not (tmp_path / "n.json").exists()


def test_spatial_dims_3_counts_whole_volumes_and_names_2d_files(tmp_path: Path):
    photos, heart, mixed = _corpus(tmp_path)
    out = tmp_path / "corpus" / "c3.json"
    result = ahm("data", "index", str(heart), str(mixed), "--spatial-dims", "3", "--out", str(out))
    assert result.exit_code == 1, result.output  # the single-frame DICOM has no slice spacing: a problem
    manifest = json.loads(out.read_text())
    assert manifest["spatial_dims"] == 3
    h, m = (s["index"] for s in manifest["sources"])
    assert (h["volumes"], h["slices"], h["samples"], h["files"]) == (3, 0, 3, 3)
    assert h["sizes"] == {"24x20x5": 3} and h["channels"] == {"1": 3} and h["problems"] == []
    assert (m["volumes"], m["images"], m["samples"]) == (1, 0, 1) and m["sizes"] == {"12x16x7": 1}
    assert len(m["problems"]) == 1 and "xray.dcm" in m["problems"][0] and "spacing" in m["problems"][0]
    assert manifest["totals"]["samples"] == 4 and manifest["totals"]["slices"] == 0
    assert "corpus: 2 source(s), 4 file(s), 4 3D samples (whole volumes)" in result.output
    assert "msd/Task02_Heart: msd, labelled, mri; 3 volume(s); 0 problem(s)" in result.output
    # The same sources in 2D count slices instead, and the DICOM image as one sample.
    flat = ahm("data", "index", str(heart), str(mixed), "--out", str(tmp_path / "c2.json"))
    assert flat.exit_code == 0 and json.loads((tmp_path / "c2.json").read_text())["totals"]["samples"] == 15 + 8
    # A corpus of 2D files only holds nothing to pretrain on in 3D: one line, nothing written.
    none = ahm("data", "index", str(photos), "--spatial-dims", "3", "--out", str(tmp_path / "n.json"))
    assert none.exit_code == 2 and str(photos) in none.output and "no voxel spacing" in none.output, none.output
    assert len(none.output.strip().splitlines()) == 1 and not (tmp_path / "n.json").exists()
    bad = ahm("data", "index", str(heart), "--spatial-dims", "4", "--out", str(tmp_path / "n.json"))
    assert bad.exit_code == 2 and "spatial_dims must be 2 or 3" in bad.output and len(bad.output.strip().splitlines()) == 1
