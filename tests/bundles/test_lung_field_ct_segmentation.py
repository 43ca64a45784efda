"""Tests of the lung_field_ct_segmentation bundle: input checks, learning, inference geometry, portability, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundles.conftest import (
    BUNDLES,
    assert_ddp_released_before_exit,
    bundle_scripts,
    ddp_release_probe,
    run_bundle,
)

BUNDLE = BUNDLES / "lung_field_ct_segmentation"
# Tiny settings for the tests' training runs: 4 mm pixels, 96 x 96 slices, few slices per volume.
TINY = {
    "pixdim": [4.0, 4.0],
    "slice_size": [96, 96],
    "train_size": [96, 96],
    "slices_per_volume": 4,
    "volumes_per_batch": 1,
    "num_workers": 0,
    "warmup_epochs": 1,
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _read_csv(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


def _nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def _ct_phantom(shape=(64, 64, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A body of soft tissue (40 HU) in air (-1000 HU) holding two lung boxes (-850 HU); (x, y, z)."""
    img = np.full(shape, -1000, np.int16)
    img[8:56, 12:52, :] = 40
    lung = np.zeros(shape, np.uint8)
    lung[12:30, 16:48, 2:10] = 1
    lung[34:52, 16:48, 2:10] = 1
    img[lung > 0] = -850
    return img, lung


# ---------------------------------------------------------------- bad input


def test_check_rejects_bad_input_with_file_name(tmp_path):
    """A 2D image, a volume without spacing, a non-CT range, an empty or wrong-size label each fail with the file named."""
    img, lung = _ct_phantom()
    good = _nifti(tmp_path / "good.nii.gz", img)
    good_lab = _nifti(tmp_path / "good_lung.nii.gz", lung)
    cases = {
        "2d": ({"image": _nifti(tmp_path / "slice2d.nii.gz", img[:, :, 5])}, "slice2d.nii.gz", "spatial dimension"),
        "no spacing": ({"image": tmp_path / "nospacing.npy"}, "nospacing.npy", "no voxel spacing"),
        "windowed": (
            {"image": _nifti(tmp_path / "windowed.nii.gz", ((img + 1000) / 1400).astype(np.float32))},
            "windowed.nii.gz",
            "not a CT in Hounsfield units",
        ),
        "empty label": (
            {"image": good, "label": _nifti(tmp_path / "empty.nii.gz", np.zeros_like(lung))},
            "empty.nii.gz",
            "label is empty",
        ),
        "wrong size": (
            {"image": good, "label": _nifti(tmp_path / "small.nii.gz", lung[:32])},
            "small.nii.gz",
            "differs from image",
        ),
    }
    np.save(tmp_path / "nospacing.npy", img)
    with bundle_scripts(BUNDLE) as scripts:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        preprocessing = parser.get_parsed_content("validate#preprocessing")
        ok = preprocessing({"image": str(good), "label": str(good_lab)})  # the good pair passes
        assert ok["image"].shape[1:3] == (32, 32)  # resampled to 2 mm in-plane, z kept
        for name, (item, fname, words) in cases.items():
            item = {k: str(v) for k, v in item.items()}
            if "label" not in item:
                item["label"] = str(good_lab)
            with pytest.raises(Exception) as info:
                if name in ("2d", "no spacing"):
                    # the inference pipeline has no label: check the image alone
                    parser_inf = ConfigParser()
                    parser_inf.read_config(str(BUNDLE / "configs" / "inference.json"))
                    parser_inf.get_parsed_content("preprocessing")({"image": item["image"]})
                else:
                    preprocessing(item)
            err = info.value
            while err is not None and not isinstance(err, scripts.InputError):
                err = err.__cause__
            assert err is not None, f"{name}: no InputError in the chain: {info.value!r}"
            assert fname in str(err) and words in str(err), f"{name}: {err}"


