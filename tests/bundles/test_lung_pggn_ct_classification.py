"""Tests of the lung_pggn_ct_classification bundle: training beats chance on held-out folds (tabular,
image, fusion), evaluate/inference through ``monai.bundle run``, bad input, portability, multi-process."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.bundles.conftest import (
    BUNDLES,
    assert_ddp_released_before_exit,
    bundle_scripts,
    ddp_release_probe,
    run_bundle,
)

BUNDLE = BUNDLES / "lung_pggn_ct_classification"
TABULAR = ["configs/train.json", "configs/tabular.json"]
FUSION = ["configs/train.json", "configs/fusion.json"]
FEATURES = ["diameter_mm", "volume_mm3", "surface_area_mm2", "subtlety", "internal_structure", "calcification",
            "sphericity", "margin", "lobulation", "spiculation", "texture"]  # fmt: skip
SIZE = 16  # crop size in the tests (the shipped model takes 32)


def _write_table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _rows(n: int, seed: int) -> list[dict]:
    """Table rows whose malignant label follows size, spiculation and calcification (with noise); 3 patient-level folds."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        d = rng.uniform(4, 30)
        spic, calc = rng.integers(1, 6), rng.choice([3, 6])
        score = 0.25 * (d - 15) + 0.8 * (spic - 3) + (1.5 if calc == 6 else -1.5) + rng.normal(0, 1.0)
        row = {"nodule_id": f"N{i:03d}", "patient_id": f"P{i // 2:03d}", "fold": (i // 2) % 3, "diameter_mm": round(d, 2),
               "volume_mm3": round(np.pi / 6 * d**3, 1), "surface_area_mm2": round(np.pi * d**2, 1)}  # fmt: skip
        row.update({c: int(rng.integers(1, 6)) for c in FEATURES[3:]})
        row["internal_structure"] = min(row["internal_structure"], 4)  # LIDC's scale is 1-4
        row.update(
            spiculation=int(spic), calcification=int(calc), malignant=int(score > 0), ggn=int(rng.random() < 0.3)
        )
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A synthetic table (240 rows) and a crop table (48 rows: solid bright balls malignant, faint small ones benign)."""
    root = tmp_path_factory.mktemp("pggn")
    (root / "table").mkdir()
    _write_table(root / "table/pggn.csv", _rows(240, 0))
    crops = root / "crops"
    (crops / "bbox").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = _rows(48, 2)
    z, y, x = np.indices((SIZE,) * 3) - (SIZE - 1) / 2
    for r in rows:
        mal = r["malignant"]
        radius = rng.uniform(5, 7) if mal else rng.uniform(3, 5)
        hu = np.where(x**2 + y**2 + z**2 <= radius**2, rng.uniform(-50, 60) if mal else rng.uniform(-700, -550), -850)
        hu = (hu + rng.normal(0, 60, hu.shape)).astype(np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(hu), str(crops / f"bbox/{r['nodule_id']}.nii.gz"))
        r["image_bbox"] = f"bbox/{r['nodule_id']}.nii.gz"
    _write_table(crops / "pggn.csv", rows)
    return {"root": root, "table": root / "table", "crops": crops}


def _auc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


@pytest.fixture(scope="module")
def tabular_trained(data) -> dict:
    """The tabular variant trained briefly with ``monai.bundle run`` (fold 0 held out) and evaluated on it."""
    root = data["root"]
    ckpt, out = root / "ckpt", root / "eval_tabular"
    run_bundle(
        BUNDLE,
        TABULAR,
        dataset_dir=str(data["table"]),
        ckpt_dir=str(ckpt),
        output_dir=str(out),
        train__trainer__max_epochs=25,
    )
    run_bundle(
        BUNDLE,
        [*TABULAR, "configs/evaluate.json"],
        dataset_dir=str(data["table"]),
        ckpt_dir=str(ckpt),
        output_dir=str(out),
    )
    return {"ckpt": ckpt, "out": out}


def test_tabular_training_beats_untrained_on_held_out_fold(data, tabular_trained):
    """Tabular-only: the held-out-fold AUC of the trained model beats chance and the untrained network's; metrics files hold CI and calibration."""
    report = json.loads((tabular_trained["out"] / "metrics.json").read_text())["all"]
    with bundle_scripts(BUNDLE) as scripts:
        rows = scripts.table.read_table(str(data["table"] / "pggn.csv"), FEATURES, "malignant")
        train, val = scripts.table.split_rows(rows, 0)
        torch.manual_seed(0)
        net = scripts.networks.TabularClassifier(len(FEATURES), log_transform=[c in FEATURES[:3] for c in FEATURES])
        scripts.networks.prepare_for_training(net, train)
        with torch.no_grad():
            untrained = net.eval()(torch.stack([torch.as_tensor(r["features"]) for r in val]))[:, 0].numpy()
        untrained_auc = _auc([r["label"][0] for r in val], untrained)
    assert report["n"] == len(val)
    assert report["auc"] > 0.8 and report["auc"] > untrained_auc + 0.1, (report["auc"], untrained_auc)
    assert report["auc_ci_low"] <= report["auc"] <= report["auc_ci_high"]
    assert 0 <= report["sensitivity"] <= 1 and 0 <= report["brier"] < 0.25
    preds = list(csv.DictReader(open(tabular_trained["out"] / "predictions.csv")))
    assert abs(_auc([int(p["label"]) for p in preds], [float(p["probability"]) for p in preds]) - report["auc"]) < 1e-6
    assert {"all", "ggn"} <= {r["subset"] for r in csv.DictReader(open(tabular_trained["out"] / "metrics.csv"))}
    assert (tabular_trained["out"] / "calibration.csv").exists() and any(
        (tabular_trained["out"] / "tensorboard").iterdir()
    )


def test_tabular_inference_on_table_rows(data, tabular_trained, tmp_path):
    """Inference: table rows without labels in, one probability per row out (CSV), same as evaluation gave."""
    rows = list(csv.DictReader(open(data["table"] / "pggn.csv")))[:10]
    for r in rows:
        r.pop("malignant")
    _write_table(tmp_path / "rows.csv", rows)
    run_bundle(BUNDLE, ["configs/inference.json", "configs/tabular.json"], input_path=str(tmp_path / "rows.csv"),
               ckpt_dir=str(tabular_trained["ckpt"]), output_dir=str(tmp_path / "out"))  # fmt: skip
    preds = {p["id"]: float(p["probability"]) for p in csv.DictReader(open(tmp_path / "out/inference_predictions.csv"))}
    assert list(preds) == [r["nodule_id"] for r in rows]
    evaluated = {
        p["id"]: float(p["probability"]) for p in csv.DictReader(open(tabular_trained["out"] / "predictions.csv"))
    }
    shared = set(preds) & set(evaluated)
    assert shared and all(abs(preds[k] - evaluated[k]) < 1e-5 for k in shared)


def test_image_then_fusion_training_beat_chance_on_held_out_fold(data, tabular_trained, tmp_path):
    """Image-only and fusion (frozen encoders from both checkpoints) each reach a held-out AUC well above chance; encoders stay frozen."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tabular_trained["ckpt"], ckpt)
    common = dict(
        dataset_dir=str(data["crops"]), ckpt_dir=str(ckpt), spatial_size=[SIZE] * 3, batch_size=8, widen_factor=0.125
    )
    run_bundle(BUNDLE, ["configs/train.json"], output_dir=str(tmp_path / "img"), train__trainer__max_epochs=8,
               **{**common, "batch_size": 4, "learning_rate": 0.003})  # fmt: skip
    run_bundle(BUNDLE, ["configs/train.json", "configs/evaluate.json"], output_dir=str(tmp_path / "img"), **common)
    image_auc = json.loads((tmp_path / "img/metrics.json").read_text())["all"]["auc"]
    run_bundle(BUNDLE, FUSION, output_dir=str(tmp_path / "fus"), train__trainer__max_epochs=6, **common)
    run_bundle(BUNDLE, [*FUSION, "configs/evaluate.json"], output_dir=str(tmp_path / "fus"), **common)
    fusion_auc = json.loads((tmp_path / "fus/metrics.json").read_text())["all"]["auc"]
    assert image_auc > 0.75 and fusion_auc > 0.75, (image_auc, fusion_auc)
    fusion = torch.load(ckpt / "model_fusion.pt", weights_only=True)
    image = torch.load(ckpt / "model.pt", weights_only=True)
    tab = torch.load(ckpt / "model_tabular.pt", weights_only=True)
    assert all(torch.equal(fusion[f"image_net.{k}"], v) for k, v in image.items())
    assert all(torch.equal(fusion[f"tabular_net.{k}"], v) for k, v in tab.items())


def test_bad_input_gets_clear_messages(data, tmp_path):
    """Missing/extra columns, NaN, non-binary or one-class labels, a wrong crop size and a checkpoint of other features are refused by name."""
    rows = list(csv.DictReader(open(data["table"] / "pggn.csv")))
    with bundle_scripts(BUNDLE) as scripts:
        TableError = scripts.table.TableError
        missing = _write_table(
            tmp_path / "missing.csv", [{k: v for k, v in r.items() if k != "spiculation"} for r in rows]
        )
        with pytest.raises(TableError, match=r"missing.csv: missing column.*feature_columns: \['spiculation'\]"):
            scripts.table.read_table(str(missing), FEATURES, "malignant")
        with pytest.raises(TableError, match=r"extra column\(s\) \['ggn'\]"):
            scripts.table.read_table(str(data["table"] / "pggn.csv"), FEATURES, "malignant", allow_extra_columns=False)
        # the command line hands "false" over as a string, which must not read as true
        with pytest.raises(TableError, match=r"extra column\(s\) \['ggn'\]"):
            scripts.table.read_table(
                str(data["table"] / "pggn.csv"), FEATURES, "malignant", allow_extra_columns="false"
            )
        with pytest.raises(ValueError, match=r"allow_extra_columns: expected true or false, got 'maybe'"):
            scripts.table.read_table(
                str(data["table"] / "pggn.csv"), FEATURES, "malignant", allow_extra_columns="maybe"
            )
        nan = _write_table(tmp_path / "nan.csv", [dict(r, texture="nan") if i == 3 else r for i, r in enumerate(rows)])
        with pytest.raises(TableError, match=r"nan.csv: empty, NaN or non-numeric.*'texture' in N003"):
            scripts.table.read_table(str(nan), FEATURES, "malignant")
        two = _write_table(tmp_path / "two.csv", [dict(r, malignant=2) if i == 5 else r for i, r in enumerate(rows)])
        with pytest.raises(TableError, match=r"must hold 0 or 1.*N005='2'"):
            scripts.table.read_table(str(two), FEATURES, "malignant")
        one = _write_table(tmp_path / "one.csv", [dict(r, malignant=1) for r in rows])
        ok_rows = scripts.table.read_table(str(one), FEATURES, "malignant")
        with pytest.raises(TableError, match=r"one.csv: label column 'malignant' has only class 1"):
            scripts.table.split_rows(ok_rows, 0, str(one), "malignant")
        with pytest.raises(TableError, match="also in feature_columns"):
            scripts.table.read_table(str(data["table"] / "pggn.csv"), [*FEATURES, "malignant"], "malignant")
        check = scripts.transforms.CheckSpatialShaped(["image"], (32, 32, 32))
        from monai.data import MetaTensor

        img = MetaTensor(torch.zeros(1, 16, 16, 16), meta={"filename_or_obj": "/x/crop_17.nii.gz"})
        with pytest.raises(
            ValueError, match=r"crop /x/crop_17.nii.gz has spatial shape \(16, 16, 16\), the model takes \(32, 32, 32\)"
        ):
            check({"image": img})
        torch.save(scripts.networks.TabularClassifier(5).state_dict(), tmp_path / "t5.pt")
        with pytest.raises(ValueError, match="trained with 5 feature columns, the config lists 11"):
            scripts.checkpoint.load_weights(scripts.networks.TabularClassifier(11), str(tmp_path / "t5.pt"))


def test_metrics_against_sklearn():
    """AUC equals scikit-learn's (ties too); the Youden point separates separable data; Brier is the MSE."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1)
    tied = np.round(p, 1)  # many ties
    with bundle_scripts(BUNDLE) as scripts:
        r = scripts.metrics.binary_report(y, p, n_bootstrap=200)
        r_tied = scripts.metrics.binary_report(y, tied, n_bootstrap=0)
        sep = scripts.metrics.binary_report([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_bootstrap=10)
        with pytest.raises(ValueError, match="one class"):
            scripts.metrics.binary_report([1, 1], [0.2, 0.3])
    assert abs(r["auc"] - roc_auc_score(y, p)) <= 1e-16 and abs(r_tied["auc"] - roc_auc_score(y, tied)) <= 1e-16
    assert r["auc_ci_low"] < r["auc"] < r["auc_ci_high"]
    assert r["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert sum(b["n"] for b in r["calibration"]) == 300
    assert sep["sensitivity"] == sep["specificity"] == 1.0


def test_bundle_alone_loads_and_exports(tmp_path):
    """The bundle copied alone loads with ConfigParser (preprocessing, model.pt, postprocessing on a crop); verify_net_in_out, ckpt_export and model.ts work."""
    alone = tmp_path / "lung_pggn_ct_classification"
    shutil.copytree(BUNDLE, alone, ignore=shutil.ignore_patterns("eval", "__pycache__"))
    crop = np.random.default_rng(0).integers(-1000, 100, (32, 32, 32)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(crop), str(tmp_path / "crop.nii.gz"))
    code = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(alone)!r})
        from monai.bundle import ConfigParser
        p = ConfigParser(); p.read_config({str(alone / "configs/inference.json")!r})
        p["bundle_root"] = {str(alone)!r}
        data = p.get_parsed_content("preprocessing")({{"image": {str(tmp_path / "crop.nii.gz")!r}}})
        net = p.get_parsed_content("network_def")
        import scripts
        scripts.checkpoint.load_weights(net, {str(alone / "models/model.pt")!r})
        with torch.no_grad():
            pred = net.eval()(data["image"][None].float())
        out = p.get_parsed_content("postprocessing")({{"pred": pred[0]}})
        prob = float(out["pred"][0]); assert 0 <= prob <= 1, prob
        extra = {{"metadata.json": ""}}
        ts = torch.jit.load({str(alone / "models/model.ts")!r}, _extra_files=extra)
        assert "network_data_format" in json.loads(extra["metadata.json"])
        assert torch.allclose(ts(data["image"][None].float()), pred, atol=1e-4)
        print("OK", prob)
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    bundle = [sys.executable, "-m", "monai.bundle"]
    verify = subprocess.run([*bundle, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file",
                             "configs/inference.json"], cwd=alone, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert verify.returncode == 0 and "verified with no error" in verify.stdout + verify.stderr, verify.stderr[-2000:]
    export = subprocess.run([*bundle, "ckpt_export", "network_def", "--filepath", str(tmp_path / "m.ts"), "--ckpt_file", "models/model.pt",
                             "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"],
                            cwd=alone, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert export.returncode == 0 and (tmp_path / "m.ts").exists(), export.stderr[-2000:]


@pytest.mark.long
def test_torchrun_two_processes_train_a_checkpoint(data, tmp_path):
    """torchrun with 2 CPU processes (gloo, DistributedSampler) trains the tabular variant one epoch to a checkpoint,
    and each rank frees its DDP wrapper before the interpreter shuts down."""
    files = [str(BUNDLE / f) for f in [*TABULAR, "configs/multi_gpu_train.json"]] + [
        ddp_release_probe(BUNDLE, tmp_path)
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--tee=3", "--master_port=29563", "-m", "monai.bundle", "run",
           "--config_file", json.dumps(files), "--dataset_dir", str(data["table"]), "--ckpt_dir", str(tmp_path / "ckpt"),
           "--output_dir", str(tmp_path / "out"), "--train#trainer#max_epochs", "1"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONPATH": ""}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    state = torch.load(tmp_path / "ckpt/model_tabular.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state) and state["feature_mean"].shape == (len(FEATURES),)
    assert_ddp_released_before_exit(proc.stdout)


def _nodule_ct(shape=(36, 44, 48), spacing=(0.8, 0.8, 1.25), hu=-350.0, radii_mm=(5.0, 4.0, 6.0), noise=5.0, seed=0):
    """A lung-like CT (int16 HU, array (z, y, x), chest wall on one side) with one soft-edged ellipsoid nodule near
    its centre; returns the SimpleITK image, the nodule mask (z, y, x) and the nodule's world centre (x, y, z) mm."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    zyx_mm = np.indices(shape).astype(float) * np.asarray(spacing[::-1])[:, None, None, None]
    c = np.asarray(shape) / 2 * np.asarray(spacing[::-1]) + np.array([1.1, -2.3, 1.7])
    mask = sum(((g - ci) / r) ** 2 for g, ci, r in zip(zyx_mm, c, radii_mm[::-1])) <= 1
    arr = np.where(mask, hu, -860.0)
    arr[:, :, :6] = 40.0
    arr = gaussian_filter(arr, 0.8 / np.asarray(spacing[::-1])) + rng.normal(0, noise, shape)  # partial volume, noise
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin((-20.0, 12.0, 100.0))
    centre = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.argwhere(mask).mean(axis=0)[::-1]])
    return img, mask, centre


def _write_dicom_series(img: sitk.Image, folder: Path) -> None:
    """``img`` (identity direction, equal in-plane spacing) as a DICOM CT series, one file per slice."""
    from pydicom.uid import generate_uid

    from tests.conftest import write_ct_slice

    arr, uid = sitk.GetArrayFromImage(img), generate_uid()
    ox, oy, oz = img.GetOrigin()
    for k in range(arr.shape[0]):
        z = oz + k * img.GetSpacing()[2]
        write_ct_slice(folder / f"{k:03d}.dcm", arr[k] + 1024, z, series_uid=uid, instance=k + 1,
                       pixel_spacing=img.GetSpacing()[0], origin_xy=(ox, oy))  # fmt: skip


def _predictions(path: Path) -> dict[str, float]:
    return {r["id"]: float(r["probability"]) for r in csv.DictReader(open(path))}


def test_expand_inputs_and_input_ids(tmp_path, make_series):
    """A folder yields its image files and DICOM-series subfolders (sorted, .raw and others ignored); a DICOM
    folder is one input; ids drop the extension (.nii.gz as one); missing or empty inputs are named."""
    img, _, _ = _nodule_ct(shape=(4, 8, 8))
    for name in ("b.nii.gz", "a.mha", "c.nrrd"):
        sitk.WriteImage(img, str(tmp_path / name))
    (tmp_path / "a.raw").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("x")
    make_series("series_d", n=3)
    (tmp_path / "empty").mkdir()
    with bundle_scripts(BUNDLE) as scripts:
        expand, input_id = scripts.inputs.expand_inputs, scripts.inputs.input_id
        found = expand(str(tmp_path))
        assert [Path(f).name for f in found] == ["a.mha", "b.nii.gz", "c.nrrd", "series_d"]
        assert [input_id(f) for f in found] == ["a", "b", "c", "series_d"]
        assert expand(str(tmp_path / "series_d")) == [str(tmp_path / "series_d")]
        listed = expand(json.dumps([str(tmp_path / "b.nii.gz"), str(tmp_path / "series_d")]))
        python_list = f"['{tmp_path / 'b.nii.gz'}', '{tmp_path / 'series_d'}']"
        assert listed == expand(python_list) == [str(tmp_path / "b.nii.gz"), str(tmp_path / "series_d")]
        with pytest.raises(FileNotFoundError, match="nope.nii.gz: not found"):
            expand([str(tmp_path / "b.nii.gz"), str(tmp_path / "nope.nii.gz")])
        with pytest.raises(ValueError, match=r"empty: no image files"):
            expand(str(tmp_path / "empty"))


def test_inference_on_a_folder_of_nifti_mha_and_dicom(tmp_path):
    """A folder with a .nii.gz, a .mha and a DICOM series of the same nodule-centred CT gives one row each, named
    from the input, and the three probabilities agree."""
    img, _, _ = _nodule_ct(spacing=(0.8, 0.8, 1.0))
    folder = tmp_path / "inputs"
    folder.mkdir()
    sitk.WriteImage(img, str(folder / "scan_a.nii.gz"))
    sitk.WriteImage(img, str(folder / "scan_b.mha"))
    _write_dicom_series(img, folder / "scan_c")
    (folder / "readme.txt").write_text("not an image")
    run_bundle(BUNDLE, ["configs/inference.json"], input_path=str(folder), output_dir=str(tmp_path / "out"))
    preds = _predictions(tmp_path / "out/inference_predictions.csv")
    assert sorted(preds) == ["scan_a", "scan_b", "scan_c"]
    assert max(preds.values()) - min(preds.values()) < 1e-6, preds


def test_bad_item_in_a_list_is_refused_by_name(tmp_path):
    """In a list, an unreadable file and a 2-D image are each refused in one line naming them; the good input is
    written, and the run ends with status 1 and one line naming the refused ones, without a traceback."""
    img, _, _ = _nodule_ct()
    sitk.WriteImage(img, str(tmp_path / "good.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image at all")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.int16)), str(tmp_path / "flat.nii.gz"))
    inputs = [str(tmp_path / n) for n in ("good.nii.gz", "broken.nii.gz", "flat.nii.gz")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_path", json.dumps(inputs), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{inputs[1]}: LoadImage cannot find a suitable reader" in log, log[-3000:]
    assert f"{inputs[2]}: image of shape (1, 40, 40), the model takes one 3-D CT" in log, log[-3000:]
    summary = f"2 input(s) refused (the others were written): {inputs[1]}, {inputs[2]}"
    assert proc.stderr.strip().splitlines()[-1] == summary
    assert proc.returncode == 1 and "Traceback" not in log, log[-3000:]
    assert list(_predictions(tmp_path / "out/inference_predictions.csv")) == ["good"]


def test_nodule_centred_cube_gives_the_training_crop_result(tmp_path):
    """A 50 mm cube at 0.7 mm centred on a nodule (with its mask, or without) is cut and resampled inside the bundle
    to (nearly) the network input and the probability of the training-style 32^3 bounding-box crop of that nodule."""
    from data_prep.ops.nodule_crops import bbox_crop, fixed_crop

    img, mask, centre = _nodule_ct()
    folder, masks = tmp_path / "inputs", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    sitk.WriteImage(bbox_crop(img, mask, 32), str(folder / "crop.nii.gz"))
    cube = fixed_crop(img, centre, 50.0, 0.7)
    sitk.WriteImage(cube, str(folder / "cube.nii.gz"))
    sitk.WriteImage(cube, str(folder / "cube_no_mask.nii.gz"))
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_img.CopyInformation(img)
    cube_mask = sitk.Resample(mask_img, cube, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(cube_mask, str(masks / "cube.nii.gz"))
    with bundle_scripts(BUNDLE):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        pre = parser.get_parsed_content("preprocessing")
        crop = pre({"image": str(folder / "crop.nii.gz")})["image"]
        with_mask = pre({"image": str(folder / "cube.nii.gz"), "mask": str(masks / "cube.nii.gz")})["image"]
        without = pre({"image": str(folder / "cube_no_mask.nii.gz")})["image"]
    assert with_mask.shape == without.shape == crop.shape == (1, 32, 32, 32)
    # the window maps 1,424 HU to [0, 1]; here the crop rolled by 2 voxels differs by 0.023-0.028 on average, the box
    # 20% too large by 0.08, the whole cube resized to 32^3 by more; the estimated box (no mask) is within a voxel
    assert float((with_mask - crop).abs().mean()) < 0.02 and float((without - crop).abs().mean()) < 0.03
    run_bundle(BUNDLE, ["configs/inference.json"], input_path=str(folder), mask_path=str(masks),
               output_dir=str(tmp_path / "out"))  # fmt: skip
    preds = _predictions(tmp_path / "out/inference_predictions.csv")
    assert sorted(preds) == ["crop", "cube", "cube_no_mask"]
    assert abs(preds["cube"] - preds["crop"]) < 0.01 and abs(preds["cube_no_mask"] - preds["crop"]) < 0.01, preds


def test_training_kind_crop_input_is_unchanged(tmp_path):
    """A 32^3 crop of the training kind reaches the network exactly as in 0.1.2 (NibabelReader, no resampling)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged

    from data_prep.ops.nodule_crops import bbox_crop

    img, mask, _ = _nodule_ct(noise=40.0)
    sitk.WriteImage(bbox_crop(img, mask, 32), str(tmp_path / "crop.nii.gz"))
    old = Compose([
        LoadImaged(["image"], image_only=True, reader="NibabelReader"), EnsureChannelFirstd(["image"]),
        Orientationd(["image"], axcodes="RAS"), ScaleIntensityRanged(["image"], -1024, 400, 0.0, 1.0, clip=True),
    ])  # fmt: skip
    with bundle_scripts(BUNDLE):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        new = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "crop.nii.gz")})["image"]
    assert torch.equal(torch.as_tensor(new), old({"image": str(tmp_path / "crop.nii.gz")})["image"].as_tensor())


