"""What MONAI lacks for the lung-field bundle: input checks, slice sampling, clipping, HD95 in mm, data lists."""

from __future__ import annotations

from .data import inference_list, load_datalist, output_name_formatter
from .handlers import GradientClipHandler, HausdorffDistanceMM
from .transforms import CheckCTd, InputError, KeepInsideBodyd, SliceLabeld

__all__ = [
    "CheckCTd",
    "GradientClipHandler",
    "HausdorffDistanceMM",
    "InputError",
    "KeepInsideBodyd",
    "SliceLabeld",
    "inference_list",
    "load_datalist",
    "output_name_formatter",
]
