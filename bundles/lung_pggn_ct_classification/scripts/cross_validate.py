"""Patient-level k-fold cross-validation of one variant, with pooled out-of-fold metrics.

For each fold k the bundle's training config runs with ``val_fold = k`` (checkpoints and curves
under ``<output_dir>/fold<k>``); the network as it is after the last epoch (no selection on the
held-out fold) then predicts fold k. The out-of-fold predictions of all folds are pooled into
``<output_dir>/cv_metrics.json`` / ``cv_metrics.csv`` (overall and per subset column, e.g. ``ggn``)
with the per-fold AUCs.

Usage, from the bundle folder::

    python -m scripts.cross_validate --config_file "['configs/train.json','configs/tabular.json']" \\
        --dataset_dir /data/pggn_table --output_dir eval/cv_tabular [--folds 0 1 2 3 4] [--train#trainer#max_epochs 60]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .handlers import ClassificationReport
from .metrics import REPORT_KEYS, binary_report

__all__ = ["cross_validate", "pool_folds", "main"]

logger = logging.getLogger(__name__)


def cross_validate(
    config_files: list[str], output_dir: str, folds: list[int] | None = None, overrides: dict | None = None
) -> dict:
    """Train and predict each fold; pool the out-of-fold predictions.

    Args:
        config_files: the training config files (e.g. train.json + tabular.json).
        output_dir: where fold folders and the pooled metrics go.
        folds: folds to hold out in turn. Default None (all folds of the table).
        overrides: other config overrides (``{"dataset_dir": ..., "train#trainer#max_epochs": 60}``). Default None.

    Returns:
        The pooled report (``all`` and one entry per subset column, plus ``per_fold_auc``).
    """
    from monai.bundle import ConfigParser

    out = Path(output_dir)
    overrides = dict(overrides or {})
    pooled: list[dict] = []
    per_fold: dict[int, float] = {}
    subset_keys: list[str] = []
    if folds is None:
        probe = ConfigParser()
        probe.read_config(config_files)
        probe.update(overrides)
        folds = sorted({r["fold"] for r in probe.get_parsed_content("rows")})
    for k in folds:
        parser = ConfigParser()
        parser.read_config(config_files)
        parser.update(
            {**overrides, "val_fold": k, "ckpt_dir": str(out / f"fold{k}"), "output_dir": str(out / f"fold{k}")}
        )
        parser.get_parsed_content("initialize")  # determinism, normalization fitted / encoders loaded
        parser.get_parsed_content("train#trainer").run()
        subset_keys = list(parser.get_parsed_content("subset_columns"))
        evaluator = parser.get_parsed_content("validate#evaluator")
        report = ClassificationReport(str(out / f"fold{k}"), subset_keys=subset_keys, prefix="oof_")
        report.attach(evaluator)
        evaluator.run()
        rows = [dict(r, fold=k) for r in report.rows]
        per_fold[k] = binary_report([r["label"] for r in rows], [r["probability"] for r in rows], n_bootstrap=0)["auc"]
        pooled += rows
    return pool_folds(output_dir, subset_keys, per_fold, pooled)


def pool_folds(
    output_dir: str,
    subset_keys: list[str] | None = None,
    per_fold: dict | None = None,
    pooled: list[dict] | None = None,
) -> dict:
    """Pool out-of-fold predictions (given, or read from ``<output_dir>/fold*/oof_predictions.csv``)
    into the CV metrics files."""
    out = Path(output_dir)
    if pooled is None:
        pooled, per_fold = [], {}
        for path in sorted(out.glob("fold*/oof_predictions.csv")):
            k = int(path.parent.name[4:])
            with open(path, newline="") as f:
                rows = [
                    dict(r, fold=k, label=int(r["label"]), probability=float(r["probability"]))
                    for r in csv.DictReader(f)
                ]
            for r in rows:
                for key in subset_keys or []:
                    r[key] = int(r[key])
            per_fold[k] = binary_report([r["label"] for r in rows], [r["probability"] for r in rows], n_bootstrap=0)[
                "auc"
            ]
            pooled += rows
        if not pooled:
            raise FileNotFoundError(f"no fold*/oof_predictions.csv under {out}")
    subset_keys = list(subset_keys or [])
    y = np.array([r["label"] for r in pooled])
    p = np.array([r["probability"] for r in pooled])
    result = {"all": binary_report(y, p)}
    for key in subset_keys:
        m = np.array([r.get(key) == 1 for r in pooled])
        result[key] = (
            binary_report(y[m], p[m], threshold=result["all"]["threshold"])
            if m.any() and len(set(y[m])) == 2
            else {"n": int(m.sum())}
        )
    aucs = list(per_fold.values())
    result["per_fold_auc"] = {str(k): v for k, v in per_fold.items()}
    result["per_fold_auc_mean"], result["per_fold_auc_sd"] = (
        float(np.mean(aucs)),
        float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "cv_predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in pooled for k in r)))
        w.writeheader()
        w.writerows(pooled)

    with open(out / "cv_metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subset", *REPORT_KEYS])
        for name in ["all", *subset_keys]:
            w.writerow([name, *[result[name].get(k, "") for k in REPORT_KEYS]])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config_file", default="configs/train.json", help="a config file or a Python-style list of them")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--folds", type=int, nargs="+", default=None)
    ap.add_argument("--pool_only", action="store_true", help="only pool the fold folders already under --output_dir")
    ap.add_argument(
        "--subset_columns", nargs="*", default=["ggn"], help="with --pool_only: subset columns (default ggn)"
    )
    args, rest = ap.parse_known_args(argv)
    files = ast.literal_eval(args.config_file) if args.config_file.startswith("[") else [args.config_file]
    overrides = {}
    for key, value in zip(rest[::2], rest[1::2]):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        overrides[key.lstrip("-")] = value
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s"
    )
    if args.pool_only:
        result = pool_folds(args.output_dir, args.subset_columns)
    else:
        result = cross_validate(files, args.output_dir, args.folds, overrides)
    for name, r in result.items():
        if isinstance(r, dict) and "auc" in r:
            print(
                f"{name}: n={r['n']} ({r['n_positive']} positive) AUC {r['auc']:.3f} "
                f"(95% CI {r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f})"
            )
    print(f"per-fold AUC {result['per_fold_auc_mean']:.3f} +- {result['per_fold_auc_sd']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
