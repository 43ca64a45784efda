"""Patient-level CV of the image model on real nodule cubes (``data_prep nodule-patches``), against two baselines.

Run from the bundle folder (``bundles/lung_pggn_ct_classification``)::

    nice python ../../docs/experiments/lung_pggn_ct_classification/real_cubes_cv.py \
        --dataset_dir <nodule-patches output> --output_dir <dir> [--epochs 6]

1. ``scripts.cross_validate`` with ``configs/train.json`` + ``configs/cube.json`` (cube + mask in, the same
   preprocessing as inference), each fold's last-epoch network predicting its held-out patients; pooled.
2. Baseline on the same pooled nodules: the mask's sphere-equivalent diameter alone (no training).
3. The shipped ``models/model.pt`` (trained on phantoms only) on the same nodules (all unseen by it).
Every AUC with a 1,000-resample bootstrap 95 % interval (``scripts.metrics.binary_report``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from scripts.checkpoint import load_weights
from scripts.cross_validate import cross_validate, pool_folds
from scripts.metrics import binary_report

CONFIGS = ["configs/train.json", "configs/cube.json"]


def shipped_predictions(dataset_dir: str, ids: list[str]) -> dict[str, float]:
    """Probabilities of the shipped image model for the cubes of ``ids`` (validation preprocessing, no training)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"dataset_dir": dataset_dir})
    wanted = set(ids)
    rows = [r for r in parser.get_parsed_content("rows") if r["id"] in wanted]
    pre = parser.get_parsed_content("preprocessing")
    net = parser.get_parsed_content("network_def")
    load_weights(net, "models/model.pt").eval()
    out = {}
    with torch.no_grad():
        for r in rows:
            x = pre(r)["image"][None].float()
            logit = net(x)
            logit = logit[0] if isinstance(logit, (tuple, list)) else logit
            out[r["id"]] = float(torch.sigmoid(logit.reshape(-1)[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--folds", type=int, nargs="*", default=None, help="train only these folds (default all)")
    ap.add_argument("--pool_only", action="store_true", help="only pool the fold folders under --output_dir")
    args = ap.parse_args()
    overrides = {"dataset_dir": args.dataset_dir, "train#trainer#max_epochs": args.epochs, "val_interval": args.epochs,
                 "train#dataset#_target_": "CacheDataset", "validate#dataset#_target_": "CacheDataset"}  # fmt: skip
    if not args.pool_only:
        cross_validate(CONFIGS, args.output_dir, args.folds, overrides)
    result = pool_folds(args.output_dir, ["ggn"])  # every fold*/oof_predictions.csv under output_dir
    with open(Path(args.output_dir) / "cv_predictions.csv", newline="") as f:
        pooled = list(csv.DictReader(f))
    with open(Path(args.dataset_dir) / "pggn.csv", newline="") as f:
        table = {r["nodule_id"]: r for r in csv.DictReader(f)}
    ids = [r["id"] for r in pooled]
    y = np.array([int(float(r["label"])) for r in pooled])
    ggn = np.array([table[i]["ggn"] == "1" for i in ids])
    diam = np.array([float(table[i]["equivalent_diameter_mm"]) for i in ids])
    shipped = shipped_predictions(args.dataset_dir, ids)
    p_shipped = np.array([shipped[i] for i in ids])
    report = {
        "image_cv": result,
        "diameter_baseline": binary_report(y, diam),
        "shipped_model": binary_report(y, p_shipped),
    }
    if ggn.any() and len(set(y[ggn])) == 2:
        report["diameter_baseline_ggn"] = binary_report(y[ggn], diam[ggn])
    (Path(args.output_dir) / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    named = (
        ("image model, pooled OOF", result["all"]),
        ("mask diameter alone", report["diameter_baseline"]),
        ("shipped model.pt", report["shipped_model"]),
        ("image model, ground glass", result.get("ggn", {})),
        ("mask diameter, ground glass", report.get("diameter_baseline_ggn", {})),
    )
    for name, r in named:
        if "auc" in r:
            ci = f"{r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f}"
            print(f"{name}: n={r['n']} ({r['n_positive']} malignant) AUC {r['auc']:.3f} (95% CI {ci})")
    print("per-fold AUC:", {k: round(v, 3) for k, v in result["per_fold_auc"].items()})


if __name__ == "__main__":
    main()