# --- bad input and faults (issue 35) ---


def _run_refused(config_files: list[str], **overrides) -> tuple[subprocess.CompletedProcess, str]:
    """``monai.bundle run`` expected to end non-zero: the process and its stdout + stderr."""
    files = [str(BUNDLE / c) for c in config_files]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files)]
    for key, value in overrides.items():
        cmd += [f"--{key.replace('__', '#')}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300, env=env)
    return proc, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("volume_mm3", "-5", r"volume_mm3 = -5 is outside \(0, 1.5e7\]"),
        ("volume_mm3", "0", r"volume_mm3 = 0 is outside \(0, 1.5e7\]"),
        ("diameter_mm", "1e30", r"diameter_mm = 1e30 is outside \(0, 300\]"),
        ("surface_area_mm2", "-inf", r"surface_area_mm2 is '-inf', not a finite number"),
        ("subtlety", "7", r"subtlety = 7 is outside \[1, 5\]"),
        ("texture", "0", r"texture = 0 is outside \[1, 5\]"),
        ("margin", "nan", r"margin is 'nan', not a finite number"),
    ],
)
def test_impossible_feature_values_are_refused_by_row_and_column(data, column, value, problem):
    """A non-finite or physically impossible feature value is refused by row id and column: at inference that row
    alone (the others go on), for training and evaluation the table, with a message naming that workflow."""
    rows = list(csv.DictReader(open(data["table"] / "pggn.csv")))[:12]
    rows[4][column] = value
    bad = _write_table(data["root"] / f"bad_{column}_{value}.csv", rows)
    with bundle_scripts(BUNDLE) as scripts:
        got = scripts.table.inference_rows(str(bad), FEATURES)
        for purpose in ("training", "evaluation"):
            expected = rf"bad_{column}_{value}.csv: .*'{column}'.*N004.*before {purpose}"
            with pytest.raises(scripts.table.TableError, match=expected):
                scripts.table.read_table(str(bad), FEATURES, "malignant", purpose=purpose)
    assert [r["id"] for r in got] == [r["nodule_id"] for r in rows]
    assert got[4]["input"] == f"{bad} [N004]" and re.fullmatch(problem + r".*", got[4]["error"]), got[4]
    assert all("error" not in r and r["features"].shape == (len(FEATURES),) for i, r in enumerate(got) if i != 4)


