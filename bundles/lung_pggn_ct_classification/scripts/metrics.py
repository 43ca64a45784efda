"""Binary-classification metrics: AUC (scikit-learn's ``roc_auc_score``) with a bootstrap 95% interval,
the Youden operating point, calibration (Brier score, reliability bins, expected calibration error)."""

from __future__ import annotations

import numpy as np

__all__ = ["binary_report", "REPORT_KEYS"]

#: The columns of a metrics CSV, in order (one row per subset).
REPORT_KEYS = (
    "n",
    "n_positive",
    "auc",
    "auc_ci_low",
    "auc_ci_high",
    "threshold",
    "sensitivity",
    "specificity",
    "brier",
    "ece",
)


def binary_report(
    labels, probabilities, n_bootstrap: int = 1000, n_bins: int = 10, seed: int = 0, threshold: float | None = None
) -> dict:
    """Metrics of predicted probabilities against 0/1 labels.

    Args:
        labels: 0/1 labels, shape (N,).
        probabilities: predicted probability of class 1, shape (N,).
        n_bootstrap: bootstrap resamples (of cases) for the AUC interval. Default 1000.
        n_bins: equal-width probability bins of the calibration curve. Default 10.
        seed: bootstrap seed. Default 0.
        threshold: operating threshold; None uses the Youden point of this data. Default None.

    Returns:
        ``n``, ``n_positive``, ``auc``, ``auc_ci_low``, ``auc_ci_high``, ``threshold``
        (``youden`` or given), ``sensitivity``, ``specificity``, ``brier``, ``ece`` and
        ``calibration`` (per bin: ``bin_low``, ``bin_high``, ``n``, ``mean_predicted``, ``observed_rate``).

    Raises:
        ValueError: lengths differ or the labels hold one class (AUC undefined).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=float).ravel()
    p = np.asarray(probabilities, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"the labels hold one class only ({int(y[0]) if y.size else 'none'}) among {y.size} case(s): "
            "AUC is undefined"
        )
    auc = float(roc_auc_score(y, p))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, y.size, y.size)
        if y[idx].min() != y[idx].max():
            boots.append(float(roc_auc_score(y[idx], p[idx])))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
    if threshold is None:
        fpr, tpr, thr = roc_curve(y, p)
        best = int(np.argmax(tpr - fpr))
        threshold = float(min(thr[best], 1.0))
    pred = p >= threshold
    sens = float((pred & (y == 1)).sum() / (y == 1).sum())
    spec = float((~pred & (y == 0)).sum() / (y == 0).sum())
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
        bins.append({
            "bin_low": round(float(edges[b]), 3), "bin_high": round(float(edges[b + 1]), 3), "n": int(m.sum()),
            "mean_predicted": float(p[m].mean()) if m.any() else None,
            "observed_rate": float(y[m].mean()) if m.any() else None,
        })  # fmt: skip
    return {
        "n": int(y.size), "n_positive": int(y.sum()), "auc": auc, "auc_ci_low": float(lo), "auc_ci_high": float(hi),
        "n_bootstrap": len(boots), "threshold": float(threshold), "sensitivity": sens, "specificity": spec,
        "brier": float(np.mean((p - y) ** 2)), "ece": float(ece), "calibration": bins,
    }  # fmt: skip
