"""What MONAI lacks for the lung-field bundle: input and checkpoint checks, input listing, slice sampling, clipping,
HD95 in mm."""

from __future__ import annotations

from .checkpoint import CheckpointError, CheckpointLoader, load_weights, read_state_dict
from .data import CheckedCacheDataset, load_datalist
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
    read_problem,
)
from .transforms import CheckCTd, InputError, KeepInsideBodyd, SliceLabeld

__all__ = [
    "CheckCTd",
    "CheckedCacheDataset",
    "CheckpointError",
    "CheckpointLoader",
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
    "load_weights",
    "output_name_formatter",
    "read_problem",
    "read_state_dict",
]
