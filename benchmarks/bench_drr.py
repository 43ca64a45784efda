"""DRRs per second at 512 x 512 with mask projection: ours (data_prep.ops.drr_projector) against nanodrr's defaults.

One full-size demo scan prepared at 2 mm (generated under a temporary folder unless --prepared is
given) is rendered in the PA geometry of the drr step, for the same poses, by:

- ours: ``data_prep.ops.drr_projector.project_volume`` (plane-wise exact ray sampling, planes binned to the
  ``ray_step_mm`` of the step, the two HU channels and the lung mask in one pass, the nodules from a
  crop around them), float32, poses one after another;
- baseline: nanodrr's ``render`` at the library's defaults (``n_samples=500``, nearest label
  routing with a labelmap of lung + nodule classes, float32), one pose per call, its rows split
  into 4 bands only to bound memory (the same arithmetic);
- nanodrr-200: the library with fewer samples (200 per ray, about our accuracy), same call;
- reference (accuracy only, not timed against): nanodrr with 1500 samples per ray.

Each side runs in its own child process (peak memory = its max RSS). Prints seconds per DRR,
DRR/s, the speed-up, peak memory, and each side's mean relative difference from the reference
(line integrals, pixels inside the body) and the Dice of its nodule and lung masks against the
reference's ("a sample of the ray in the mask").

    .venv/bin/python benchmarks/bench_drr.py [--prepared DIR --case ID] [--poses 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(prepared: Path, case: str):
    import SimpleITK as sitk

    def rd(sub):
        img = sitk.ReadImage(str(prepared / sub / f"{case}.nii.gz"))
        return sitk.GetArrayFromImage(img), np.array(img.GetSpacing()[::-1])

    (hu, sp), (nod, _), (lung, _) = rd("images"), rd("labels/nodules"), rd("labels/lungs")
    idx = np.argwhere(lung > 0)
    iso = ((idx.min(0) + idx.max(0)) / 2.0)[::-1]
    return hu, nod, lung, sp, iso


def _nanodrr(hu, nod, lung, sp, iso, poses, geom, n_samples, bands):
    """nanodrr renders in our PA frame: (B, 3, H, W) per-class integrals (bg, lung, nodule)."""
    import torch
    from nanodrr.camera import make_k_inv
    from nanodrr.data import Subject
    from nanodrr.drr.renderer import _make_src, _make_tgt, render

    from data_prep.ops.drr_projector import rotation_matrix

    lab = np.where(nod > 0, 2, np.where(lung > 0, 1, 0)).astype(np.float32)
    v2w = np.diag([*sp[::-1], 1.0])
    v2w[:3, 3] = -iso * sp[::-1]
    v2w_t = torch.tensor(v2w, dtype=torch.float32)
    subj = Subject(
        torch.as_tensor(hu.astype(np.float32))[None, None],
        torch.as_tensor(lab)[None, None],
        v2w_t,
        torch.tensor(np.linalg.inv(v2w), dtype=torch.float32),
        Subject._make_voxel_to_grid(torch.Size((1, 1, *hu.shape))),
        torch.zeros(3),
        max_label=2,
    )
    size, src_y = geom.size, geom.sdd - geom.odd
    k_inv = make_k_inv(geom.sdd, geom.pixel_mm, geom.pixel_mm, 0.0, 0.0, size, size)
    sdd = torch.tensor([geom.sdd])
    cam_to_q = np.array([[1, 0, 0, 0], [0, 0, -1, src_y], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)
    tgt = _make_tgt(k_inv, sdd, size, size, "cpu", torch.float32)
    src = _make_src(False, tgt, sdd)
    outs = []
    for pose in poses:
        r = rotation_matrix(pose.rotation_deg)
        q_to_p = np.eye(4)
        q_to_p[:3, :3] = r.T
        q_to_p[:3, 3] = -r.T @ np.asarray(pose.translation_mm)
        rt_inv = torch.tensor(q_to_p @ cam_to_q, dtype=torch.float32)[None]
        rows = size // bands
        parts = [
            render(
                subj,
                k_inv,
                rt_inv,
                sdd,
                rows,
                size,
                n_samples,
                src=src,
                tgt=tgt[:, b * rows * size : (b + 1) * rows * size],
            )
            for b in range(bands)
        ]
        outs.append(torch.cat(parts, 2)[0].numpy())
    return np.stack(outs)


def child(mode: str, prepared: Path, case: str, n_poses: int, work: Path) -> None:
    import torch

    from data_prep.ops.drr_projector import CT_CURVE, hu_channels, line_integral, make_poses, project_volume
    from data_prep.ops.drr_render import DrrParams

    torch.set_num_threads(2)
    hu, nod, lung, sp, iso = _load(prepared, case)
    params = DrrParams()
    geom = params.geometry
    poses = make_poses(n_poses, case)
    t0 = time.perf_counter()
    if mode == "ours":
        vol = np.concatenate([hu_channels(hu), (lung > 0).astype(np.float32)[None]])
        i = np.argwhere(nod > 0)
        lo, hi = np.maximum(i.min(0) - 2, 0), np.minimum(i.max(0) + 3, nod.shape)
        crop = (nod[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0).astype(np.float32)[None]
        drr, nodm, lungm = [], [], []
        for pose in poses:
            proj = project_volume(vol, sp, geom, pose, iso_index=iso, ray_step_mm=params.ray_step_mm)
            nproj = project_volume(crop, sp, geom, pose, iso_index=iso - lo[::-1])
            drr.append(line_integral(proj[:2], CT_CURVE))
            lungm.append(proj[2] >= params.mask_min_mm)
            nodm.append(nproj[0] >= params.mask_min_mm)
        drr, nodm, lungm = np.stack(drr), np.stack(nodm), np.stack(lungm)
    else:
        n_samples = {"baseline": 500, "nanodrr-200": 200, "reference": 1500}[mode]
        out = _nanodrr(hu, nod, lung, sp, iso, poses, geom, n_samples, bands=16 if mode == "reference" else 4)
        drr, nodm, lungm = out.sum(1), out[:, 2] > 0, out[:, 1:].sum(1) > 0
    seconds = time.perf_counter() - t0
    np.savez(work / f"{mode}.npz", drr=drr, nod=nodm, lung=lungm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"mode": mode, "seconds": seconds, "per_drr": seconds / n_poses, "peak_rss_gb": peak}))


def _run(mode, args, work) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--prepared",
        str(args.prepared),
        "--case",
        args.case,
        "--poses",
        str(args.poses),
        "--work",
        str(work),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {mode:9s} {r['seconds']:7.1f} s for {args.poses} DRR(s)  {r['peak_rss_gb']:.2f} GB", flush=True)
    return r


def _make_demo(tmp: Path) -> Path:
    py = [sys.executable, "-m", "data_prep"]
    subprocess.run(
        [
            *py,
            "synth-lidc",
            "--out",
            str(tmp / "dicom"),
            "--patient-ids",
            "LIDC-IDRI-0635",
            "--size",
            "full",
            "--quiet",
        ],
        check=True,
        cwd=ROOT,
    )
    subprocess.run(
        [*py, "lidc", "--dicom-root", str(tmp / "dicom"), "--out", str(tmp / "prep"), "--spacing", "2", "--quiet"],
        check=True,
        cwd=ROOT,
    )
    return tmp / "prep"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prepared",
        type=Path,
        default=None,
        help="a lidc output folder (default: generate LIDC-IDRI-0635 full at 2 mm)",
    )
    ap.add_argument("--case", default="LIDC-IDRI-0635")
    ap.add_argument("--poses", type=int, default=2, help="poses rendered by each side (pose 0 PA, then seeded poses)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.prepared, args.case, args.poses, args.work)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_drr_"))
    if args.prepared is None:
        print("generating the demo scan (synth-lidc --size full, lidc --spacing 2) ...", flush=True)
        args.prepared = _make_demo(work)
    runs = {m: _run(m, args, work) for m in ("ours", "baseline", "nanodrr-200", "reference")}
    ref = np.load(work / "reference.npz")
    body = ref["drr"] > 0.05
    print(f"\n{'':12s}{'s/DRR':>8s}{'DRR/s':>8s}{'peak GB':>9s}{'rel.diff':>10s}{'Dice nod':>10s}{'Dice lung':>10s}")
    for m in ("ours", "nanodrr-200", "baseline"):
        r, x = runs[m], np.load(work / f"{m}.npz")
        rel = float(np.abs(x["drr"] - ref["drr"])[body].mean() / ref["drr"][body].mean())
        dice = [2 * (x[k] & ref[k]).sum() / max(x[k].sum() + ref[k].sum(), 1) for k in ("nod", "lung")]
        print(
            f"{m:12s}{r['per_drr']:8.2f}{1 / r['per_drr']:8.3f}{r['peak_rss_gb']:9.2f}"
            f"{rel:10.2%}{dice[0]:10.3f}{dice[1]:10.3f}"
        )
    print(
        f"speed-up (baseline / ours): {runs['baseline']['seconds'] / runs['ours']['seconds']:.1f}x; "
        f"(nanodrr-200 / ours): {runs['nanodrr-200']['seconds'] / runs['ours']['seconds']:.1f}x"
    )


if __name__ == "__main__":
    main()
