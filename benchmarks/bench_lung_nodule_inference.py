"""Benchmark: whole-scan nodule inference (CPU or --device cuda) with the bundle's settings against MONAI's defaults.

The scan is a synthetic 1 mm chest of ``--shape`` (default 350 x 350 x 300 voxels, x/y/z): air
outside, a soft-tissue body, two lungs with vessels and a few solid nodules, written as NIfTI. Each
configuration runs in a fresh child process (peak memory = the child's max RSS), alternating,
``--repeats`` times; the best time of each is reported:

* ``baseline``: what a MONAI user gets by default: load, orientation, spacing, window, then
  ``SlidingWindowInferer(roi_size=<training patch>, sw_batch_size=1, overlap=0.25, mode="constant")``
  over the whole volume and a sigmoid (no post-processing, nothing saved);
* ``ours``: ``configs/inference.json`` end to end: the same preprocessing plus the body crop,
  ``NoduleSlidingWindowInferer`` (96^3 window, Gaussian blending, overlap 0.25, sw_batch_size 2, passes
  at 1x and 2x the voxel size),
  threshold, small-component removal, hole filling, nodule table, inversion to the input grid and
  the saved mask;
* ``ours_single_scale``: the same with one pass at the scan's own voxel size (``infer_scales`` [1.0];
  the default adds a pass at 2x the voxel size for large nodules);
* ``ours_tta``: the same with flip test-time augmentation (``--tta-axes``, default the two in-plane
  axes: 4 passes).

Weights are the bundle's ``models/model.pt`` (speed does not depend on them).

    python benchmarks/bench_lung_nodule_inference.py [--shape 350 350 300] [--repeats 1] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
BUNDLE = HERE.parent / "bundles" / "lung_nodule_ct_segmentation"

CHILD = r"""
import json, resource, sys, time
mode, scan, out, threads, tta_axes, dev = (
    sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6]
)
import torch
device = torch.device(dev)
torch.set_num_threads(threads)
sys.path.insert(0, {bundle!r})
from monai.bundle import ConfigParser
p = ConfigParser()
p.read_config({bundle!r} + "/configs/" + ("train.json" if mode == "baseline" else "inference.json"))
p["bundle_root"] = {bundle!r}
p["device"] = f"$torch.device({{dev!r}})"
p["output_dir"] = out
if mode == "baseline":
    from monai.inferers import SlidingWindowInferer
    from monai import transforms as mt
    net = p.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load({bundle!r} + "/models/model.pt", map_location="cpu", weights_only=True))
    net = net.to(device)
    roi = p.get_parsed_content("patch_size")
    pre = mt.Compose([
        mt.LoadImaged("image", ensure_channel_first=True, image_only=True),
        mt.Orientationd("image", axcodes=p["orientation"]), mt.Spacingd("image", pixdim=p["pixdim"]),
        mt.ScaleIntensityRanged(
            "image", a_min=p["hu_window"][0], a_max=p["hu_window"][1], b_min=0.0, b_max=1.0, clip=True
        ),
    ])
    t0 = time.perf_counter()
    data = pre({{"image": scan}})
    with torch.no_grad():
        prob = torch.sigmoid(
            SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=0.25, mode="constant")(
                data["image"][None].to(device), net
            )
        )
    torch.cuda.synchronize() if device.type == "cuda" else None
    seconds = time.perf_counter() - t0
    windows = None
else:
    p["input_path"] = scan
    p["tta"] = mode == "ours_tta"
    if mode == "ours_single_scale":
        p["infer_scales"] = [1.0]
    p["tta_flip_axes"] = tta_axes
    evaluator = p.get_parsed_content("evaluator")
    t0 = time.perf_counter()
    evaluator.run()
    seconds = time.perf_counter() - t0
    roi = p.get_parsed_content("infer_roi_size")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