def test_slice_sampling_follows_lung_ratio():
    """RandCropByPosNegLabeld on SliceLabeld draws lung and no-lung slices in the configured pos:neg ratio."""
    from monai.transforms import RandCropByPosNegLabeld

    lab = torch.zeros(1, 16, 16, 40)
    lab[0, 4:12, 4:12, 10:20] = 1  # slices 10..19 hold lung, 30 slices do not
    with bundle_scripts(BUNDLE) as scripts:
        d = scripts.SliceLabeld(keys="label")({"label": lab})
    assert d["label_slice"].shape == lab.shape
    crop = RandCropByPosNegLabeld(["label"], "label_slice", [-1, -1, 1], pos=3, neg=1, num_samples=400)
    crop.set_random_state(0)
    samples = crop(d)
    has_lung = np.array([float(s["label"].sum()) > 0 for s in samples])
    assert all(s["label"].shape == (1, 16, 16, 1) for s in samples)
    assert 0.65 < has_lung.mean() < 0.87  # 3:1 -> 75 % lung slices (uniform slices would give 25 %)


def test_gradient_clip_handler_bounds_the_step_gradient():
    """GradientClipHandler caps the total gradient norm seen by optimizer.step in a SupervisedTrainer."""
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents

    def run(clip: bool) -> float:
        torch.manual_seed(0)
        net = torch.nn.Conv2d(1, 2, 3, padding=1)
        data = [{"image": torch.randn(2, 1, 8, 8) * 100, "label": torch.randn(2, 2, 8, 8)}]
        trainer = SupervisedTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=data,
            network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
            loss_function=lambda p, t: ((p - t) ** 2).sum(),
        )
        norms = []
        if clip:
            with bundle_scripts(BUNDLE) as scripts:
                scripts.GradientClipHandler(max_norm=0.5).attach(trainer)
        trainer.add_event_handler(
            IterationEvents.BACKWARD_COMPLETED,
            lambda e: norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()])))),
        )
        trainer.run()
        return norms[0]

    assert run(clip=False) > 10.0
    assert run(clip=True) <= 0.5 + 1e-4


def test_keep_inside_body_removes_outside_air_keeps_lungs():
    """KeepInsideBodyd zeroes a prediction in the air around the body and under the table, and keeps the lungs."""
    img, lung = _ct_phantom()
    img[:, 58:60, :] = 200  # a table below the body, separated by an air gap
    scaled = torch.as_tensor(np.clip((img + 1000) / 1400, 0, 1), dtype=torch.float32)[None]
    pred = torch.ones_like(scaled)
    with bundle_scripts(BUNDLE) as scripts:
        out = scripts.KeepInsideBodyd(keys="pred", threshold=500 / 1400)({"image": scaled, "pred": pred})["pred"][0]
    assert out.shape == lung.shape
    assert bool(out[torch.as_tensor(lung) > 0].all())  # lungs (holes of the body) kept
    assert float(out[:, :10].sum()) == 0 and float(out[:, 53:].sum()) == 0  # air outside, gap and table gone
    assert float(out[20, 30, 5]) == 1  # body interior kept


def test_hd95_handler_reports_millimetres():
    """HausdorffDistanceMM reads the spacing from the affine: a 3-voxel shift at 2 mm is 6 mm, not 3."""
    from monai.data import MetaTensor

    lab = torch.zeros(2, 20, 20, 20)
    lab[1, 5:12, 5:12, 5:12] = 1
    pred = torch.roll(lab, 3, dims=1)
    lab[0], pred[0] = 1 - lab[1], 1 - pred[1]
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))
    with bundle_scripts(BUNDLE) as scripts:
        handler = scripts.HausdorffDistanceMM(include_background=False, percentile=95)
        handler.update([[MetaTensor(pred, affine=affine)], [MetaTensor(lab, affine=affine)]])
        assert float(handler.metric_fn.aggregate()) == pytest.approx(6.0)


# ---------------------------------------------------------------- learning, evaluation, inference


