"""What MONAI lacks for the X-ray + DRR nodule segmenter: the fusion network, its losses, the training
phases, radiograph I/O with input checks, which inputs a run reads (and pairs), and the per-image
evaluation writer."""

from __future__ import annotations

from . import checkpoint, errors, flags, handlers, inputs, io, losses, network, phases

__all__ = ["checkpoint", "errors", "flags", "handlers", "inputs", "io", "losses", "network", "phases"]
