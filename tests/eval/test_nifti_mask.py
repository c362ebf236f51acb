"""`write_nifti_mask`: a mask written for a NIfTI volume reads back on the volume's grid, with its header."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ahm.errors import AhmError
from ahm.eval.predict import write_nifti_mask

OBLIQUE = np.array([[0.8, 0, 0, -10.0], [0, 1.2, 0.1, 20.0], [0, 0, 3.0, -5.5], [0, 0, 0, 1]])


def _reference(path: Path, shape=(9, 7, 5), channels: int | None = None) -> Path:
    """A scaled float volume whose qform (scanner) and sform (aligned) differ, as real scans' often do."""
    data = np.random.default_rng(0).normal(size=shape + ((channels,) if channels else ())).astype(np.float32)
    img = nib.Nifti1Image(data, OBLIQUE)
    qform = OBLIQUE.copy()
    qform[0, 3] = -9.0
    img.set_qform(qform, code=1)
    img.set_sform(OBLIQUE, code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(2.0, 5.0)
    nib.save(img, path)
    return path


def _mask(shape=(9, 7, 5)) -> np.ndarray:
    mask = np.zeros(shape, np.int64)
    mask[2:5, 1:4, 1:3] = 1
    mask[6:8, 4:6, 3:5] = 3
    return mask


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.nii"])
def test_mask_reads_back_with_the_reference_shape_affine_and_header(tmp_path: Path, name: str) -> None:
    ref_path = _reference(tmp_path / "scan.nii.gz")
    ref = nib.load(ref_path)
    mask = _mask()
    out = write_nifti_mask(mask, ref_path, tmp_path / name)
    back = nib.load(out)
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-6)
    for coded in ("get_qform", "get_sform"):
        matrix, code = getattr(back.header, coded)(coded=True)
        ref_matrix, ref_code = getattr(ref.header, coded)(coded=True)
        assert int(code) == int(ref_code)
        np.testing.assert_allclose(matrix, ref_matrix, atol=1e-6)
    assert back.header.get_xyzt_units() == ("mm", "sec")
    labels = np.asarray(back.dataobj)  # the reference's scl_slope 2 / inter 5 must not leak into the labels
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, mask)
    assert back.header.get_intent()[0] == "label"
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_a_loaded_image_or_a_bare_affine_can_be_the_reference(tmp_path: Path) -> None:
    ref = nib.load(_reference(tmp_path / "scan.nii"))
    np.testing.assert_allclose(nib.load(write_nifti_mask(_mask(), ref, tmp_path / "a.nii.gz")).affine, ref.affine,
                               atol=1e-6)
    back = nib.load(write_nifti_mask(_mask().astype(np.uint16), OBLIQUE, tmp_path / "b.nii.gz"))  # e.g. an NRRD
    np.testing.assert_allclose(back.affine, OBLIQUE, atol=1e-6)
    assert back.shape == (9, 7, 5) and back.header.get_xyzt_units()[0] == "mm"


def test_multichannel_reference_gets_a_3d_mask(tmp_path: Path) -> None:
    ref_path = _reference(tmp_path / "scan.nii.gz", channels=4)  # MSD BraTS-like: modalities along axis 4
    back = nib.load(write_nifti_mask(_mask(), ref_path, tmp_path / "m.nii.gz"))
    assert back.shape == (9, 7, 5)
    np.testing.assert_allclose(back.affine, nib.load(ref_path).affine, atol=1e-6)


def test_many_classes_widen_the_type(tmp_path: Path) -> None:
    mask = _mask()
    mask[0, 0, 0] = 300
    back = nib.load(write_nifti_mask(mask, OBLIQUE, tmp_path / "wide.nii.gz"))
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)


def test_refusals_name_the_problem_and_keep_the_old_file(tmp_path: Path) -> None:
    ref_path = _reference(tmp_path / "scan.nii.gz")
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"previous")
    with pytest.raises(AhmError, match="does not match its reference"):
        write_nifti_mask(_mask((9, 7, 4)), ref_path, out)
    with pytest.raises(AhmError, match="integer class indices"):
        write_nifti_mask(_mask().astype(np.float32), ref_path, out)
    with pytest.raises(AhmError, match="NIfTI file"):
        write_nifti_mask(_mask(), tmp_path / "scan.nrrd", out)
    with pytest.raises(AhmError, match="4x4 affine"):
        write_nifti_mask(_mask(), np.eye(3), out)
    assert out.read_bytes() == b"previous"