@pytest.fixture(scope="module")
def trained(lidc_demo_prepared, tmp_path_factory):
    """A short training run on fold 0 of the demo data, and evaluations of it and of its untrained start on fold 1."""
    root = tmp_path_factory.mktemp("lung_field")
    # the untrained start: the network as the config builds it
    with bundle_scripts(BUNDLE):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        torch.manual_seed(0)
        (root / "untrained").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / "untrained" / "model.pt")
    common = {"dataset_dir": str(lidc_demo_prepared), "val_fold": 1, **TINY}
    evaluate = ["configs/train.json", "configs/evaluate.json"]
    run_bundle(BUNDLE, evaluate, ckpt_dir=str(root / "untrained"), output_dir=str(root / "eval_before"), **common)
    # one validation, at the end, on fold 1: the saved model is the final one (no selection on the held-out fold)
    run_bundle(
        BUNDLE,
        ["configs/train.json"],
        ckpt_dir=str(root / "ckpt"),
        output_dir=str(root / "train_out"),
        train__trainer__max_epochs=12,
        val_interval=12,
        learning_rate=0.005,
        **common,
    )
    run_bundle(BUNDLE, evaluate, ckpt_dir=str(root / "ckpt"), output_dir=str(root / "eval_after"), **common)
    return root


