"""The embedded demo world: phantom chest CTs with real LIDC-IDRI geometry and real nodule outlines.

:mod:`~data_prep.synthetic.lidc_dicom` writes them as LIDC-IDRI DICOM (``synth-lidc``),
:mod:`~data_prep.synthetic.luna16_mhd` as LUNA16 ``.mhd`` with ``annotations.csv`` (``synth-luna16``);
:mod:`~data_prep.synthetic.phantom` renders the slices from the anatomy, trees and nodules modules.
"""
