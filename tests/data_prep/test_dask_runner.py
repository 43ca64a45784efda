"""data_prep on a Dask cluster: a two-worker LocalCluster gives the single-process outputs, resumes, records failures."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.__main__ import main

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0497"]


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1, no dashboard.

    ``allowed-failures: 0`` makes a task whose worker dies fail at once (default: tried on 3 more
    workers), and ``worker-saturation: 1.0`` gives each worker only the task it runs, so a death
    cannot blame a case that was merely queued behind it.
    """
    cfg = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(cfg):
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        ) as lc:  # fmt: skip
            yield lc


def _cases_run_on(lc) -> int:
    """Tasks of data_prep steps that reached memory on the cluster's scheduler so far."""
    return sum(
        tp.state_counts.get("memory", 0)
        for name, tp in lc.scheduler.task_prefixes.items()
        if name.startswith("data_prep")
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cluster):
    """The demo world (two patients) prepared once in this process and once on the cluster."""
    root = tmp_path_factory.mktemp("dask_demo")
    assert main(["synth-lidc", "--out", str(root / "dicom"), "--patient-ids", *PATIENTS, "--quiet"]) == 0
    assert main(["lidc", "--dicom-root", str(root / "dicom"), "--out", str(root / "single"), "--quiet"]) == 0
    before = _cases_run_on(cluster)
    rc = main(
        [
            "lidc",
            "--dicom-root",
            str(root / "dicom"),
            "--out",
            str(root / "dask"),
            "--quiet",
            "--scheduler",
            cluster.scheduler_address,
        ]
    )
    assert rc == 0
    assert _cases_run_on(cluster) - before == len(PATIENTS), "the cases did not run on the cluster"
    return root


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _manifest_without_timings(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    for rec in m["cases"].values():
        rec.pop("seconds")
    return m


def test_cluster_run_equals_single_process_run(demo):
    """Same files, same voxels and geometry, same nodules.csv and datalist.json, manifest equal up to timings."""
    single, dask_out = demo / "single", demo / "dask"
    assert _files(single) == _files(dask_out)
    images = [f for f in _files(single) if f.endswith(".nii.gz")]
    assert len(images) == 3 * len(PATIENTS)
    for f in images:
        a, b = sitk.ReadImage(str(single / f)), sitk.ReadImage(str(dask_out / f))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), f
        assert (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (b.GetOrigin(), b.GetSpacing(), b.GetDirection()), f
    for table in ("nodules.csv", "datalist.json"):
        assert (single / table).read_text() == (dask_out / table).read_text(), table
    m_single, m_dask = _manifest_without_timings(single), _manifest_without_timings(dask_out)
    assert m_single == m_dask
    assert m_dask["summary"] == {"ok": len(PATIENTS), "failed": 0, "errors": 0}


def test_luna16_on_the_cluster_equals_single_process_run(cluster, tmp_path):
    """The luna16 step on the cluster writes what it writes in this process (manifest equal up to timings)."""
    luna = tmp_path / "luna16"
    assert main(["synth-luna16", "--out", str(luna), "--patient-ids", PATIENTS[0], "--quiet"]) == 0
    args = ["luna16", "--luna-root", str(luna), "--annotations", str(luna / "annotations.csv"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    before = _cases_run_on(cluster)
    assert main([*args, "--out", str(tmp_path / "dask"), "--scheduler", cluster.scheduler_address]) == 0
    assert _cases_run_on(cluster) - before == 1
    single, dask_out = tmp_path / "single", tmp_path / "dask"
    assert _files(single) == _files(dask_out)
    for f in _files(single):
        if f.endswith(".nii.gz"):
            a, b = sitk.ReadImage(str(single / f)), sitk.ReadImage(str(dask_out / f))
            assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), f
    for table in ("nodules.csv", "datalist.json"):
        assert (single / table).read_text() == (dask_out / table).read_text(), table
    assert _manifest_without_timings(single) == _manifest_without_timings(dask_out)


def test_cluster_rerun_redoes_only_missing_cases(demo, cluster, tmp_path):
    """A rerun on the cluster leaves finished cases untouched and prepares only the one whose image was deleted."""
    out = tmp_path / "resume"
    shutil.copytree(demo / "dask", out)
    gone = out / "images" / f"{PATIENTS[1]}.nii.gz"
    gone.unlink()
    kept = {f: (out / f).stat().st_mtime_ns for f in _files(out) if f.endswith(f"{PATIENTS[0]}.nii.gz")}
    assert len(kept) == 3
    seconds_before = json.loads((out / "manifest.json").read_text())["cases"][PATIENTS[0]]["seconds"]
    before = _cases_run_on(cluster)
    rc = main(
        [
            "lidc",
            "--dicom-root",
            str(demo / "dicom"),
            "--out",
            str(out),
            "--quiet",
            "--scheduler",
            cluster.scheduler_address,
        ]
    )
    assert rc == 0 and gone.exists()
    assert _cases_run_on(cluster) - before == 1
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"][PATIENTS[0]]["seconds"] == seconds_before
    assert manifest["summary"]["ok"] == len(PATIENTS)
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(gone))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(demo / "dask" / gone.relative_to(out)))),
    )


