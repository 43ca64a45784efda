"""End to end on the demo world: synth-lidc then lidc (two workers), checked against the phantom's truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.__main__ import main
from data_prep.ops.resample import Grid, resample_stack


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _truth_on_grid(truth_file, image_file):
    """A phantom truth mask (native slices, 512 x 512) resampled onto the prepared image's grid."""
    npz = np.load(truth_file)
    img = sitk.ReadImage(str(image_file))
    ps = float(npz["pixel_spacing"])
    grid = Grid(img.GetOrigin(), img.GetSpacing()[::-1], img.GetSize()[::-1])
    return resample_stack(npz["mask"].astype(np.float32), npz["z"], (-256 * ps, -256 * ps), (ps, ps), grid) >= 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two demo patients (solid and ground-glass nodules) generated and prepared through the CLI."""
    root = tmp_path_factory.mktemp("demo")
    ids = ["LIDC-IDRI-0001", "LIDC-IDRI-0497"]
    assert (
        main(
            [
                "synth-lidc",
                "--out",
                str(root / "dicom"),
                "--patient-ids",
                *ids,
                "--truth-out",
                str(root / "truth"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(["lidc", "--dicom-root", str(root / "dicom"), "--out", str(root / "out"), "--workers", "2", "--quiet"])
        == 0
    )
    return root, ids


def test_lung_masks_match_phantom_truth(demo):
    """The prepared lung masks agree with the phantom's true lung fields (Dice > 0.95) and leave out its trachea and main bronchi."""
    root, ids = demo
    for pid in ids:
        image = root / "out" / "images" / f"{pid}.nii.gz"
        lung = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / "labels" / "lungs" / f"{pid}.nii.gz"))) > 0
        truth = _truth_on_grid(root / "truth" / f"{pid}_lungs.npz", image)
        # trachea and main bronchi: airway lumen outside the true lung field
        central_airways = _truth_on_grid(root / "truth" / f"{pid}_airways.npz", image) & ~truth
        assert _dice(lung, truth) > 0.95, pid
        if central_airways.sum() > 100:
            assert (lung & central_airways).sum() < 0.2 * central_airways.sum(), pid


def test_nodule_masks_match_phantom_nodules_and_texture(demo):
    """Nodule labels land on the drawn nodules (Dice > 0.8); solid ones are dense, ground glass is not."""
    root, ids = demo
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    hu_inside = {}
    for pid in ids:
        image = root / "out" / "images" / f"{pid}.nii.gz"
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / "labels" / "nodules" / f"{pid}.nii.gz")))
        truth = _truth_on_grid(root / "truth" / f"{pid}_nodules.npz", image)
        assert _dice(label > 0, truth) > 0.8, pid
        hu_inside[pid] = hu[label > 0].mean()
        assert manifest["cases"][pid]["status"] == "ok"
    assert hu_inside["LIDC-IDRI-0001"] > -150  # solid (texture 5)
    assert -800 < hu_inside["LIDC-IDRI-0497"] < -350  # ground glass (texture 1)