@pytest.mark.slow
def test_short_training_beats_untrained_on_held_out_fold(trained, lidc_demo_prepared):
    """Training on fold 0 raises the per-volume Dice on held-out fold 1 well above the untrained network's."""

    def dice(folder):
        rows = _read_csv(trained / folder / "val_mean_dice_raw.csv")
        return {Path(r[0]).name: float(r[1]) for r in rows[1:]}

    before, after = dice("eval_before"), dice("eval_after")
    held_out = {
        Path(d["image"]).name
        for d in json.loads((lidc_demo_prepared / "datalist.json").read_text())["training"]
        if d["fold"] == 1
    }
    assert set(after) == held_out  # one row per held-out volume
    assert np.mean(list(after.values())) > np.mean(list(before.values())) + 0.2
    assert min(after.values()) > 0.7
    hd = _read_csv(trained / "eval_after" / "val_hd95_mm_raw.csv")
    assert len(hd) == len(held_out) + 1 and all(float(r[1]) > 0 for r in hd[1:])
    assert (trained / "train_out" / "tensorboard").is_dir() and any((trained / "train_out" / "tensorboard").iterdir())
    # the checkpoint is a plain state dict
    sd = torch.load(trained / "ckpt" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


@pytest.mark.slow
def test_inference_nifti_and_dicom_in_input_geometry(lidc_demo_prepared, tmp_path):
    """inference.json on a NIfTI file and a DICOM folder writes uint8 masks on each input's grid, at most two components."""
    from scipy import ndimage

    item = json.loads((lidc_demo_prepared / "datalist.json").read_text())["training"][0]
    nii = lidc_demo_prepared / item["image"]
    dicom = next(p.parent for p in (lidc_demo_prepared.parent / "dicom" / item["patient_id"]).rglob("*.dcm"))
    run_bundle(BUNDLE, ["configs/inference.json"], input_path=[str(nii), str(dicom)], output_dir=str(tmp_path))
    out_nii = nib.load(tmp_path / f"{item['case_id']}_lung.nii.gz")
    ref = nib.load(nii)
    assert out_nii.shape == ref.shape and np.allclose(out_nii.affine, ref.affine, atol=1e-4)
    mask = np.asarray(out_nii.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert ndimage.label(mask)[1] <= 2
    # the shipped model on a held-out demo scan agrees with data_prep's classical lung mask
    assert _dice(mask, np.asarray(nib.load(lidc_demo_prepared / item["lung"]).dataobj)) > 0.9
    # DICOM in: the output has the series' grid (512 x 512 x slices) and lies where the NIfTI's mask lies
    out_dcm = nib.load(tmp_path / f"{dicom.name}_lung.nii.gz")
    n_slices = len(list(dicom.glob("*.dcm")))
    assert out_dcm.shape == (512, 512, n_slices)
    pts = np.argwhere(np.asarray(out_dcm.dataobj) > 0)[::97]
    world = out_dcm.affine @ np.c_[pts, np.ones(len(pts))].T
    vox = np.rint(np.linalg.inv(out_nii.affine) @ world)[:3].astype(int).T
    inside = (vox >= 0).all(1) & (vox < mask.shape).all(1)
    assert inside.mean() > 0.95 and mask[tuple(vox[inside].T)].mean() > 0.9


# ---------------------------------------------------------------- inputs: a file, a folder or a list; formats


def _chest(shape=(6, 128, 128)) -> np.ndarray:
    """A chest-like CT in HU, (z, y, x): a body ellipse (40 HU) in air holding two lung ellipses (-850 HU), noise."""
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    body = ((xx - x / 2) / (0.44 * x)) ** 2 + ((yy - y / 2) / (0.34 * y)) ** 2 < 1
    img = np.where(body, 40.0, -1000.0)
    for cx in (0.31 * x, 0.69 * x):
        img[((xx - cx) / (0.16 * x)) ** 2 + ((yy - y / 2) / (0.24 * y)) ** 2 < 1] = -850.0
    img = np.repeat(img[None], z, axis=0) + np.random.default_rng(0).normal(0, 20, (z, y, x))
    return np.clip(img, -1024, 3071).astype(np.int16)


def _write_formats(folder: Path, hu: np.ndarray, spacing=(1.5, 1.5, 2.5), origin=(-96.0, -96.0, 10.0)) -> dict:
    """The same CT (z, y, x) written as NIfTI and MetaImage (SimpleITK) and as a DICOM series (pydicom)."""
    import SimpleITK as sitk

    from tests.conftest import write_ct_slice

    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(folder / "chest_a.nii.gz"))
    sitk.WriteImage(img, str(folder / "chest_b.mha"))
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(hu.shape[0]):
        write_ct_slice(
            folder / "1.2.840.1234.5" / f"{k:03d}.dcm", (hu[k] + 1024).astype(np.int16), origin[2] + k * spacing[2],
            series_uid=uid, pixel_spacing=spacing[0], origin_xy=origin[:2], instance=k + 1,
        )  # fmt: skip
    return {
        "chest_a": folder / "chest_a.nii.gz",
        "chest_b": folder / "chest_b.mha",
        "1.2.840.1234.5": folder / "1.2.840.1234.5",
    }


def _run_inference(input_path, out: Path) -> subprocess.CompletedProcess:
    """``monai.bundle run`` of inference.json from the bundle folder; the exit status is left to the test."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_path", input_path if isinstance(input_path, str) else json.dumps(input_path), "--output_dir", str(out)]  # fmt: skip
    return subprocess.run(
        cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""}
    )


def test_expand_inputs_file_folder_list_and_input_id(tmp_path):
    """A folder yields its CT files (not .raw, not other files) and DICOM subfolders, sorted; a DICOM folder is one
    input; a list expands each entry; a missing path or a folder without CT fails naming it; ids drop one extension."""
    import SimpleITK as sitk

    paths = _write_formats(tmp_path / "in", _chest((2, 16, 16)))
    sitk.WriteImage(sitk.GetImageFromArray(_chest((2, 16, 16))), str(tmp_path / "in" / "chest_c.mhd"))  # + .raw
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "empty").mkdir()
    with bundle_scripts(BUNDLE) as scripts:
        found = scripts.expand_inputs(str(tmp_path / "in"))
        assert [Path(p).name for p in found] == ["1.2.840.1234.5", "chest_a.nii.gz", "chest_b.mha", "chest_c.mhd"]
        dicom = str(paths["1.2.840.1234.5"])
        assert scripts.expand_inputs(dicom) == [dicom]
        listed = f"['{paths['chest_b']}', '{dicom}']"
        assert scripts.expand_inputs(listed) == scripts.expand_inputs([str(paths["chest_b"]), dicom])
        assert scripts.expand_inputs(listed) == [str(paths["chest_b"]), dicom]
        for bad, words in ((tmp_path / "nothere.nii.gz", "not found"), (tmp_path / "in" / "empty", "no CT input")):
            with pytest.raises(ValueError, match=words) as info:
                scripts.expand_inputs(str(bad))
            assert str(bad) in str(info.value)
        assert [scripts.input_id(p) for p in found] == ["1.2.840.1234.5", "chest_a", "chest_b", "chest_c"]
        assert scripts.input_id("/x/ct.v2.nii.gz") == "ct.v2" and scripts.input_id(dicom + "/") == "1.2.840.1234.5"


@pytest.mark.slow
def test_inference_on_a_folder_of_nifti_mha_and_dicom_one_output_each_all_agree(tmp_path):
    """inference.json on a folder holding a .nii.gz, a .mha and a DICOM series folder (one CT) writes exactly one mask
    per input, named from it, and the three masks are the same, on the same grid, and find both lungs."""
    from scipy import ndimage

    _write_formats(tmp_path / "in", _chest())
    proc = _run_inference(str(tmp_path / "in"), tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["1.2.840.1234.5_lung.nii.gz", "chest_a_lung.nii.gz", "chest_b_lung.nii.gz"]
    masks = [nib.load(tmp_path / "out" / n) for n in names]
    ref = np.asarray(masks[1].dataobj)
    assert ref.shape == (128, 128, 6) and ndimage.label(ref)[1] == 2 and ref.mean() > 0.1
    for m in masks:
        assert np.array_equal(np.asarray(m.dataobj), ref) and np.allclose(m.affine, masks[1].affine, atol=1e-4)


@pytest.mark.slow
def test_inference_list_refuses_bad_items_by_name_and_writes_the_others(tmp_path):
    """In a list, a 2D image, an unreadable .mha and a missing path are each logged as one line naming them, the good
    CT is still written, and the run exits non-zero with a one-line summary naming the three."""
    paths = _write_formats(tmp_path / "in", _chest())
    flat = _nifti(tmp_path / "flat.nii.gz", _chest((1, 64, 64))[0].T)
    broken = tmp_path / "broken.mha"
    broken.write_text("not an image")
    missing = tmp_path / "missing.nii.gz"
    proc = _run_inference([str(flat), str(paths["chest_a"]), str(broken), str(missing)], tmp_path / "out")
    assert proc.returncode != 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chest_a_lung.nii.gz"]
    for bad, words in ((flat, "spatial dimension"), (broken, "cannot be read"), (missing, "not found")):
        lines = [ln for ln in proc.stdout.splitlines() if f"ERROR - {bad}: " in ln]
        assert len(lines) == 1 and words in lines[0], f"{bad}: {lines}\n{proc.stdout[-3000:]}"
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("3 input(s) failed") and all(str(p) in summary for p in (flat, broken, missing))
    assert str(paths["chest_a"]) not in summary and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- bad input and faults (issue 35)


def _bad_ct(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A bad CT of ``kind`` in ``folder`` (the chest of ``_chest`` at 1.5 mm), and words its one line must hold."""
    hu = _chest((20, 128, 128)).transpose(2, 1, 0)  # (x, y, z)
    path = folder / f"{kind}.nii.gz"
    if kind in ("nan", "inf"):  # a 30 x 30 x 6 block in the air of a corner, away from the lungs
        img = hu.astype(np.float32)
        img[:30, :30, 6:12] = np.nan if kind == "nan" else np.inf
        return _nifti(path, img, (1.5, 1.5, 2.5)), [f"{30 * 30 * 6} of", "NaN or infinite", "slices 6-11"]
    if kind == "4d":
        return _nifti(path, np.stack([hu, hu], -1), (1.5, 1.5, 2.5)), ["2 channels or volumes", "one 3D CT"]
    if kind == "tiny":  # 15 x 15 mm of body in air: a network slice of 16 pixels would fail in instance norm
        tiny = np.full((10, 10, 4), -1000, np.int16)
        tiny[3:7, 3:7] = 40
        return _nifti(path, tiny, (1.5, 1.5, 2.5)), ["field of view 15 x 15 mm", "too small"]
    if kind == "truncated":
        data = _nifti(folder / "whole.nii.gz", hu, (1.5, 1.5, 2.5)).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, ["cannot be read", "truncated or corrupt"]
    if kind == "empty":
        path.write_bytes(b"")
        return path, ["cannot be read", "empty"]
    raise ValueError(kind)


BAD_CTS = ["nan", "inf", "4d", "tiny", "truncated", "empty"]


@pytest.mark.parametrize("kind", BAD_CTS)
def test_bad_ct_refused_by_preprocessing_in_one_line(kind, tmp_path):
    """NaN/inf voxels, a 4D file, a too small field of view, a cut or empty .nii.gz: inference.json's preprocessing
    raises an InputError of one line naming the file and the problem (before the network sees anything)."""
    path, words = _bad_ct(kind, tmp_path)
    with bundle_scripts(BUNDLE) as scripts:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.json"))
        with pytest.raises(Exception) as info:
            parser.get_parsed_content("preprocessing")({"image": str(path)})
        err = info.value
        while err is not None and not isinstance(err, scripts.InputError):
            err = err.__cause__
    assert err is not None, f"{kind}: no InputError in the chain: {info.value!r}"
    line = str(err)
    assert line.startswith(f"{path}: ") and "\n" not in line and all(w in line for w in words), line


@pytest.mark.slow
def test_bad_cts_in_a_list_each_refused_in_one_line_the_good_one_written(tmp_path):
    """A list of a good CT and NaN, 4D, tiny and truncated ones: one ERROR line per bad input naming it, no
    traceback, only the good mask written (a NaN block no longer drops lung slices silently), exit status 1."""
    bad = {k: _bad_ct(k, tmp_path) for k in ("nan", "4d", "tiny", "truncated")}
    good = _nifti(tmp_path / "good.nii.gz", _chest((20, 128, 128)).transpose(2, 1, 0), (1.5, 1.5, 2.5))
    listed = [str(bad["nan"][0]), str(good), *(str(p) for p, _ in list(bad.values())[1:])]
    proc = _run_inference(listed, tmp_path / "out")
    assert proc.returncode == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_lung.nii.gz"]
    for path, words in bad.values():
        lines = [ln for ln in proc.stdout.splitlines() if f"ERROR - {path}: " in ln]
        assert len(lines) == 1 and all(w in lines[0] for w in words), f"{path}: {lines}\n{proc.stdout[-3000:]}"
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("4 input(s) failed") and str(good) not in summary
    assert "Traceback" not in proc.stdout + proc.stderr


def _bad_checkpoint(kind: str, path: Path) -> list[str]:
    """Write a bad ``model.pt`` of ``kind`` at ``path``; the words its one line must hold."""
    good = (BUNDLE / "models" / "model.pt").read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tensor":
        torch.save(torch.zeros(3), path)
        return ["not a plain state dict", "Tensor"]
    if kind == "list":
        torch.save([torch.zeros(3)], path)
        return ["not a plain state dict", "list"]
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return ["truncated or corrupt"]
    if kind == "empty":
        path.write_bytes(b"")
        return ["empty file"]
    if kind == "other network":
        torch.save(torch.nn.Conv2d(1, 2, 3).state_dict(), path)
        return ["weights of another network", "missing"]
    if kind == "other shapes":  # the same UNet with other channels: same keys, other shapes
        from monai.networks.nets import UNet

        net = UNet(2, 1, 2, channels=(4, 8, 16, 32, 64), strides=(2, 2, 2, 2), num_res_units=2, norm="instance")
        torch.save(net.state_dict(), path)
        return ["weights of another network", "shape"]
    if kind == "pickle with code":
        torch.save({"model": torch.nn.Conv2d(1, 2, 3)}, path)
        return ["weights_only=True", "needs code", "torch.nn.modules.conv.Conv2d"]
    raise ValueError(kind)


BAD_CHECKPOINTS = ["tensor", "list", "truncated", "empty", "other network", "other shapes", "pickle with code"]


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoint_refused_in_one_line(kind, tmp_path):
    """A model.pt that is a tensor, a list, cut, empty, another network's weights or a pickle wanting code: the
    checkpoint loader of inference.json and of evaluate.json stops (SystemExit) with one line naming the file."""
    path = tmp_path / "models" / "model.pt"
    words = _bad_checkpoint(kind, path)
    with bundle_scripts(BUNDLE):
        from monai.bundle import ConfigParser

        for configs in (["inference.json"], ["train.json", "evaluate.json"]):
            parser = ConfigParser()
            parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
            parser["ckpt_dir"] = str(path.parent)
            before = {k: v.clone() for k, v in parser.get_parsed_content("network").state_dict().items()}
            with pytest.raises(SystemExit) as info:
                parser.get_parsed_content("checkpointloader")(None)
            line = str(info.value.code)
            assert line.startswith(f"{path}: ") and "\n" not in line and all(w in line for w in words), line
            after = parser.get_parsed_content("network").state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half loaded


@pytest.mark.slow
def test_bad_checkpoint_ends_inference_with_one_line(tmp_path):
    """monai.bundle run of inference.json with a model.pt that is a bare tensor exits 1 with one line naming it and no
    traceback."""
    _bad_checkpoint("tensor", tmp_path / "ckpt" / "model.pt")
    ct = _nifti(tmp_path / "ct.nii.gz", _chest((6, 64, 64)).transpose(2, 1, 0), (1.5, 1.5, 2.5))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input_path",
           str(ct), "--ckpt_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{tmp_path / 'ckpt' / 'model.pt'}: not a plain state dict")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_train_and_evaluate_name_every_bad_case_in_one_line_before_running(tmp_path):
    """A data list with a windowed (not HU), a NaN and a 4D case: training and evaluation each log one line per bad
    case, then stop with status 1 and a one-line summary naming them, before training or evaluating (no traceback,
    no checkpoint, no metrics)."""
    img, lung = _ct_phantom((64, 64, 12))
    folder = tmp_path / "prepared"
    windowed = ((img + 1000) / 1400).astype(np.float32)
    nan = img.astype(np.float32)
    nan[:8, :8, 4:6] = np.nan
    cases = {
        "good0": (img, None),
        "windowed": (windowed, "not a CT in Hounsfield units"),
        "good1": (img, None),
        "nan": (nan, "128 of 49152 voxels are NaN"),
        "fourd": (np.stack([img, img], -1), "2 channels or volumes"),
    }
    items = []
    for k, (case, (array, _)) in enumerate(cases.items()):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "lungs").mkdir(exist_ok=True)
        _nifti(folder / "images" / f"{case}.nii.gz", array)
        _nifti(folder / "lungs" / f"{case}.nii.gz", lung)
        items.append({"image": f"images/{case}.nii.gz", "lung": f"lungs/{case}.nii.gz", "case_id": case, "fold": k % 2})
    (folder / "datalist.json").write_text(json.dumps({"training": items}))
    ckpt = str(tmp_path / "ckpt")
    runs = {
        "evaluate": ["['configs/train.json','configs/evaluate.json']", "--val_fold", "-1"],
        "train": ["configs/train.json", "--val_fold", "-1", "--train#trainer#max_epochs", "1", "--ckpt_dir", ckpt],
    }
    for name, args in runs.items():
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", args[0], *args[1:], "--dataset_dir",
               str(folder), "--output_dir", str(tmp_path / name), "--num_workers", "0"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ""}
        proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out, f"{name}: {out[-3000:]}"
        for case, (_, words) in cases.items():
            lines = [ln for ln in proc.stdout.splitlines() if f"ERROR - {folder / 'images' / case}.nii.gz: " in ln]
            assert len(lines) == (1 if words else 0) and (not words or words in lines[0]), f"{name} {case}: {lines}"
        summary = proc.stderr.strip().splitlines()[-1]
        assert summary.startswith("3 case(s) of ") and "nothing was trained or evaluated" in summary, summary
        assert not (tmp_path / "ckpt").exists() and not (tmp_path / name / "metrics.csv").exists()


