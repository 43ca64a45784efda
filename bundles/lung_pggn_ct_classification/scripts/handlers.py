"""Per-nodule predictions to CSV and, with labels, the metrics report (overall and per subset)."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .metrics import REPORT_KEYS, binary_report

__all__ = ["ClassificationReport"]

logger = logging.getLogger(__name__)


def _items(value) -> list:
    """A decollated list of dicts, or a collated dict, as a list of per-item dicts."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        n = len(next(iter(value.values())))
        return [{k: v[i] for k, v in value.items()} for i in range(n)]
    return []


class ClassificationReport:
    """Collect each nodule's probability over an evaluator run and write the results at its end.

    Writes ``<output_dir>/<prefix>predictions.csv`` (id, patient_id, probability, label and subset
    columns when present); when labels are present also ``<prefix>metrics.json`` (overall and per
    subset: AUC with a bootstrap 95% interval, sensitivity and specificity at the Youden threshold
    of all cases, Brier score, expected calibration error, calibration bins), ``<prefix>metrics.csv``
    (one row per subset) and ``<prefix>calibration.csv``.

    Args:
        output_dir: folder for the files (created).
        subset_keys: 0/1 row keys; metrics are also reported on the rows where each is 1. Default none.
        prefix: file-name prefix. Default ``""``.
        n_bootstrap: AUC bootstrap resamples. Default 1000.
        n_bins: calibration bins. Default 10.
        threshold: operating threshold for sensitivity/specificity; None: the Youden point of all rows. Default None.
        pred_key: key of the (post-processed, sigmoid) prediction in the engine output. Default ``"pred"``.
    """

    def __init__(self, output_dir: str, subset_keys: Sequence[str] = (), prefix: str = "", n_bootstrap: int = 1000,
                 n_bins: int = 10, threshold: float | None = None, pred_key: str = "pred"):  # fmt: skip
        self.output_dir = Path(output_dir)
        self.subset_keys = list(subset_keys)
        self.prefix = prefix
        self.n_bootstrap = n_bootstrap
        self.n_bins = n_bins
        self.threshold = threshold
        self.pred_key = pred_key
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine) -> None:
        for data, out in zip(_items(engine.state.batch), _items(engine.state.output)):
            prob = float(torch.as_tensor(out[self.pred_key]).reshape(-1)[0])
            row = {"id": data.get("id"), "patient_id": data.get("patient_id", ""), "probability": prob}
            if data.get("label") is not None:
                row["label"] = int(torch.as_tensor(data["label"]).reshape(-1)[0])
            for k in self.subset_keys:
                if k in data:
                    row[k] = int(torch.as_tensor(data[k]).reshape(-1)[0])
            self.rows.append(row)

    def write(self, engine=None) -> dict | None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.output_dir / f"{self.prefix}predictions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rows)
        logger.info("%d prediction(s) -> %s", len(self.rows), self.output_dir / f"{self.prefix}predictions.csv")
        if not self.rows or "label" not in self.rows[0]:
            return None
        y = np.array([r["label"] for r in self.rows])
        p = np.array([r["probability"] for r in self.rows])
        report = {"all": binary_report(y, p, self.n_bootstrap, self.n_bins, threshold=self.threshold)}
        for k in self.subset_keys:
            m = np.array([r.get(k, 0) == 1 for r in self.rows])
            if m.any() and len(np.unique(y[m])) == 2:
                report[k] = binary_report(
                    y[m], p[m], self.n_bootstrap, self.n_bins, threshold=report["all"]["threshold"]
                )
            else:
                report[k] = {"n": int(m.sum()), "n_positive": int(y[m].sum()), "note": "fewer than two classes: no AUC"}
        (self.output_dir / f"{self.prefix}metrics.json").write_text(json.dumps(report, indent=2) + "\n")

        with open(self.output_dir / f"{self.prefix}metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subset", *REPORT_KEYS])
            for name, r in report.items():
                w.writerow([name, *[r.get(k, "") for k in REPORT_KEYS]])
        with open(self.output_dir / f"{self.prefix}calibration.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subset", "bin_low", "bin_high", "n", "mean_predicted", "observed_rate"])
            for name, r in report.items():
                for b in r.get("calibration", []):
                    w.writerow([name, b["bin_low"], b["bin_high"], b["n"], b["mean_predicted"], b["observed_rate"]])
        a = report["all"]
        logger.info("AUC %.3f (95%% CI %.3f-%.3f), sensitivity %.3f, specificity %.3f at %.3f, Brier %.3f (n=%d)",
                    a["auc"], a["auc_ci_low"], a["auc_ci_high"], a["sensitivity"], a["specificity"], a["threshold"],
                    a["brier"], a["n"])  # fmt: skip
        return report
