"""Shared helpers for the bundle tests: run a bundle the way users do, import its scripts, demo data.

Bundles never import ``data_prep``; the tests do, to make the data a bundle trains on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.steps.lidc import LidcParams, prepare_lidc
from data_prep.steps.luna16 import prepare_luna16
from data_prep.synthetic.lidc_dicom import write_synthetic_lidc
from data_prep.synthetic.luna16_mhd import write_synthetic_luna16
from showcase.commands import BUNDLES, REPO, bundle_command

__all__ = ["BUNDLES", "REPO", "run_bundle", "ddp_release_probe", "assert_ddp_released_before_exit", "bundle_scripts"]

# Demo patients of the bundle tests: solid and ground-glass nodules of several sizes.
DEMO_PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0497", "LIDC-IDRI-0003", "LIDC-IDRI-0012"]


def run_bundle(
    bundle: str | Path, config_files: list[str], *, timeout: int = 600, env: dict | None = None, **overrides
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` from the bundle folder, as the docs tell users to.

    Args:
        bundle: bundle folder (or its name under ``bundles/``).
        config_files: config files relative to the bundle folder, e.g. ``["configs/train.json"]``.
        timeout: seconds before the run is killed. Default 600.
        env: extra environment variables. Default None.
        overrides: config overrides, passed as ``--key value`` by :func:`showcase.commands.bundle_command`
            (``#`` in keys is written as ``__``: ``train__trainer__max_epochs=1`` becomes
            ``--train#trainer#max_epochs 1``; values as Python literals, e.g. ``[0, 1]``, ``True``).

    Returns:
        The finished process; a non-zero exit fails the test with the tail of its output.
    """
    folder = Path(bundle) if Path(bundle).is_absolute() else BUNDLES / bundle
    cmd = bundle_command([str(folder / c) for c in config_files], **overrides)
    full_env = {**os.environ, "PYTHONPATH": "", **(env or {})}
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        pytest.fail(f"bundle run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def ddp_release_probe(bundle: str | Path, tmp_path: Path) -> str:
    """Write a config that makes each torchrun rank report when its DistributedDataParallel wrapper is freed.

    Put it after ``multi_gpu_train.json`` in ``--config_file`` and run torchrun with ``--tee 3``; then
    :func:`assert_ddp_released_before_exit` checks the output. It keeps the bundle's own ``finalize``
    steps and adds two probes before them: an exit hook registered first (so it runs last) that prints
    ``PROBE_EXIT``, and a weak-reference callback that prints ``PROBE_DDP_FREED`` when the wrapper is
    garbage-collected. A wrapper still alive when the interpreter shuts down keeps gloo's process group
    alive into C++ teardown, where it aborts the process now and then (``terminate called without an
    active exception``, exit -6) after a training that had finished and saved its checkpoint.
    """
    folder = Path(bundle) if Path(bundle).is_absolute() else BUNDLES / bundle
    own = json.loads((folder / "configs" / "multi_gpu_train.json").read_text())["finalize"]
    probe = {
        "probe_atexit": "$__import__('atexit')",
        "probe_weakref": "$__import__('weakref')",
        "finalize": [
            "$@probe_atexit.register(print, 'PROBE_EXIT', flush=True)",
            "$setattr(@probe_weakref.finalize(@network, print, 'PROBE_DDP_FREED', flush=True), 'atexit', False)",
            *own,
        ],
    }
    path = tmp_path / "ddp_release_probe.json"
    path.write_text(json.dumps(probe))
    return str(path)


def assert_ddp_released_before_exit(stdout: str, world_size: int = 2) -> None:
    """Each rank freed its DDP wrapper (and so its process group) before its last exit hook ran."""
    for rank in range(world_size):
        lines = [ln.split(":", 1)[1].strip() for ln in stdout.splitlines() if ln.startswith(f"[default{rank}]:")]
        probes = [ln for ln in lines if ln in ("PROBE_DDP_FREED", "PROBE_EXIT")]
        assert probes == ["PROBE_DDP_FREED", "PROBE_EXIT"], (
            f"rank {rank}: {probes} (the DDP wrapper outlived the interpreter's exit hooks)"
        )


@contextlib.contextmanager
def bundle_scripts(bundle: str | Path):
    """Import a bundle's ``scripts`` package in this process (each bundle has its own ``scripts``)."""
    folder = Path(bundle) if Path(bundle).is_absolute() else BUNDLES / bundle
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("scripts")
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]


@pytest.fixture(scope="session")
def lidc_demo_prepared(tmp_path_factory) -> Path:
    """The demo world's DEMO_PATIENTS as DICOM ("small" runs), prepared by the ``lidc`` step at 1 mm."""
    root = tmp_path_factory.mktemp("lidc_demo")
    write_synthetic_lidc(root / "dicom", patient_ids=DEMO_PATIENTS, size="small")
    prepare_lidc(root / "dicom", root / "prepared", LidcParams(folds=2), workers=2, progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def luna16_demo_prepared(tmp_path_factory) -> Path:
    """The demo world's DEMO_PATIENTS as LUNA16 ``.mhd`` ("small" runs), prepared by the ``luna16`` step."""
    root = tmp_path_factory.mktemp("luna16_demo")
    info = write_synthetic_luna16(root / "luna16", patient_ids=DEMO_PATIENTS, size="small")
    prepare_luna16(root / "luna16", info["annotations_csv"], root / "prepared", workers=2, progress=False)
    return root / "prepared"
