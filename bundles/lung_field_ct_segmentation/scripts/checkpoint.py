"""Loading ``models/model.pt`` with ``weights_only=True`` and one-line messages that name the checkpoint.

A small copy of the pGGN bundle's ``load_weights`` (bundles cannot import each other), plus
:class:`CheckpointLoader`, MONAI's handler of the same name with these checks, for the configs.
"""

from __future__ import annotations

import os
import re

import torch
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader

__all__ = ["CheckpointError", "CheckpointLoader", "load_weights", "read_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not a plain state dict, or of another network."""


def _load_problem(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words."""
    text = str(exc)
    wanted = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if wanted:  # a pickle of objects: loading it would run their code
        return f"it is a pickle that needs code to load ({wanted.group(1)}), refused by weights_only=True"
    if "weights only load failed" in text.lower():
        return "it is a pickle that weights_only=True refuses"
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(exc).__name__
    return f"it cannot be read, the file is truncated or corrupt ({first})"


def read_state_dict(path: str | os.PathLike, map_location=None) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (plain, or under ``"model"`` as ignite saves several objects).

    Raises:
        CheckpointError: naming ``path``: missing, empty, unreadable (truncated, a pickle that needs code),
            or not a dict of name -> tensor (e.g. a bare tensor or a list).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: checkpoint is an empty file (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError (zip archive), ...
        problem = _load_problem(exc)
        raise CheckpointError(f"{path}: not a plain state dict loadable with weights_only=True: {problem}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a plain state dict (it holds a {type(state).__name__}; expected parameter name -> tensor)"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: not a plain state dict ({len(bad)} entry(ies) are not name -> tensor, e.g. {bad[0]!r} "
            f"holds a {type(state[bad[0]]).__name__})"
        )
    return state


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location=None) -> torch.nn.Module:
    """Load the state dict in ``path`` into ``network`` (or its ``.module`` when wrapped, e.g. DDP), strictly.

    Args:
        network: the module to fill.
        path: the ``.pt`` file (e.g. ``models/model.pt``).
        map_location: passed to ``torch.load``. Default None.

    Returns:
        ``network``, with the weights loaded.

    Raises:
        CheckpointError: as :func:`read_state_dict`, or the keys or shapes do not match ``network`` (another
            network's weights); nothing is loaded then.
    """
    state = read_state_dict(path, map_location)
    target = network.module if hasattr(network, "module") else network
    own = target.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights of another network ({len(missing)} of this network's {len(own)} keys missing, "
            f"e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: weights of another network ({key} has shape {tuple(value.shape)}, this network's "
                f"{tuple(own[key].shape)})"
            )
    target.load_state_dict(state)
    return network


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments) whose bad checkpoint ends the run with one line.

    A single module in ``load_dict`` (with ``strict``, the default) is filled by :func:`load_weights`, and a
    :class:`CheckpointError` becomes ``SystemExit`` with its one line (exit status 1, no traceback under
    ``monai.bundle run``); anything else is loaded by MONAI's handler. Call it from ``initialize``
    (``$@checkpointloader(@evaluator)``): attached to an engine, ignite would log a traceback first.
    """

    def __call__(self, engine) -> None:
        modules = list(self.load_dict.values())
        if len(modules) != 1 or not isinstance(modules[0], torch.nn.Module) or not self.strict:
            return super().__call__(engine)  # several objects, or a partial load: MONAI's own loading
        try:
            load_weights(modules[0], self.load_path, map_location=self.map_location)
        except CheckpointError as e:
            raise SystemExit(str(e)) from None
        self.logger.info(f"Restored all variables from {self.load_path}")
