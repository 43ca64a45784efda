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

from tests.bundles.conftest import BUNDLES, assert_ddp_released_before_exit, bundle_scripts, ddp_release_probe, run_bundle

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
            device="cpu", max_epochs=1, train_data_loader=data, network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=lambda p, t: ((p - t) ** 2).sum(),
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
        BUNDLE, ["configs/train.json"], ckpt_dir=str(root / "ckpt"), output_dir=str(root / "train_out"),
        train__trainer__max_epochs=12, val_interval=12, learning_rate=0.005, **common,
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
    held_out = {Path(d["image"]).name for d in json.loads((lidc_demo_prepared / "datalist.json").read_text())["training"] if d["fold"] == 1}
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


# ---------------------------------------------------------------- packaging (issue 8)


def test_verify_net_in_out_and_ckpt_export(tmp_path):
    """verify_net_in_out passes and ckpt_export writes a TorchScript model that matches the eager network."""
    code = textwrap.dedent(
        f"""
        import torch
        from monai.bundle import ckpt_export, verify_net_in_out, ConfigParser
        verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json", n=12, device="cpu")
        ckpt_export(net_id="network_def", filepath={str(tmp_path / 'model.ts')!r}, ckpt_file="models/model.pt",
                    meta_file="configs/metadata.json", config_file="configs/inference.json")
        p = ConfigParser(); p.read_config("configs/inference.json")
        net = p.get_parsed_content("network_def"); net.load_state_dict(torch.load("models/model.pt", weights_only=True)); net.eval()
        ts = torch.jit.load({str(tmp_path / 'model.ts')!r})
        x = torch.rand(2, 1, 64, 80)
        with torch.no_grad():
            assert torch.allclose(net(x), ts(x), atol=1e-4)
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
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
        p["input_path"] = {str(tmp_path / 'ct.nii.gz')!r}; p["output_dir"] = {str(tmp_path / 'out')!r}
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
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PRED (1, 96, 96, 6)" in proc.stdout and "META lung" in proc.stdout and "DATA_PREP False" in proc.stdout
    assert nib.load(tmp_path / "out" / "ct_lung.nii.gz").shape == (96, 96, 6)


@pytest.mark.slow
def test_torchrun_two_processes_cpu(lidc_demo_prepared, tmp_path):
    """torchrun --nproc_per_node=2 with multi_gpu_train.json trains one short epoch on CPU (gloo) to a checkpoint,
    and each rank frees its DDP wrapper before the interpreter shuts down."""
    configs = [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "multi_gpu_train.json"), ddp_release_probe(BUNDLE, tmp_path)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--tee=3", "--master_port=29531", "-m", "monai.bundle", "run",
        "--config_file", json.dumps(configs),
        "--dataset_dir", str(lidc_demo_prepared), "--ckpt_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "out"),
        "--train#trainer#max_epochs", "1", "--val_interval", "1",
    ]
    for k, v in TINY.items():
        cmd += [f"--{k}", json.dumps(v)]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    sd = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # the DDP wrapper is not in the checkpoint
    assert_ddp_released_before_exit(proc.stdout)