def test_failing_case_is_recorded_and_the_others_finish(demo, cluster, tmp_path, capsys):
    """A truncated slice fails its case on the cluster (named in manifest and stderr, exit 1); the other case is written."""
    dicom = tmp_path / "dicom"
    shutil.copytree(demo / "dicom", dicom)
    bad = sorted((dicom / PATIENTS[1]).rglob("*.dcm"))[3]
    bad.write_bytes(bad.read_bytes()[:4000])
    out = tmp_path / "out"
    rc = main(
        ["lidc", "--dicom-root", str(dicom), "--out", str(out), "--quiet", "--scheduler", cluster.scheduler_address]
    )
    assert rc == 1
    cases = json.loads((out / "manifest.json").read_text())["cases"]
    assert cases[PATIENTS[0]]["status"] == "ok" and (out / "images" / f"{PATIENTS[0]}.nii.gz").exists()
    assert cases[PATIENTS[1]]["status"] == "failed" and bad.name in cases[PATIENTS[1]]["error"]
    assert not (out / "images" / f"{PATIENTS[1]}.nii.gz").exists()
    assert bad.name in capsys.readouterr().err


def _toy_case(case_id: str, out: str) -> dict:
    """A case for the runner: kills its worker process for ``"dies"``, else writes ``<case_id>.txt``."""
    if case_id == "dies":
        os._exit(1)
    Path(out, f"{case_id}.txt").write_text(str(os.getpid()))
    return {"status": "ok", "error": None, "warnings": [], "files": {"text": f"{case_id}.txt"}}


def test_dead_worker_fails_only_its_case(cluster, tmp_path):
    """A case whose Dask worker process dies is recorded as failed with the reason; the other cases finish on the cluster."""
    from data_prep.run.cases import run_cases
    from data_prep.run.manifest import Manifest

    manifest = Manifest(tmp_path / "manifest.json", "toy", {})
    ids = ["a", "b", "dies", "c", "d", "e"]  # more cases than 2 x threads: Dask queues them, one per worker
    run_cases(
        _toy_case, [(c, (c, str(tmp_path))) for c in ids], manifest, progress=False, scheduler=cluster.scheduler_address
    )
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["summary"] == {"ok": 5, "failed": 1, "errors": 0}
    assert "worker died" in saved["cases"]["dies"]["error"]
    pids = {(tmp_path / f"{c}.txt").read_text() for c in ids if c != "dies"}
    assert str(os.getpid()) not in pids, "cases ran in the driver, not on the cluster"


def test_workers_that_cannot_write_the_output_stop_the_run_before_any_case(cluster, tmp_path):
    """When the workers do not see the output folder (no shared filesystem), nothing is submitted and the error names them."""
    from data_prep.run.cases import run_cases
    from data_prep.run.dask_cluster import SchedulerError
    from data_prep.run.manifest import Manifest

    unseen = tmp_path / "not_on_the_workers"  # the driver has not created it: no worker can write there
    manifest = Manifest(unseen / "manifest.json", "toy", {})
    before = _cases_run_on(cluster)
    with pytest.raises(SchedulerError, match="cannot write to the output folder") as exc:
        run_cases(
            _toy_case, [("a", ("a", str(tmp_path)))], manifest, progress=False, scheduler=cluster.scheduler_address
        )
    assert re.search(r"worker\(s\) tcp://127\.0\.0\.1:\d+", str(exc.value)), "the workers are not named"
    assert _cases_run_on(cluster) == before and not (tmp_path / "a.txt").exists()


def test_bad_or_unreachable_scheduler_exits_2(tmp_path, capsys):
    """A malformed address is refused by the parser and an unreachable scheduler stops the run before any work, exit 2."""
    args = ["lidc", "--dicom-root", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--scheduler", "no-port-here"])
    assert exc.value.code == 2 and "tcp://HOST:PORT" in capsys.readouterr().err
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main([*args, "--scheduler", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("step", ["pggn", "drr"])
def test_newer_steps_on_the_cluster_equal_single_process_run(demo, cluster, tmp_path, step):
    """pggn and drr on the cluster write the same files and tables as in this process, and their cases ran on the cluster."""
    extra = ["--size", "64", "--poses", "1"] if step == "drr" else []
    single, dask_out = tmp_path / "single", tmp_path / "dask"
    assert main([step, "--prepared", str(demo / "single"), "--out", str(single), *extra, "--quiet"]) == 0
    before = _cases_run_on(cluster)
    assert (
        main(
            [
                step,
                "--prepared",
                str(demo / "single"),
                "--out",
                str(dask_out),
                *extra,
                "--quiet",
                "--scheduler",
                cluster.scheduler_address,
            ]
        )
        == 0
    )
    assert _cases_run_on(cluster) - before == len(PATIENTS), "the cases did not run on the cluster"
    assert _files(single) == _files(dask_out)
    for f in _files(single):
        if f.endswith(".nii.gz"):
            a, b = (
                sitk.GetArrayFromImage(sitk.ReadImage(str(single / f))),
                sitk.GetArrayFromImage(sitk.ReadImage(str(dask_out / f))),
            )
            assert np.allclose(a, b), f
    table = "pggn.csv" if step == "pggn" else "datalist.json"
    assert (single / table).read_text() == (dask_out / table).read_text()
