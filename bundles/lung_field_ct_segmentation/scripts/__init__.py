"""What MONAI lacks for the lung-field bundle: input checks and listing, slice sampling, clipping, HD95 in mm."""

from __future__ import annotations

from .data import load_datalist
from .handlers import GradientClipHandler, HausdorffDistanceMM
from .inputs import (
    FailedInputs,
    InferenceDataset,
    LoadCTd,
    SimpleITKReader,
    expand_inputs,
    inference_list,
    input_id,
    output_name_formatter,
)
from .transforms import CheckCTd, InputError, KeepInsideBodyd, SliceLabeld

__all__ = [
    "CheckCTd",
    "FailedInputs",
    "GradientClipHandler",
    "HausdorffDistanceMM",
    "InferenceDataset",
    "InputError",
    "KeepInsideBodyd",
    "LoadCTd",
    "SimpleITKReader",
    "SliceLabeld",
    "expand_inputs",
    "inference_list",
    "input_id",
    "load_datalist",
    "output_name_formatter",
]
