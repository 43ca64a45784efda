"""What MONAI lacks for the pGGN classifier: networks, table reading and checks, batch preparation,
the masked-reconstruction loss, the inference inputs (files, folders, lists, nodule boxes),
binary-classification metrics and their report handler."""

from __future__ import annotations

from . import checkpoint, engine, flags, handlers, inputs, metrics, networks, table, transforms

__all__ = ["checkpoint", "engine", "flags", "handlers", "inputs", "metrics", "networks", "table", "transforms"]
