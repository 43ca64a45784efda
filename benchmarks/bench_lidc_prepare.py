"""Benchmark: preparing one full-size demo scan with `data_prep lidc` against the naive baseline.

Both run in fresh child processes on the same DICOM series, one after the other, twice
(alternating), and the best time of each is compared; peak memory is each child's max RSS.

    python benchmarks/bench_lidc_prepare.py [--patient LIDC-IDRI-0072] [--repeats 2] [--dicom-root DIR]

Prints a table and the ratio baseline / ours. Goal from the issue: ours <= 10 s and <= 3 GB per
scan on 2 cores, and >= 3x faster than the baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from child_runs import alternate, print_best, run_child  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
mode, root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from data_prep.io.dicom_index import index_dicom
from data_prep.annotations.pylidc_compat import import_pylidc
pl = import_pylidc()
(series,) = index_dicom(root).series.values()
t0 = time.perf_counter()
if mode == "ours":
    from data_prep.steps.lidc import LidcParams, prepare_case
    rec = prepare_case("case", series.series_uid, series.files, str(out), LidcParams())
    assert rec["status"] == "ok", rec
    shape = rec["shape_zyx"]
else:
    from naive_lidc_baseline import prepare_naive
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series.series_uid).first()
    shape = prepare_naive(list(series.files), scan, pl, out)
seconds = time.perf_counter() - t0
print(json.dumps({{"mode": mode, "seconds": seconds,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "shape": list(shape), "n_slices": len(series.files)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="LIDC-IDRI-0072", help="LIDC scan to imitate (0072: 305 slices, 0.73 mm)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dicom-root", default=None, help="use this single-series DICOM folder instead of a demo scan")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = Path(args.dicom_root) if args.dicom_root else work / "dicom"
        if not args.dicom_root:
            from data_prep.synthetic.lidc_dicom import write_synthetic_lidc

            print(f"writing a full-size demo scan of {args.patient} ...", flush=True)
            write_synthetic_lidc(root, patient_ids=[args.patient], size="full")
        code = CHILD.format(bench=str(HERE))
        runs = alternate(lambda mode: run_child(code, mode, [str(root)], work), args.repeats)
    print(f"\nscan: {runs[0]['n_slices']} slices of 512 x 512 -> {runs[0]['shape']} voxels (z, y, x) at 1 mm")
    print_best(runs, args.json)


if __name__ == "__main__":
    main()