def test_tabular_inference_refuses_bad_rows_and_shared_ids_by_name(data, tmp_path):
    """Tabular inference with the shipped model: rows with impossible values and all rows of an id given twice are
    refused in one line each, by table and id; the other rows are written, each id once; the run ends with status 1
    and a one-line summary, no traceback."""
    rows = list(csv.DictReader(open(data["table"] / "pggn.csv")))[:6]
    for r in rows:
        r.pop("malignant")
    rows[1]["volume_mm3"], rows[2]["diameter_mm"] = "-5", "1e30"
    rows[4]["nodule_id"] = rows[3]["nodule_id"]  # N003 twice
    table = _write_table(tmp_path / "rows.csv", rows)
    proc, log = _run_refused(["configs/inference.json", "configs/tabular.json"], input_path=str(table),
                             output_dir=str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 1, log[-3000:]
    assert f"{table} [N001]: volume_mm3 = -5 is outside (0, 1.5e7]" in log
    assert f"{table} [N002]: diameter_mm = 1e30 is outside (0, 300]" in log
    assert f"{table} [N003]: nodule_id N003 is on lines 5, 6 of the table" in log
    assert "Traceback" not in log, log[-3000:]
    summary = f"3 input(s) refused (the others were written): {table} [N001], {table} [N002], {table} [N003]"
    assert proc.stderr.strip().splitlines()[-1] == summary
    assert list(_predictions(tmp_path / "out/inference_predictions.csv")) == ["N000", "N005"]


def test_table_rows_and_images_that_cannot_be_told_apart_or_found_are_refused(data, tmp_path):
    """At inference a table row whose crop is missing is refused by id, and images sharing an id (a.nii.gz, a.mha)
    are each refused naming the other; the rest go on."""
    rows = list(csv.DictReader(open(data["crops"] / "pggn.csv")))[:3]
    rows[1]["image_bbox"] = "bbox/gone.nii.gz"
    table = _write_table(data["crops"] / "missing_crop.csv", rows)
    img, _, _ = _nodule_ct(shape=(8, 8, 8))
    for name in ("a.nii.gz", "a.mha", "b.nii.gz"):
        sitk.WriteImage(img, str(tmp_path / name))
    with bundle_scripts(BUNDLE) as scripts:
        from_table = scripts.table.inference_rows(str(table), [], "image_bbox")
        from_images = scripts.table.inference_rows(str(tmp_path))
    assert from_table[1] == {
        "id": "N001",
        "input": f"{table} [N001]",
        "error": f"crop (column 'image_bbox') {data['crops'] / 'bbox/gone.nii.gz'} not found",
    }
    assert "error" not in from_table[0] and "error" not in from_table[2]
    assert [r.get("error", "") for r in from_images] == [
        f"its id 'a' is also the id of {tmp_path / 'a.nii.gz'}: outputs are named from it",
        f"its id 'a' is also the id of {tmp_path / 'a.mha'}: outputs are named from it", ""]  # fmt: skip


def _bad_images(folder: Path) -> dict[str, str]:
    """Bad inputs written into ``folder``: {file name: the problem expected after '<path>: '}."""
    img, _, _ = _nodule_ct()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    nan, shape = np.float32("nan"), (30, 30, 30)
    writes = {
        "flat.nii.gz": (np.zeros((40, 40), np.int16), r"image of shape \(1, 40, 40\), the model takes one 3-D CT"),
        "series4d.nii.gz": (np.zeros((3, 12, 12, 12), np.int16), r"image of shape \(1, 12, 12, 12, 3\), the model"),
        "all_nan.nii.gz": (np.full(shape, nan), r"27000 of 27000 voxels of the image are NaN or infinite"),
        "some_nan.mha": (np.where(np.indices(arr.shape)[0] < 5, nan, arr), r"\d+ of 76032 voxels of the image are NaN"),
        "nan_crop.nii.gz": (np.full((32, 32, 32), nan), r"32768 of 32768 voxels of the image are NaN"),
        "only_lung.nii.gz": (np.full(shape, -860, np.int16), r"nothing brighter than the lung at its centre"),
        "cut_nodule.nii.gz": (np.where(np.indices(shape)[0] < 4, -860, -350).astype(np.int16),
                              r"the nodule found at its centre reaches the region's edge, so the region does not"),
    }  # fmt: skip
    for name, (array, _) in writes.items():
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(folder / name))
    return {name: problem for name, (_, problem) in writes.items()}


