"""Run the cases of a step on a Dask distributed cluster (``--scheduler tcp://host:port``).

The driver (the process that runs ``python -m data_prep ...``) submits one task per case to the
scheduler, collects the records as they finish and writes them into ``manifest.json`` itself,
exactly as the local process pool does: same files, same records, same resume. Workers read the
inputs and write the case's files directly, so every worker must see the input and output
folders at the same paths as the driver (a shared filesystem such as NFS), and must have the same
``data_prep`` (and pylidc) installed.

Failures stay per case: a case whose worker raises or dies (out of memory, killed) is recorded as
failed with the reason; the other cases go on. Dask's own retry of a task whose worker died is
governed by the scheduler's ``distributed.scheduler.allowed-failures`` (3 by default); after that
the case is failed with a message asking for a rerun. Tasks that raise are never retried
(``retries=0``): a case that fails once fails the same way again.

``distributed`` is an optional dependency (``pip install lung-bundles-data-prep[dask]``); it is
imported only when a scheduler address is given.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from functools import partial

from data_prep.run.manifest import CaseRecord, Manifest

__all__ = ["SchedulerError", "connect", "run_cases_dask"]

# One case at a time per worker process: pylidc keeps one module-level SQLAlchemy session (not
# thread-safe), and a case's peak memory is what a worker's memory limit should be sized for.
_CASE_LOCK = threading.Lock()


class SchedulerError(ConnectionError):
    """The Dask scheduler cannot be reached or its workers cannot do the work; the message says why."""


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SchedulerError(
            "--scheduler needs the Dask packages: pip install 'lung-bundles-data-prep[dask]' (dask, distributed)"
        ) from exc
    return distributed


def connect(scheduler: str, timeout: float | str | None = None):
    """A ``distributed.Client`` connected to ``scheduler`` (not made the default Dask client).

    Args:
        scheduler: the scheduler's address, e.g. ``"tcp://10.0.0.5:8786"``.
        timeout: seconds to wait for the connection. Default None: Dask's
            ``distributed.comm.timeouts.connect`` (30 s unless configured).

    Raises:
        SchedulerError: distributed is not installed or the scheduler does not answer.
    """
    distributed = _import_distributed()
    if timeout is None:
        import dask

        timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        return distributed.Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc


def _writable(folder: str) -> bool:
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


def _check_workers(client, out: str, scheduler: str) -> None:
    """Warn when no worker is connected; raise when a connected worker cannot write ``out``."""
    can = client.run(_writable, out)
    if not can:
        import warnings

        warnings.warn(f"no Dask worker is connected to {scheduler} yet: cases wait until one joins", stacklevel=3)
    cannot = sorted(addr for addr, ok in can.items() if not ok)
    if cannot:
        raise SchedulerError(
            f"Dask worker(s) {', '.join(cannot)} cannot write to the output folder {out}: "
            "every worker must see the input "
            "and output folders at the same paths as this machine (a shared filesystem)"
        )


def _run_one(worker: Callable[..., dict], args: tuple) -> dict:
    """Run on a Dask worker: one case, holding the worker process' case lock."""
    with _CASE_LOCK:
        return worker(*args)


def _error_record(exc: BaseException) -> dict:
    distributed = _import_distributed()
    if isinstance(exc, distributed.KilledWorker):
        msg = f"Dask worker died while preparing this case (out of memory or killed; {exc}); rerun to retry"
    elif isinstance(exc, ImportError):
        msg = f"{type(exc).__name__} on the Dask worker: {exc} (is data_prep installed on every worker?)"
    elif isinstance(exc, CancelledError):  # distributed's FutureCancelledError derives from it
        msg = f"Dask task was cancelled ({exc}); rerun to retry"
    else:
        msg = f"{type(exc).__name__} on the Dask worker: {exc}"
    return CaseRecord.failed(msg)


def run_cases_dask(
    worker: Callable[..., dict], tasks: Sequence[tuple[str, tuple]], manifest: Manifest, scheduler: str, bar,
) -> None:  # fmt: skip
    """Submit ``worker(*args)`` per ``(case_id, args)`` to the cluster; record each result as it arrives.

    Args:
        worker: prepares one case and returns its manifest record; a picklable top-level
            function importable on the workers.
        tasks: ``(case_id, args)`` pairs.
        manifest: receives one record per case, written here in the driver (rewritten after each).
        scheduler: the Dask scheduler's address, e.g. ``"tcp://10.0.0.5:8786"``.
        bar: a tqdm bar, advanced once per case.

    Raises:
        SchedulerError: the scheduler cannot be reached, or a worker cannot write the output folder.
    """
    distributed = _import_distributed()
    if not tasks:
        return
    client = connect(scheduler)
    try:
        _check_workers(client, str(manifest.path.parent.resolve()), scheduler)
        step_fn = worker.args[0] if isinstance(worker, partial) and worker.args else worker  # run_cases' stamped()
        name = getattr(step_fn, "__module__", "case").rsplit(".", 1)[-1]
        run = uuid.uuid4().hex[:8]
        # one graph update for all cases: Dask then sees one large group of independent tasks and
        # queues them on the scheduler, handing each worker thread about one case at a time
        keys = [f"data_prep-{name}-{run}-{case_id}" for case_id, _ in tasks]
        submitted = client.map(partial(_run_one, worker), [args for _, args in tasks], key=keys, pure=False, retries=0)
        futures = {fut: case_id for fut, (case_id, _) in zip(submitted, tasks)}
        for fut in distributed.as_completed(futures, loop=client.loop):
            try:
                rec = fut.result()
            except Exception as exc:  # a worker died, the task raised or was cancelled: only this case fails
                rec = _error_record(exc)
            manifest.record(futures[fut], rec)
            bar.update()
            fut.release()
    finally:
        client.close()
