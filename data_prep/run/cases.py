"""Run independent cases of a step, in this process, a local pool or on a Dask cluster, recording each in the
manifest."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

from data_prep.io.writers import file_stamp
from data_prep.run.manifest import CaseRecord, Manifest

__all__ = ["run_cases", "stamped"]


def stamped(worker: Callable[..., dict], root: str, *args) -> dict:
    """Run ``worker(*args)`` and add the size and SHA-256 of each file of a finished case (``stamps``).

    Runs where the case ran (a worker process, a Dask worker), so a rerun can tell a finished case's
    files from damaged ones (:meth:`Manifest.finished`) without the driver reading every file twice.
    """
    rec = worker(*args)
    if rec.get("status") == "ok" and rec.get("files"):
        try:
            rec["stamps"] = {rel: file_stamp(Path(root) / rel) for rel in rec["files"].values()}
        except OSError as exc:
            rec = CaseRecord.failed(f"cannot read back a written file: {exc}")
    return rec


def _die_with_driver(poll_s: float = 0.5) -> None:
    """Pool initializer: exit this worker process when its parent (the driver, or the pool's fork
    server) is gone, so a killed driver leaves no worker writing on (killed workers' temporary files
    are removed by the next run)."""
    parent = os.getppid()

    def _watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=_watch, name="data_prep-driver-watch", daemon=True).start()


def run_cases(
    worker: Callable[..., dict], tasks: Sequence[tuple[str, tuple]], manifest: Manifest, *,
    workers: int = 1, progress: bool = True, desc: str = "cases", scheduler: str | None = None,
) -> None:  # fmt: skip
    """Call ``worker(*args)`` for each ``(case_id, args)`` and record its result as it arrives.

    ``worker`` must never raise (it returns a record with ``status`` ``"ok"`` or ``"failed"``) and,
    for ``workers > 1`` or a ``scheduler``, must be a picklable top-level function. A worker process
    that dies (out of memory, killed) fails its case with a message asking for a rerun; the others
    go on; worker processes exit when the driver dies. Records are written into the manifest here, by the
    driver, on every path, so outputs, resume and error records do not depend on where the cases ran.
    Each finished case's files get their size and SHA-256 recorded (``stamps``, see :func:`stamped`).

    Args:
        worker: prepares one case and returns its manifest record.
        tasks: ``(case_id, args)`` pairs.
        manifest: receives one record per case (rewritten after each).
        workers: processes. Default 1 (run here, in order). Ignored with ``scheduler``.
        progress: show a tqdm bar. Default True.
        desc: the bar's label. Default ``"cases"``.
        scheduler: a Dask scheduler address (``"tcp://host:port"``): run each case as a task on
            that cluster (see :mod:`data_prep.run.dask_cluster`). Default None (local).

    Raises:
        SchedulerError: ``scheduler`` is given but cannot be reached or its workers cannot write
            the output folder (nothing is submitted then).
    """
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="case", disable=not progress)
    worker = partial(stamped, worker, str(manifest.path.parent.absolute()))
    if scheduler:
        from data_prep.run.dask_cluster import run_cases_dask

        try:
            run_cases_dask(worker, tasks, manifest, scheduler, bar)
        finally:
            bar.close()
        return
    if workers <= 1:
        for case_id, args in tasks:
            bar.set_postfix_str(case_id[-24:])
            manifest.record(case_id, worker(*args))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_driver) as pool:
            futures = {pool.submit(worker, *args): case_id for case_id, args in tasks}
            for fut in as_completed(futures):
                try:
                    rec = fut.result()
                except BrokenProcessPool as exc:
                    rec = CaseRecord.failed(f"worker process died ({exc}); rerun to retry")
                manifest.record(futures[fut], rec)
                bar.update()
    bar.close()
