"""Benchmark: lung_field_ct_segmentation inference on a full-size CT (512 x 512 x 300) on CPU, ours vs MONAI defaults.

Both sides run the bundle's ``inference.json`` end to end (read the NIfTI, check, orient, resample in-plane
to 2 mm, window, predict every axial slice, invert to the input grid, two largest components, write
``.nii.gz``) with the shipped ``models/model.pt``, each in a fresh child process, alternating:

- ``ours``: the bundle as shipped (``SliceInferer`` over whole slices, ``sw_batch_size`` 32).
- ``baseline``: the same pipeline with MONAI's default inferer settings (``SliceInferer`` with
  ``sw_batch_size=1``, ``overlap=0.25``: one slice per forward pass).

The CT is a phantom written by this script (body, two lungs with vessels, table, noise; int16 HU,
0.7 x 0.7 x 1.25 mm, identity LPS direction). Prints the best time and peak memory of each side,
their ratio, the CPU seconds of each (a load-independent figure on a shared machine), and the Dice
between the two sides' masks (they must agree).

    .venv/bin/python benchmarks/bench_lung_field_inference.py [--repeats 2] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_runs import alternate, print_best, run_child  # noqa: E402

__all__ = ["write_phantom_ct", "main"]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lung_field_ct_segmentation"

CHILD = r"""
import json, os, resource, sys, time
mode, bundle, ct, threads, out = sys.argv[1:]
import torch
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
os.chdir(bundle); sys.path.insert(0, bundle)
from monai.bundle import ConfigParser
p = ConfigParser(); p.read_config("configs/inference.json")
p["input_path"] = ct; p["output_dir"] = out
if mode == "baseline":
    p["inferer"] = {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": 2}  # MONAI defaults otherwise
p.get_parsed_content("initialize"); p.get_parsed_content("run")
seconds = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"mode": mode, "seconds": seconds, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_gb": ru.ru_maxrss / 2**20, "out": out}))
"""


def write_phantom_ct(path: Path, shape=(512, 512, 300), spacing=(0.7, 0.7, 1.25), seed: int = 0) -> Path:
    """Write a chest-like int16 HU phantom as NIfTI; arrays are (x, y, z), identity LPS direction.

    Args:
        path: output ``.nii.gz``.
        shape: (X, Y, Z) voxels. Default (512, 512, 300).
        spacing: (x, y, z) mm. Default (0.7, 0.7, 1.25).
        seed: noise seed. Default 0.
    """
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(
        (np.arange(shape[0]) - shape[0] / 2) * spacing[0],
        (np.arange(shape[1]) - shape[1] / 2) * spacing[1],
        indexing="ij",
    )
    img = np.full(shape, -1024, np.int16)
    zs = (np.arange(shape[2]) - shape[2] / 2) * spacing[2]
    body = (x / 160) ** 2 + (y / 110) ** 2 < 1
    for k, z in enumerate(zs):
        sl = np.where(body, 40, -1024).astype(np.int16)
        r = max(0.0, 1 - (z / 170) ** 2)  # lungs taper towards apex and base
        for cx in (-65, 65):
            lung = ((x - cx) / (55 * r + 1e-3)) ** 2 + ((y + 5) / (75 * r + 1e-3)) ** 2 < 1
            sl[lung] = -860
        sl[(x**2 + (y - 70) ** 2) < 15**2] = 700  # spine
        sl[np.abs(y - 125) < 3] = 200  # table
        img[:, :, k] = sl
    img = img + rng.normal(0, 20, shape).astype(np.int16)
    vessels = rng.random(shape) < 0.002
    img[vessels & (img < -700)] = 0
    nib.save(
        nib.Nifti1Image(
            np.clip(img, -1024, 3071).astype(np.int16), np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        ),
        str(path),
    )
    return path


def main(argv: list[str] | None = None) -> dict:
    """Run both sides ``--repeats`` times, alternating; print best times, peak memory, ratio and agreement."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2, the project's machines)")
    ap.add_argument("--json", default=None, help="also write the runs and the best of each side here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ct = write_phantom_ct(work / "ct_full.nii.gz")
        print(f"phantom CT {nib.load(ct).shape} written; running {args.repeats} x (ours, baseline)", flush=True)
        runs = alternate(
            lambda mode: run_child(CHILD, mode, [str(BUNDLE), str(ct), str(args.threads)], work), args.repeats
        )
        best = print_best(runs, args.json)
        # CPU seconds do not depend on other load on a shared machine: on 2 idle cores, wall ~ cpu_s / 2 .. cpu_s
        for m in ("ours", "baseline"):
            print(f"{m:10s} CPU time {best[m]['cpu_s']:.1f} s (user + sys)")
        masks = {
            m: np.asarray(nib.load(Path(best[m]["out"]) / "ct_full_lung.nii.gz").dataobj) > 0
            for m in ("ours", "baseline")
        }
        inter = (masks["ours"] & masks["baseline"]).sum()
        dice = 2 * inter / max(masks["ours"].sum() + masks["baseline"].sum(), 1)
        print(f"Dice between the two sides' masks: {dice:.4f}; lung voxels (ours): {int(masks['ours'].sum())}")
        print(
            f"goal: ours <= 20 s on 2 cores -> {'met' if best['ours']['seconds'] <= 20 else 'NOT met'} "
            f"({best['ours']['seconds']:.1f} s)"
        )
    return best


if __name__ == "__main__":
    main()
