"""What MONAI lacks for the LUNA16 nodule segmenter: the deep-supervision AttentionUnet, input checks,
the nodule table, hard-negative patch sampling, sliding-window TTA, FROC/CPM evaluation, and a faster CPU convolution backward."""

from __future__ import annotations

from . import cpu_conv, data, detection, flags, handlers, inferer, network, sampling, transforms
from .data import inference_items, load_split
from .handlers import NoduleEvaluationHandler, NoduleTableWriter
from .inferer import NoduleSlidingWindowInferer
from .network import DeepSupervisionAttentionUnet
from .sampling import HardNegativeIndicesd, attached_scan_sampler
from .transforms import CheckSized, CheckSpacingd, InForegroundBoxd, NoduleTabled

__all__ = [
    "cpu_conv", "data", "detection", "flags", "handlers", "inferer", "network", "sampling", "transforms", "load_split", "inference_items",
    "NoduleEvaluationHandler", "NoduleTableWriter", "NoduleSlidingWindowInferer", "DeepSupervisionAttentionUnet",
    "CheckSized", "CheckSpacingd", "HardNegativeIndicesd", "InForegroundBoxd", "NoduleTabled", "attached_scan_sampler",
]
