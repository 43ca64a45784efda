"""Loading a plain state dict with ``weights_only=True`` and one-line messages that say what does not fit."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .inputs import InputError

__all__ = ["CheckpointError", "load_weights"]


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded into the network; the message names the file and the problem."""


def _read(path: Path, what: str, map_location):
    """``torch.load(path, weights_only=True)`` with a one-line :class:`CheckpointError` for what cannot be read."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what}: {path} is empty (0 bytes), not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError... over many lines
        found = re.search(r"Unsupported global: (GLOBAL \S+)", str(exc))
        if found:
            raise CheckpointError(
                f"{what}: {path} holds Python objects that need code to load ({found.group(1)}); refused: "
                "checkpoints are loaded with weights_only=True and must be a plain state dict"
            ) from exc
        raise CheckpointError(
            f"{what}: {path} is not a readable PyTorch checkpoint (truncated, or not written by torch.save)"
        ) from exc


def load_weights(
    network: torch.nn.Module, path: str, what: str = "model", map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a state dict saved by this bundle into ``network``.

    Args:
        network: the module to fill (unwrapped or DDP: ``module.`` prefixes are handled).
        path: the ``.pt`` file.
        what: name used in messages. Default ``"model"``.
        map_location: where tensors go first. Default cpu.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: (a ``ValueError``) the file is empty, truncated, not a PyTorch checkpoint, a pickle
            that needs code (refused by ``weights_only=True``), not a state dict (a tensor, a list), another
            network's weights, or its tensors do not fit (e.g. another number of feature columns than the config lists).
    """
    path_ = Path(path)
    if not path_.is_file():
        raise FileNotFoundError(
            f"{what}: checkpoint {path_} not found (train that variant first, or set the path in the config)"
        )
    state = _read(path_, what, map_location)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise CheckpointError(f"{what}: {path_} holds a {kind}, not a state dict (parameter name -> tensor)")
    odd = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        n = len(odd)
        raise CheckpointError(f"{what}: {path_} is not a state dict: {n} value(s) are not tensors, e.g. {odd[:3]}")
    target = network.module if hasattr(network, "module") else network
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted((set(state) - set(own)), key=str)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: {path_} does not belong to this network ({len(missing)} missing key(s), e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}): is it another network's or another variant's?"
        )
    # the feature statistics first: their shape says how many feature columns the checkpoint was trained with
    for key, value in sorted(state.items(), key=lambda kv: not kv[0].endswith(("feature_mean", "feature_std"))):
        if own[key].shape != value.shape:
            hint = ""
            if key.endswith(("feature_mean", "feature_std")):
                hint = f": it was trained with {value.shape[0]} feature columns, the config lists {own[key].shape[0]}"
            shapes = f"{key} of shape {tuple(value.shape)}, the network {tuple(own[key].shape)}"
            raise CheckpointError(f"{what}: {path_} has {shapes}{hint}")
    target.load_state_dict(state)
    return network