# ---------------------------------------------------------------- packaging (issue 8)


def test_verify_net_in_out_and_ckpt_export(tmp_path):
    """verify_net_in_out (MONAI's defaults) passes, 16 x 16 (below the stated minimum) fails, and the exported model.ts
    matches the eager network."""
    code = textwrap.dedent(
        f"""
        import torch
        from monai.bundle import ckpt_export, verify_net_in_out, ConfigParser
        verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json")
        ckpt_export(net_id="network_def", filepath={str(tmp_path / "model.ts")!r}, ckpt_file="models/model.pt",
                    meta_file="configs/metadata.json", config_file="configs/inference.json")
        p = ConfigParser(); p.read_config("configs/inference.json")
        net = p.get_parsed_content("network_def"); net.load_state_dict(torch.load("models/model.pt", weights_only=True)); net.eval()
        ts = torch.jit.load({str(tmp_path / "model.ts")!r})
        x = torch.rand(2, 1, 64, 80)
        with torch.no_grad():
            assert torch.allclose(net(x), ts(x), atol=1e-4)
            assert net(torch.rand(1, 1, 48, 32)).shape == (1, 2, 48, 32)  # any multiple of 16 from 32 on
            try:
                net(torch.rand(1, 1, 16, 16))  # below the metadata's 16*(n+1): instance norm on 1 x 1
            except ValueError:
                print("16 REFUSED")
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0 and "OK" in proc.stdout and "16 REFUSED" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "model.ts").stat().st_size > 100_000


def test_bundle_folder_alone_loads_and_predicts(tmp_path):
    """The bundle copied alone loads with ConfigParser, predicts one CT end to end, and its model.ts loads with metadata."""
    folder = tmp_path / "lung_field_ct_segmentation"
    shutil.copytree(BUNDLE, folder, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    img, lung = _ct_phantom((96, 96, 6))
    _nifti(tmp_path / "ct.nii.gz", img, spacing=(3.0, 3.0, 5.0))
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from monai.bundle import ConfigParser
        p = ConfigParser(); p.read_config("configs/inference.json"); p.read_meta("configs/metadata.json")
        p["input_path"] = {str(tmp_path / "ct.nii.gz")!r}; p["output_dir"] = {str(tmp_path / "out")!r}
        pre, net, inferer, post = (p.get_parsed_content(k) for k in ("preprocessing", "network", "inferer", "postprocessing"))
        net.load_state_dict(torch.load("models/model.pt", weights_only=True)); net.eval()
        d = pre({{"image": p["input_path"]}})
        with torch.no_grad():
            d["pred"] = inferer(d["image"][None], net)[0]
        d = post(d)
        print("PRED", tuple(d["pred"].shape))
        extra = {{"metadata.json": ""}}
        ts = torch.jit.load("models/model.ts", _extra_files=extra)
        meta = json.loads(extra["metadata.json"])
        print("META", meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"])
        print("DATA_PREP", "data_prep" in sys.modules)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PRED (1, 96, 96, 6)" in proc.stdout and "META lung" in proc.stdout and "DATA_PREP False" in proc.stdout
    assert nib.load(tmp_path / "out" / "ct_lung.nii.gz").shape == (96, 96, 6)


@pytest.mark.long
def test_torchrun_two_processes_cpu(lidc_demo_prepared, tmp_path):
    """torchrun --nproc_per_node=2 with multi_gpu_train.json trains one short epoch on CPU (gloo) to a checkpoint,
    and each rank frees its DDP wrapper before the interpreter shuts down."""
    configs = [
        str(BUNDLE / "configs" / "train.json"),
        str(BUNDLE / "configs" / "multi_gpu_train.json"),
        ddp_release_probe(BUNDLE, tmp_path),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--tee=3",
        "--master_port=29531",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(configs),
        "--dataset_dir",
        str(lidc_demo_prepared),
        "--ckpt_dir",
        str(tmp_path / "ckpt"),
        "--output_dir",
        str(tmp_path / "out"),
        "--train#trainer#max_epochs",
        "1",
        "--val_interval",
        "1",
    ]
    for k, v in TINY.items():
        cmd += [f"--{k}", json.dumps(v)]
    proc = subprocess.run(
        cmd,
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    sd = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # the DDP wrapper is not in the checkpoint
    assert_ddp_released_before_exit(proc.stdout)
