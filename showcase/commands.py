"""The command lines the main job runs, as a user would type them; the bundle tests use them too.

``data_prep_command`` is ``python -m data_prep ...``; ``bundle_command`` is ``python -m monai.bundle
run`` with config files and overrides, to run from the bundle's folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["REPO", "BUNDLES", "data_prep_command", "bundle_command"]

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


def data_prep_command(*args: object) -> list[str]:
    """``python -m data_prep`` with ``args`` (each turned into a string)."""
    return [sys.executable, "-m", "data_prep", *map(str, args)]


def bundle_command(config_files: list[str], **overrides: object) -> list[str]:
    """``python -m monai.bundle run`` with config files and overrides.

    Args:
        config_files: config files, relative to the bundle folder (the command's working folder) or
            absolute; several are passed as one list.
        overrides: ``--key value`` pairs. ``#`` in keys is written ``__`` (``train__trainer__max_epochs=2``
            becomes ``--train#trainer#max_epochs 2``). Values are written with ``str``: strings and paths
            as they are, numbers, lists and booleans as Python literals, which ``monai.bundle run`` (Fire)
            reads back as the same values (``[96, 96]``, ``True``).
    """
    files = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key.replace('__', '#')}", str(value)]
    return cmd