gpu = torch.cuda.max_memory_allocated() / 1024 ** 3 if device.type == "cuda" else 0.0
print(json.dumps({{"mode": mode, "seconds": seconds, "peak_rss_gb": peak, "peak_gpu_gb": gpu, "roi": list(roi)}}))
"""


def synthetic_chest(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A 1 mm chest-like int16 HU volume ``(x, y, z)``: body, two lungs, vessels, five nodules."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]) - shape[0] / 2, np.arange(shape[1]) - shape[1] / 2, indexing="ij")
    hu = np.full(shape, -1000, np.int16)
    body = (x / (0.45 * shape[0])) ** 2 + (y / (0.33 * shape[1])) ** 2 <= 1
    lungs = (((np.abs(x) - 0.2 * shape[0]) / (0.15 * shape[0])) ** 2 + (y / (0.25 * shape[1])) ** 2) <= 1
    z0, z1 = int(0.1 * shape[2]), int(0.9 * shape[2])
    for z in range(shape[2]):
        sl = np.where(body, 40, -1000).astype(np.int16)
        if z0 <= z < z1:
            sl[lungs] = -850
        hu[:, :, z] = sl
    noise = rng.normal(0, 20, size=shape).astype(np.float32)
    hu = (hu + noise).astype(np.int16)
    zz, yy, xx = np.ogrid[: shape[2], : shape[1], : shape[0]]
    for _ in range(5):
        side = rng.choice([-1, 1])
        c = np.array(
            [
                shape[0] / 2 + side * 0.2 * shape[0] + rng.uniform(-20, 20),
                shape[1] / 2 + rng.uniform(-40, 40),
                rng.uniform(z0 + 0.1 * shape[2], z1 - 0.1 * shape[2]),
            ]
        )
        r = rng.uniform(3, 10)
        ball = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2 <= r * r).transpose(2, 1, 0)
        hu[ball] = 30
    return hu


def run_child(mode: str, scan: Path, work: Path, threads: int, tta_axes: list[int], device: str = "cpu") -> dict:
    out = Path(tempfile.mkdtemp(dir=work, prefix=mode))
    code = CHILD.format(bundle=str(BUNDLE))
    res = subprocess.run(
        [sys.executable, "-c", code, mode, str(scan), str(out), str(threads), json.dumps(tta_axes), device],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[350, 350, 300], help="scan size x y z (1 mm voxels)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    ap.add_argument("--tta-axes", type=int, nargs="+", default=[0, 1], help="flip axes of the TTA run")
    ap.add_argument("--modes", nargs="+", default=["ours", "baseline", "ours_single_scale", "ours_tta"])
    ap.add_argument("--device", default="cpu", help="torch device of every run (cpu, cuda, cuda:1)")
    ap.add_argument("--json", default=None, help="also write the runs here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scan = work / "chest.nii.gz"
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-stored like data_prep's outputs
        nib.save(nib.Nifti1Image(synthetic_chest(tuple(args.shape)), affine), scan)
        print(f"scan {args.shape} voxels at 1 mm, {args.threads} torch threads, device {args.device}", flush=True)
        runs = []
        for r in range(args.repeats):
            modes = args.modes if r % 2 == 0 else list(reversed(args.modes))
            for mode in modes:
                runs.append(run_child(mode, scan, work, args.threads, args.tta_axes, args.device))
                print(
                    f"  {mode:9s} {runs[-1]['seconds']:8.1f} s  {runs[-1]['peak_rss_gb']:5.2f} GB  "
                    f"GPU {runs[-1]['peak_gpu_gb']:5.2f} GB  roi {runs[-1]['roi']}",
                    flush=True,
                )
    best = {m: min((x for x in runs if x["mode"] == m), key=lambda x: x["seconds"]) for m in args.modes}
    print(f"{'':10s}{'best s':>9s}{'peak GB':>9s}")
    for m in args.modes:
        print(f"{m:10s}{best[m]['seconds']:9.1f}{best[m]['peak_rss_gb']:9.2f}")
    if "baseline" in best and "ours" in best:
        print(f"speed-up without TTA (baseline / ours): {best['baseline']['seconds'] / best['ours']['seconds']:.2f}x")
    if "baseline" in best and "ours_tta" in best:
        print(
            f"speed-up with TTA (baseline / ours_tta): {best['baseline']['seconds'] / best['ours_tta']['seconds']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "best": best}, indent=2))


if __name__ == "__main__":
    main()
