"""Run independent cases of a step, in this process, a local pool or on a Dask cluster, recording each in the manifest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from data_prep.run.manifest import CaseRecord, Manifest

__all__ = ["run_cases"]


def run_cases(
    worker: Callable[..., dict], tasks: Sequence[tuple[str, tuple]], manifest: Manifest, *,
    workers: int = 1, progress: bool = True, desc: str = "cases", scheduler: str | None = None,
) -> None:  # fmt: skip
    """Call ``worker(*args)`` for each ``(case_id, args)`` and record its result as it arrives.

    ``worker`` must never raise (it returns a record with ``status`` ``"ok"`` or ``"failed"``) and,
    for ``workers > 1`` or a ``scheduler``, must be a picklable top-level function. A worker process
    that dies (out of memory, killed) fails its case with a message asking for a rerun; the others
    go on. Records are written into the manifest here, by the driver, on every path, so outputs,
    resume and error records do not depend on where the cases ran.

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
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(worker, *args): case_id for case_id, args in tasks}
            for fut in as_completed(futures):
                try:
                    rec = fut.result()
                except BrokenProcessPool as exc:
                    rec = CaseRecord.failed(f"worker process died ({exc}); rerun to retry")
                manifest.record(futures[fut], rec)
                bar.update()
    bar.close()
