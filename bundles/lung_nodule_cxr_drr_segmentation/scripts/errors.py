"""One line, not a traceback, for what the user can fix: a bad input, a bad checkpoint, a file that cannot be written.

``monai.bundle run`` wraps every exception of a config expression or component in its own
(``Failed to evaluate ConfigExpression``, ``Failed to instantiate component``), so that the one line
that says what is wrong ends a traceback of a hundred lines. :func:`report_user_errors`, the first
``initialize`` step of each config, makes such a run end with that line and exit status 1 instead;
any other exception (a bug) keeps its full traceback.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from .checkpoint import CheckpointError
from .inputs import InputError

__all__ = ["report_user_errors", "user_error"]

logger = logging.getLogger("scripts")


def user_error(exc: BaseException | None) -> BaseException | None:
    """The first exception along ``exc``'s chain (itself, then each ``raise ... from`` cause) that the user can fix.

    That is an :class:`~scripts.inputs.InputError`, a :class:`~scripts.checkpoint.CheckpointError`, or an
    ``OSError`` that names its file (cannot write the output folder, disk full); None if there is none.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (InputError, CheckpointError)) or (isinstance(exc, OSError) and exc.filename):
            return exc
        exc = exc.__cause__
    return None


def report_user_errors() -> None:
    """Make an uncaught user error (:func:`user_error`) end the process with its one line and exit status 1.

    Installs a ``sys.excepthook`` that logs that line as an error and keeps the previous hook for
    everything else. Installing it twice is harmless.
    """
    previous = sys.excepthook
    if getattr(previous, "_reports_user_errors", False):
        return

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        found = user_error(exc)
        if found is None:
            previous(kind, exc, tb)
            return
        logger.error(str(found).strip().splitlines()[0] if str(found).strip() else type(found).__name__)

    hook._reports_user_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
