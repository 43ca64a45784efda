"""Raw LIDC-IDRI / LUNA16 data into resampled, HU-normalized training sets."""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["__version__"]
