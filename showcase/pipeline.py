"""The stages of the main job and the report built from what they wrote.

Each stage runs the commands a user would type (``python -m data_prep ...``,
``python -m monai.bundle run ...`` from the bundle folder); the report reads their outputs.
"""

from __future__ import annotations

from pathlib import Path

from showcase import sections
from showcase.commands import data_prep_command
from showcase.report import write_report
from showcase.stages import StageRunner, run_command

__all__ = ["run_main_job"]

# Scans whose LUNA16 reference standard (>= 3 readers, >= 3 mm) has nodules, so every fold has some.
LUNA16_PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0012", "LIDC-IDRI-0497", "LIDC-IDRI-0033",
                   "LIDC-IDRI-0132", "LIDC-IDRI-0461", "LIDC-IDRI-0002"]  # fmt: skip


def run_main_job(out: Path, patients: int = 8, workers: int = 2, seed: int = 0) -> tuple[Path, int]:
    """Run every stage into ``out`` and write ``out/report/index.html``.

    Returns:
        The report's path and the number of stages that did not succeed.
    """
    out = Path(out).resolve()
    runner = StageRunner(out)
    d = {
        "lidc_dicom": out / "lidc_dicom", "lidc_truth": out / "lidc_truth", "lidc": out / "lidc_prepared",
        "luna_raw": out / "luna16", "luna": out / "luna16_prepared",
    }  # fmt: skip
    w = ["--workers", workers, "--quiet"]
    runner.run(
        "generate demo LIDC-IDRI DICOM",
        lambda log: run_command(
            data_prep_command(
                "synth-lidc",
                "--out",
                d["lidc_dicom"],
                "--patients",
                patients,
                "--seed",
                seed,
                "--size",
                "small",
                "--truth-out",
                d["lidc_truth"],
                "--quiet",
            ),
            log,
        ),
    )
    runner.run(
        "prepare LIDC-IDRI",
        lambda log: run_command(
            data_prep_command("lidc", "--dicom-root", d["lidc_dicom"], "--out", d["lidc"], *w), log
        ),
        needs=["generate demo LIDC-IDRI DICOM"],
    )
    runner.run(
        "generate demo LUNA16",
        lambda log: run_command(
            data_prep_command(
                "synth-luna16", "--out", d["luna_raw"], "--patient-ids", *LUNA16_PATIENTS, "--size", "small", "--quiet"
            ),
            log,
        ),
    )
    runner.run(
        "prepare LUNA16",
        lambda log: run_command(
            data_prep_command(
                "luna16",
                "--luna-root",
                d["luna_raw"],
                "--annotations",
                d["luna_raw"] / "annotations.csv",
                "--out",
                d["luna"],
                "--folds",
                4,
                *w,
            ),
            log,
        ),
        needs=["generate demo LUNA16"],
    )
    secs = sections.run_bundle_stages(runner, out, d, workers)
    report = write_report(out / "report" / "index.html", out / "stages.json", secs)
    n_bad = sum(r.status != "ok" for r in runner.results.values())
    return report, n_bad