BAD_IMAGES = ["flat.nii.gz", "series4d.nii.gz", "all_nan.nii.gz", "some_nan.mha", "nan_crop.nii.gz", "only_lung.nii.gz",
              "cut_nodule.nii.gz"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_is_refused_in_one_line_naming_it(tmp_path, name):
    """A 2-D or 4-D image, NaN voxels (all or some, NIfTI or MetaImage, region or training-kind crop), a region with
    nothing at its centre or a nodule cut by its edge: refused in one line naming the file, the good input goes on."""
    problems = _bad_images(tmp_path)
    img, _, _ = _nodule_ct()
    sitk.WriteImage(img, str(tmp_path / "good.nii.gz"))
    with bundle_scripts(BUNDLE) as scripts:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        items = [{"image": str(tmp_path / "good.nii.gz")}, {"image": str(tmp_path / name)}]
        ds = scripts.inputs.CheckedDataset(items, parser.get_parsed_content("preprocessing"))
        with pytest.raises(SystemExit, match=rf"1 input\(s\) refused \(the others were written\): {tmp_path / name}$"):
            ds.raise_if_failed()
    assert len(ds) == 1 and list(ds.failed) == [str(tmp_path / name)]
    assert re.fullmatch(problems[name] + r".*", ds.failed[str(tmp_path / name)]), ds.failed


def _checkpoints(folder: Path) -> dict[str, str]:
    """Bad ``model.pt`` files written into ``folder``: {file name: the problem expected after '<path> '}."""
    good = (BUNDLE / "models/model.pt").read_bytes()
    torch.save(torch.zeros(3), folder / "tensor.pt")
    torch.save([torch.zeros(3)], folder / "list.pt")
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"conv.weight": torch.zeros(2, 2)}, folder / "other_network.pt")
    torch.save({"x": print}, folder / "code.pt")  # a pickle that wants code to load
    return {
        "tensor.pt": r"holds a Tensor, not a state dict",
        "list.pt": r"holds a list, not a state dict",
        "truncated.pt": r"is not a readable PyTorch checkpoint \(truncated, or not written by torch.save\)",
        "empty.pt": r"is empty \(0 bytes\), not a checkpoint",
        "other_network.pt": r"does not belong to this network \(138 missing key\(s\).*1 unexpected",
        "code.pt": r"holds Python objects that need code to load \(GLOBAL print\); refused",
    }


