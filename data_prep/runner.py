"""Run independent cases of a step, in this process or in a pool, recording each in the manifest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from .outputs import Manifest

__all__ = ["run_cases"]


def run_cases(
    worker: Callable[..., dict], tasks: Sequence[tuple[str, tuple]], manifest: Manifest, *,
    workers: int = 1, progress: bool = True, desc: str = "cases",
) -> None:  # fmt: skip
    """Call ``worker(*args)`` for each ``(case_id, args)`` and record its result as it arrives.

    ``worker`` must never raise (it returns a record with ``status`` ``"ok"`` or ``"failed"``) and,
    for ``workers > 1``, must be a picklable top-level function. A worker process that dies (out
    of memory, killed) fails its case with a message asking for a rerun; the others go on.

    Args:
        worker: prepares one case and returns its manifest record.
        tasks: ``(case_id, args)`` pairs.
        manifest: receives one record per case (rewritten after each).
        workers: processes. Default 1 (run here, in order).
        progress: show a tqdm bar. Default True.
        desc: the bar's label. Default ``"cases"``.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="case", disable=not progress)
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
                    rec = {"status": "failed", "error": f"worker process died ({exc}); rerun to retry", "warnings": []}
                manifest.record(futures[fut], rec)
                bar.update()
    bar.close()
