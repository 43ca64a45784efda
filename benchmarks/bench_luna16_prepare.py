"""Benchmark: preparing one full-size LUNA16 ``.mhd`` scan with `data_prep luna16` against a naive baseline.

The scan is the demo world's LIDC-IDRI-0072 in LUNA16 form (305 slices of 512 x 512, 0.73 mm
pixels, 1.25 mm slices; ``write_synthetic_luna16(..., size="full")``), or any LUNA16 tree given
with ``--luna-root``/``--annotations``. Ours (``data_prep.steps.luna16.prepare_case``: checked MetaImage
read, one-pass ITK resampling, LIDC consensus masks, classical lung mask, ISA-L gzip) and the
baseline (SimpleITK read to a float array, ``scipy.ndimage.zoom`` order 1 to 1 mm, spheres of
``diameter_mm``, the scipy-only lung mask of ``naive_lidc_baseline.py``, nibabel writes) each run in a
fresh child process, alternating, ``--repeats`` times; the best time of each is compared; peak
memory is the child's max RSS. pylidc is imported before the clock starts (once per process in a
real run).

    python benchmarks/bench_luna16_prepare.py [--patient LIDC-IDRI-0072] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from child_runs import alternate, print_best, run_child  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
mode, mhd, csv_path, out = sys.argv[1:5]
from pathlib import Path
from data_prep.annotations.luna16_csv import read_annotations
from data_prep.steps.luna16 import Luna16Params, prepare_case
from data_prep.annotations.pylidc_compat import import_pylidc
pl = import_pylidc()
uid = Path(mhd).name[: -len(".mhd")]
anns = [a for a in read_annotations(csv_path) if a.seriesuid == uid]
patient = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first().patient_id
t0 = time.perf_counter()
if mode == "ours":
    rec = prepare_case(uid, mhd, "subset0", patient, anns, out, Luna16Params())
    assert rec["status"] == "ok", rec
    shape, native = rec["shape_zyx"], rec["native_shape_zyx"]
else:
    from bench_luna16_prepare import prepare_naive
    shape, native = prepare_naive(mhd, anns, Path(out))
seconds = time.perf_counter() - t0
print(json.dumps({{"mode": mode, "seconds": seconds,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "shape": list(shape), "native_shape": list(native), "n_annotations": len(anns)}}))
"""


def prepare_naive(mhd: str, annotations, out: Path, spacing: float = 1.0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The naive way (as older LUNA16 repositories do it); returns the output and native shapes (z, y, x)."""
    sys.path.insert(0, str(HERE))
    from naive_lidc_baseline import naive_lung_mask

    img = sitk.ReadImage(mhd)
    hu = np.clip(sitk.GetArrayFromImage(img).astype(np.float32), -1024, 3071)  # (z, y, x)
    sx, sy, sz = img.GetSpacing()
    origin = np.array(img.GetOrigin())
    factors = (sz / spacing, sy / spacing, sx / spacing)
    image = ndimage.zoom(hu, factors, order=1).astype(np.int16)
    labels = np.zeros(image.shape, dtype=np.uint8)
    zz, yy, xx = np.ogrid[: image.shape[0], : image.shape[1], : image.shape[2]]
    for k, a in enumerate(annotations, start=1):
        cx, cy, cz = (np.array([a.x, a.y, a.z]) - origin) / spacing
        ball = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= (a.diameter_mm / 2 / spacing) ** 2
        labels[ball] = k
    lungs = naive_lung_mask(image)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    affine[:2] *= -1  # LPS -> RAS for nibabel
    for name, arr in (("image", image), ("label", labels), ("lung", lungs)):
        nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), affine), str(out / f"{name}.nii.gz"))
    return image.shape, hu.shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="LIDC-IDRI-0072", help="LIDC scan to imitate (0072: 305 slices, 0.73 mm)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mhd", default=None, help="use this LUNA16 .mhd instead of a demo scan (with --annotations)")
    parser.add_argument("--annotations", default=None, help="LUNA16 annotations.csv for --mhd")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.mhd:
            mhd, csv_path = Path(args.mhd), Path(args.annotations)
        else:
            from data_prep.synthetic.luna16_mhd import write_synthetic_luna16

            print(f"writing a full-size demo scan of {args.patient} in LUNA16 form ...", flush=True)
            info = write_synthetic_luna16(work / "luna", patient_ids=[args.patient], size="full")
            mhd, csv_path = Path(info["scans"][0]["mhd"]), Path(info["annotations_csv"])
        code = CHILD.format(bench=str(HERE))
        runs = alternate(lambda mode: run_child(code, mode, [str(mhd), str(csv_path)], work), args.repeats)
    first = runs[0]
    nz, ny, nx = first["native_shape"]
    print(f"\nscan: {nz} slices of {ny} x {nx} (.mhd) -> {first['shape']} voxels (z, y, x) at 1 mm, "
          f"{first['n_annotations']} annotation(s)")  # fmt: skip
    print_best(runs, args.json)


if __name__ == "__main__":
    main()