@pytest.mark.parametrize("workflow", ["inference", "evaluation"])
def test_bad_checkpoint_is_refused_in_one_line_naming_it(data, tmp_path, workflow):
    """models/model.pt as a tensor, a list, a truncated or empty file, another network's weights or a pickle that wants
    code: the run's initialize ends it (SystemExit, status 1) with one line naming the checkpoint and the problem."""
    problems = _checkpoints(tmp_path)
    files = ["configs/inference.json"] if workflow == "inference" else ["configs/train.json", "configs/evaluate.json"]
    with bundle_scripts(BUNDLE):
        from monai.bundle import ConfigParser

        for name, problem in problems.items():
            parser = ConfigParser()
            parser.read_config([str(BUNDLE / f) for f in files])
            parser.update({"model_file": str(tmp_path / name), "dataset_dir": str(data["crops"])})
            with pytest.raises(SystemExit) as caught:
                parser.get_parsed_content("initialize")
            assert re.fullmatch(rf"model: {tmp_path / name} {problem}.*", str(caught.value)), str(caught.value)
            assert "\n" not in str(caught.value)


RUN_ENDS = ["empty folder", "missing input", "code checkpoint", "evaluation, truncated checkpoint",
            "evaluation, impossible value"]  # fmt: skip


@pytest.mark.parametrize("case", RUN_ENDS)
def test_run_that_cannot_go_on_ends_with_one_line(data, tmp_path, case):
    """An empty input folder, a missing input, a refused checkpoint (inference or evaluation) or an impossible table
    value in evaluation ends ``monai.bundle run`` with status 1 and one line naming it, without a traceback."""
    (tmp_path / "empty").mkdir()
    _checkpoints(tmp_path)
    img, _, _ = _nodule_ct()
    sitk.WriteImage(img, str(tmp_path / "good.nii.gz"))
    rows = list(csv.DictReader(open(data["table"] / "pggn.csv")))
    rows[7]["volume_mm3"] = "-5"
    bad = _write_table(tmp_path / "pggn.csv", rows)
    infer, evaluate = ["configs/inference.json"], [*TABULAR, "configs/evaluate.json"]
    good, code, truncated = (str(tmp_path / n) for n in ("good.nii.gz", "code.pt", "truncated.pt"))
    config, overrides, line = {
        "empty folder": (infer, {"input_path": str(tmp_path / "empty")}, f"{tmp_path / 'empty'}: no image files"),
        "missing input": (infer, {"input_path": str(tmp_path / "nope.mha")}, f"{tmp_path / 'nope.mha'}: not found"),
        "code checkpoint": (infer, {"input_path": good, "model_file": code},
                            f"model: {code} holds Python objects that need code to load"),
        "evaluation, truncated checkpoint": (evaluate, {"dataset_dir": str(data["table"]), "model_file": truncated},
                                             f"model: {truncated} is not a readable PyTorch checkpoint"),
        "evaluation, impossible value": (evaluate, {"dataset_dir": str(tmp_path)},
                                         f"{bad}: physically impossible feature values ('volume_mm3' outside "
                                         "(0, 1.5e7] in N007 (-5)); fix or drop them before evaluation"),
    }[case]  # fmt: skip
    proc, log = _run_refused(config, output_dir=str(tmp_path / "out"), **overrides)
    assert proc.returncode == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-2000:]


