"""`predict`: masks keep each input's geometry; bad inputs are refused one by one; nothing is clobbered."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from eval_helpers import make_run
from PIL import Image
from typer.testing import CliRunner

from ahm.errors import AhmError
from ahm.eval.predict import predict


@pytest.fixture(scope="module")
def run1(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "gray")


def _png(path: Path, h: int, w: int, channels: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w) if channels == 1 else (h, w, channels)).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_png_mask_keeps_original_size(run1: Path, tmp_path: Path) -> None:
    a = _png(tmp_path / "wide.png", 30, 47)
    b = _png(tmp_path / "tall.png", 50, 21, seed=1)
    result = predict(run1, [a, b], tmp_path / "out", overlay=True)
    assert result["n_ok"] == 2 and result["n_failed"] == 0
    for name, (h, w) in (("wide", (30, 47)), ("tall", (50, 21))):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert mask.shape == (h, w)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        overlay = Image.open(tmp_path / "out" / f"{name}_overlay.png")
        assert overlay.size == (w, h) and overlay.mode == "RGB"
    assert result["slices"] == 2


def test_batched_prediction_equals_one_by_one(run1: Path, tmp_path: Path) -> None:
    paths = [_png(tmp_path / f"i{k}.png", 32, 32, seed=k) for k in range(5)]
    predict(run1, paths, tmp_path / "batched", batch_size=4)
    predict(run1, paths, tmp_path / "single", batch_size=1)
    for p in paths:
        a = np.asarray(Image.open(tmp_path / "batched" / f"{p.stem}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "single" / f"{p.stem}_mask.png"))
        assert np.array_equal(a, b)


@pytest.mark.parametrize("axis", [2, 0])
def test_nifti_keeps_shape_and_affine(tmp_path: Path, axis: int) -> None:
    run = make_run(tmp_path / "run", slice_axis=axis)
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, size=(20, 26, 7)).astype(np.float32)
    affine = np.array([[0.8, 0, 0, -10.0], [0, 1.2, 0.1, 20.0], [0, 0, 3.0, -5.5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    result = predict(run, [tmp_path / "vol.nii.gz"], tmp_path / "out", overlay=True)
    assert result["n_ok"] == 1, result["failures"]
    assert result["slices"] == data.shape[axis]
    out = nib.load(tmp_path / "out" / "vol_mask.nii.gz")
    assert out.shape == data.shape
    assert np.allclose(out.affine, affine, atol=1e-5)
    labels = np.asarray(out.dataobj)
    assert labels.dtype.kind in "iu" and set(np.unique(labels).tolist()) <= {0, 1}
    assert (tmp_path / "out" / "vol_overlay.png").is_file()


def test_dicom_file_and_nrrd_volume_are_predicted(run1: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", 30, 41, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (30, 41)).astype(np.uint8).tobytes()
    ds.save_as(tmp_path / "xray.dcm", enforce_file_format=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).random((5, 24, 20))), str(tmp_path / "v.nrrd"))
    result = predict(run1, [tmp_path / "xray.dcm", tmp_path / "v.nrrd"], tmp_path / "out")
    assert result["n_ok"] == 2, result["failures"]
    assert np.asarray(Image.open(tmp_path / "out" / "xray_mask.png")).shape == (30, 41)
    assert nib.load(tmp_path / "out" / "v_mask.nii.gz").shape == (20, 24, 5)


def test_bad_inputs_are_listed_and_the_rest_continue(run1: Path, tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png", 20, 20)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    missing = tmp_path / "missing.png"
    result = predict(run1, [broken, good, missing], tmp_path / "out")
    assert result["n_ok"] == 1 and result["n_failed"] == 2
    assert result["failures"][0].startswith(str(broken))
    assert result["failures"][1].startswith(str(missing))
    assert (tmp_path / "out" / "good_mask.png").is_file()
    assert not (tmp_path / "out" / "broken_mask.png").exists()


def test_other_channel_count_is_refused(run1: Path, tmp_path: Path) -> None:
    rgb = _png(tmp_path / "rgb.png", 24, 24, channels=3)
    result = predict(run1, [rgb], tmp_path / "out")
    assert result["n_failed"] == 1
    assert "3 channel(s)" in result["failures"][0] and "trained on 1" in result["failures"][0]


def test_existing_outputs_need_force(run1: Path, tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png", 16, 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"user file")
    with pytest.raises(AhmError, match="--force"):
        predict(run1, [img], out)
    assert (out / "a_mask.png").read_bytes() == b"user file"
    predict(run1, [img], out, force=True)
    assert np.asarray(Image.open(out / "a_mask.png")).shape == (16, 16)


def test_same_names_from_two_folders_both_kept(run1: Path, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _png(tmp_path / "x" / "img.png", 16, 16)
    b = _png(tmp_path / "y" / "img.png", 18, 18)
    result = predict(run1, [a, b], tmp_path / "out")
    assert result["n_ok"] == 2
    assert np.asarray(Image.open(tmp_path / "out" / "img_2_mask.png")).shape == (18, 18)


def test_folder_input_expands_to_its_images(run1: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        _png(folder / f"f{k}.png", 16, 16, seed=k)
    (folder / "notes.txt").write_text("ignored")
    result = predict(run1, [folder], tmp_path / "out")
    assert result["n_inputs"] == 3 and result["n_ok"] == 3


def test_cli_exit_code_and_lines(run1: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    good = _png(tmp_path / "good.png", 16, 16)
    res = CliRunner().invoke(app, ["predict", str(run1), str(good), str(tmp_path / "nope.png"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "nope.png: file not found" in res.output
    assert "1 of 2 inputs" in res.output
    res = CliRunner().invoke(app, ["predict", str(run1), str(good), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--force" in res.output


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(AhmError, match="config.yaml"):
        predict(tmp_path, [tmp_path / "x.png"], tmp_path / "out")


def test_bf16_mixed_masks_match_float32(run1: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    images = [_png(tmp_path / f"in{k}.png", 24, 40, seed=k) for k in range(3)]
    full = predict(run1, images, tmp_path / "fp32")
    assert (full["device"], full["precision"]) == ("cpu", "32-true")
    _register()
    res = CliRunner().invoke(app, ["predict", str(run1), *map(str, images), "--out", str(tmp_path / "bf16"),
                                   "--precision", "bf16-mixed"])
    assert res.exit_code == 0, res.output
    assert "cpu, bf16-mixed" in res.output
    for k in range(3):
        a = np.asarray(Image.open(tmp_path / "fp32" / f"in{k}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "bf16" / f"in{k}_mask.png"))
        # bfloat16 flips only pixels whose two classes were within a few 1e-3 (about 0.05% on this run): 99% agreed
        # leaves room for twenty times that
        assert a.shape == b.shape and (a == b).mean() >= 0.99


def test_cli_refuses_16_mixed_on_the_cpu_and_an_unknown_accelerator(run1: Path, tmp_path: Path) -> None:
    from ahm.cli.app import _register, app

    _register()
    good = _png(tmp_path / "good.png", 16, 16)
    res = CliRunner().invoke(app, ["predict", str(run1), str(good), "--out", str(tmp_path / "out"),
                                   "--precision", "16-mixed"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == ["error: --precision 16-mixed needs a GPU; on the CPU use bf16-mixed "
                                               "or 32-true"]
    res = CliRunner().invoke(app, ["predict", str(run1), str(good), "--out", str(tmp_path / "out"),
                                   "--accelerator", "tpu"])
    assert res.exit_code != 0 and res.output.strip() == "error: --accelerator tpu: choose auto, cpu or cuda"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where no GPU is")
def test_accelerator_cuda_without_a_gpu_is_refused(run1: Path, tmp_path: Path) -> None:
    with pytest.raises(AhmError, match="^--accelerator cuda: no CUDA GPU is available here"):
        predict(run1, [_png(tmp_path / "a.png", 16, 16)], tmp_path / "out", accelerator="cuda")
    assert not (tmp_path / "out").exists()
