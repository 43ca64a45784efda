"""What MONAI lacks for the LUNA16 nodule segmenter: the deep-supervision AttentionUnet, input checks and
inference inputs (any scan format, bad inputs refused by name, NaN voxels read as air), a checked checkpoint
loader, the nodule and scan tables, hard-negative patch sampling, sliding-window TTA, FROC/CPM evaluation."""

from __future__ import annotations

from . import checkpoint, data, detection, flags, handlers, inferer, inputs, network, sampling, transforms
from .checkpoint import CheckpointLoader
from .data import inference_items, load_split
from .handlers import NoduleEvaluationHandler, NoduleTableWriter
from .inferer import NoduleSlidingWindowInferer
from .inputs import InputDataset, LoadScand, SimpleITKReader, expand_inputs, input_id
from .network import DeepSupervisionAttentionUnet
from .sampling import HardNegativeIndicesd, attached_scan_sampler
from .transforms import CheckBodyd, CheckSized, CheckSpacingd, InForegroundBoxd, NoduleTabled, NonFiniteToAird

__all__ = [
    "checkpoint",
    "data",
    "detection",
    "flags",
    "handlers",
    "inferer",
    "inputs",
    "network",
    "sampling",
    "transforms",
    "load_split",
    "inference_items",
    "expand_inputs",
    "input_id",
    "InputDataset",
    "LoadScand",
    "SimpleITKReader",
    "NoduleEvaluationHandler",
    "NoduleTableWriter",
    "NoduleSlidingWindowInferer",
    "DeepSupervisionAttentionUnet",
    "CheckpointLoader",
    "CheckBodyd",
    "NonFiniteToAird",
    "CheckSized",
    "CheckSpacingd",
    "HardNegativeIndicesd",
    "InForegroundBoxd",
    "NoduleTabled",
    "attached_scan_sampler",
]
