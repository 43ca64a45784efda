"""Tests of the lung_pggn_ct_classification bundle: training beats chance on held-out folds (tabular,
image, fusion), evaluate/inference through ``monai.bundle run``, bad input, portability, multi-process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.bundles.conftest import BUNDLES, assert_ddp_released_before_exit, bundle_scripts, ddp_release_probe, run_bundle

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
        row.update(spiculation=int(spic), calcification=int(calc), malignant=int(score > 0), ggn=int(rng.random() < 0.3))
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
    run_bundle(BUNDLE, TABULAR, dataset_dir=str(data["table"]), ckpt_dir=str(ckpt), output_dir=str(out), train__trainer__max_epochs=25)
    run_bundle(BUNDLE, [*TABULAR, "configs/evaluate.json"], dataset_dir=str(data["table"]), ckpt_dir=str(ckpt), output_dir=str(out))
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
    assert (tabular_trained["out"] / "calibration.csv").exists() and any((tabular_trained["out"] / "tensorboard").iterdir())


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
    evaluated = {p["id"]: float(p["probability"]) for p in csv.DictReader(open(tabular_trained["out"] / "predictions.csv"))}
    shared = set(preds) & set(evaluated)
    assert shared and all(abs(preds[k] - evaluated[k]) < 1e-5 for k in shared)


def test_image_then_fusion_training_beat_chance_on_held_out_fold(data, tabular_trained, tmp_path):
    """Image-only and fusion (frozen encoders from both checkpoints) each reach a held-out AUC well above chance; encoders stay frozen."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tabular_trained["ckpt"], ckpt)
    common = dict(dataset_dir=str(data["crops"]), ckpt_dir=str(ckpt), spatial_size=[SIZE] * 3, batch_size=8, widen_factor=0.125)
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
        missing = _write_table(tmp_path / "missing.csv", [{k: v for k, v in r.items() if k != "spiculation"} for r in rows])
        with pytest.raises(TableError, match=r"missing.csv: missing column.*feature_columns: \['spiculation'\]"):
            scripts.table.read_table(str(missing), FEATURES, "malignant")
        with pytest.raises(TableError, match=r"extra column\(s\) \['ggn'\]"):
            scripts.table.read_table(str(data["table"] / "pggn.csv"), FEATURES, "malignant", allow_extra_columns=False)
        # the command line hands "false" over as a string, which must not read as true
        with pytest.raises(TableError, match=r"extra column\(s\) \['ggn'\]"):
            scripts.table.read_table(str(data["table"] / "pggn.csv"), FEATURES, "malignant", allow_extra_columns="false")
        with pytest.raises(ValueError, match=r"allow_extra_columns: expected true or false, got 'maybe'"):
            scripts.table.read_table(str(data["table"] / "pggn.csv"), FEATURES, "malignant", allow_extra_columns="maybe")
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
        with pytest.raises(ValueError, match=r"crop /x/crop_17.nii.gz has spatial shape \(16, 16, 16\), the model takes \(32, 32, 32\)"):
            check({"image": img})
        torch.save(scripts.networks.TabularClassifier(5).state_dict(), tmp_path / "t5.pt")
        with pytest.raises(ValueError, match="trained with 5 feature columns, the config lists 11"):
            scripts.checkpoint.load_weights(scripts.networks.TabularClassifier(11), str(tmp_path / "t5.pt"))


def test_metrics_against_sklearn():
    """AUC equals scikit-learn's (ties included), the Youden point separates separable data, Brier is the mean squared error."""
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
        p = ConfigParser(); p.read_config({str(alone / 'configs/inference.json')!r})
        p["bundle_root"] = {str(alone)!r}
        data = p.get_parsed_content("preprocessing")({{"image": {str(tmp_path / 'crop.nii.gz')!r}}})
        net = p.get_parsed_content("network_def")
        import scripts
        scripts.checkpoint.load_weights(net, {str(alone / 'models/model.pt')!r})
        with torch.no_grad():
            pred = net.eval()(data["image"][None].float())
        out = p.get_parsed_content("postprocessing")({{"pred": pred[0]}})
        prob = float(out["pred"][0]); assert 0 <= prob <= 1, prob
        extra = {{"metadata.json": ""}}
        ts = torch.jit.load({str(alone / 'models/model.ts')!r}, _extra_files=extra)
        assert "network_data_format" in json.loads(extra["metadata.json"])
        assert torch.allclose(ts(data["image"][None].float()), pred, atol=1e-4)
        print("OK", prob)
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    bundle = [sys.executable, "-m", "monai.bundle"]
    verify = subprocess.run([*bundle, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file",
                             "configs/inference.json"], cwd=alone, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert verify.returncode == 0 and "verified with no error" in verify.stdout + verify.stderr, verify.stderr[-2000:]
    export = subprocess.run([*bundle, "ckpt_export", "network_def", "--filepath", str(tmp_path / "m.ts"), "--ckpt_file", "models/model.pt",
                             "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"],
                            cwd=alone, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert export.returncode == 0 and (tmp_path / "m.ts").exists(), export.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_two_processes_train_a_checkpoint(data, tmp_path):
    """torchrun with 2 CPU processes (gloo, DistributedSampler) trains the tabular variant one epoch to a checkpoint,
    and each rank frees its DDP wrapper before the interpreter shuts down."""
    files = [str(BUNDLE / f) for f in [*TABULAR, "configs/multi_gpu_train.json"]] + [ddp_release_probe(BUNDLE, tmp_path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--tee=3", "--master_port=29563", "-m", "monai.bundle", "run",
           "--config_file", json.dumps(files), "--dataset_dir", str(data["table"]), "--ckpt_dir", str(tmp_path / "ckpt"),
           "--output_dir", str(tmp_path / "out"), "--train#trainer#max_epochs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    state = torch.load(tmp_path / "ckpt/model_tabular.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state) and state["feature_mean"].shape == (len(FEATURES),)
    assert_ddp_released_before_exit(proc.stdout)
