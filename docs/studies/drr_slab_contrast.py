"""How visible are the nodules of a prepared CT set in the lung-field DRR, and in its depth slabs?

For every case of the given ``data_prep lidc`` / ``luna16`` output folders (optionally only some folds)
that has a nodule of at least ``--min-mm``, renders pose 0 (the plain PA) with the ``drr`` step's own
code (``drr_region="lungs"``, ``drr_slabs``) and, per nodule, its projected mask. Contrast is the cxr
bundle's evaluation measure: (mean inside the mask - mean of a 3-8 px ring) / the ring's standard
deviation (``bundles/lung_nodule_cxr_drr_segmentation/scripts/handlers.py``, re-stated here so that
this script needs no bundle). Prints the median contrast and the share of nodules at or below 1 in the
whole DRR and in the nodule's best slab, and writes one CSV row per nodule.

    python docs/studies/drr_slab_contrast.py --prepared /tmp/cxr_full/prep_2{1,2,3,5,6,7} --folds 0 1 2 4 \
        --size 256 --slabs 3 --out slab_contrast.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from data_prep.ops.drr_projector import DrrGeometry
from data_prep.ops.drr_render import DrrParams, render_case_arrays


def contrast(image: np.ndarray, mask: np.ndarray, inner: int = 3, outer: int = 8) -> float:
    g = torch.as_tensor(mask > 0, dtype=torch.float32)[None, None]
    grow = lambda r: F.max_pool2d(g, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0  # noqa: E731
    ring = grow(outer) & ~grow(inner)
    return float((image[mask > 0].mean() - image[ring].mean()) / (image[ring].std() + 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", nargs="+", required=True, help="data_prep lidc/luna16 output folders")
    ap.add_argument("--folds", nargs="*", type=int, default=None, help="only these folds (default all)")
    ap.add_argument("--size", type=int, default=256, help="detector pixels (default 256)")
    ap.add_argument("--slabs", type=int, default=3, help="depth slabs (default 3)")
    ap.add_argument("--min-mm", type=float, default=10.0, help="nodules of at least this diameter (default 10)")
    ap.add_argument("--out", default="slab_contrast.csv", help="per-nodule CSV")
    a = ap.parse_args()
    params = DrrParams(geometry=DrrGeometry(size=a.size), poses=1, drr_region="lungs", drr_slabs=a.slabs)
    rows = []
    for folder in map(Path, a.prepared):
        entries = json.loads((folder / "datalist.json").read_text())["training"]
        with open(folder / "nodules.csv", newline="") as f:
            diam = {(r["case_id"], int(r["label"])): float(r["diameter_mm"] or 0) for r in csv.DictReader(f)}
        for e in entries:
            big = [k for (c, k), d in diam.items() if c == e["case_id"] and d >= a.min_mm]
            if not big or (a.folds is not None and e.get("fold") not in a.folds):
                continue
            img = sitk.ReadImage(str(folder / e["image"]))
            hu = sitk.GetArrayFromImage(img)
            nod = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / e["label"])))
            lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / e["lung"])))
            spacing = img.GetSpacing()[::-1]
            for k in big:
                res = render_case_arrays(hu, (nod == k).astype(np.uint8), lungs, spacing, params, key=e["case_id"])[0]
                m = res["nodules"] > 0
                if m.sum() == 0:
                    continue
                per_slab = [contrast(s, m) for s in res["drr_slabs"]]
                rows.append(
                    {
                        "folder": folder.name,
                        "case_id": e["case_id"],
                        "label": k,
                        "diameter_mm": diam[(e["case_id"], k)],
                        "drr": round(contrast(res["drr"], m), 3),
                        "best_slab": round(max(per_slab), 3),
                        "slab": int(np.argmax(per_slab)),
                    }
                )
                print(rows[-1], flush=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for key in ("drr", "best_slab"):
        v = np.array([r[key] for r in rows])
        print(
            f"{key}: {len(v)} nodules, median contrast {np.median(v):.2f}, {100 * (v <= 1).mean():.0f}% at or below 1"
        )


if __name__ == "__main__":
    main()