def test_coarse_region_without_a_voxel_near_its_centre_is_boxed(tmp_path):
    """A region at 5 mm whose centre falls between voxels (none within 2 mm of it) is cut and resampled to the
    network input like any other, not refused with a numpy error."""
    arr = np.full((8, 8, 8), -860, np.int16)
    arr[3:5, 3:5, 3:5] = -300
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((5.0, 5.0, 5.0))
    sitk.WriteImage(img, str(tmp_path / "coarse.nii.gz"))
    with bundle_scripts(BUNDLE) as scripts:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        pre = parser.get_parsed_content("preprocessing")
        ds = scripts.inputs.CheckedDataset([{"image": str(tmp_path / "coarse.nii.gz")}], pre)
    assert not ds.failed and ds[0]["image"].shape == (1, 32, 32, 32)


REAL_PATCHES = Path(__file__).resolve().parents[1] / "data" / "node21_nodule_patches"
CUBE = ["configs/train.json", "configs/cube.json"]
REAL_HELD_OUT = {"LIDC-IDRI-0001", "LIDC-IDRI-0965", "LIDC-IDRI-0088", "LIDC-IDRI-1004"}  # 2 malignant, 2 benign


@pytest.fixture(scope="module")
def real_cubes(tmp_path_factory) -> Path:
    """The 16 real patches through ``data_prep nodule-patches`` (median malignancy > 3 malignant, <= 3 benign, so that
    the 15 matched are labelled: 6 malignant); fold 0 = four patients (2 malignant, 2 benign nodules), fold 1 the
    others."""
    from data_prep.__main__ import main as data_prep

    out = tmp_path_factory.mktemp("real_cubes")
    assert data_prep(["nodule-patches", "--patches", str(REAL_PATCHES), "--out", str(out / "prep"), "--quiet",
                      "--malignant-min", "3.5", "--benign-max", "3"]) == 0  # fmt: skip
    with open(out / "prep" / "pggn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["fold"] = 0 if r["patient_id"] in REAL_HELD_OUT else 1
        for k in ("image_cube", "mask"):
            r[k] = str(out / "prep" / r[k])
    _write_table(out / "pggn.csv", rows)
    return out


@pytest.mark.long
def test_image_training_on_real_cubes_beats_its_untrained_start(real_cubes, monkeypatch):
    """Trained briefly on 11 real cubes (cube + mask in), the image model separates 4 held-out patients' cubes.

    Measure: the mean probability of the held-out malignant cubes minus that of the benign ones (0 for the
    untrained network, which gives every cube the same probability); with 4 cubes it is steadier than their
    loss, which the training prior (7 benign, 4 malignant) moves on its own."""
    monkeypatch.chdir(BUNDLE)
    with bundle_scripts(BUNDLE):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(CUBE)
        parser.update({"dataset_dir": str(real_cubes), "val_fold": 0, "ckpt_dir": str(real_cubes / "ckpt"),
                       "output_dir": str(real_cubes / "eval"), "batch_size": 4, "train#trainer#max_epochs": 30,
                       "val_interval": 30})  # fmt: skip
        train, held_out = parser.get_parsed_content("split")
        assert len(train) == 11 and sorted(int(r["label"][0]) for r in held_out) == [0, 0, 1, 1]
        parser.get_parsed_content("initialize")
        net, pre = parser.get_parsed_content("network"), parser.get_parsed_content("preprocessing")
        x = torch.stack([pre(r)["image"] for r in held_out]).float()
        y = torch.tensor([[float(r["label"][0])] for r in held_out])

        def margin() -> float:
            net.eval()
            with torch.no_grad():
                p = torch.sigmoid(net(x)[:, :1])
            return float(p[y == 1].mean() - p[y == 0].mean())

        before = margin()
        parser.get_parsed_content("train#trainer").run()
        after = margin()
    assert abs(before) < 0.02 and after > before + 0.05, (before, after)
