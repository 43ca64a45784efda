"""Loading a plain state dict with ``weights_only=True`` and messages that say what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_weights"]


def load_weights(network: torch.nn.Module, path: str, what: str = "model", map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a state dict saved by this bundle into ``network``.

    Args:
        network: the module to fill (unwrapped or DDP: ``module.`` prefixes are handled).
        path: the ``.pt`` file.
        what: name used in messages. Default ``"model"``.
        map_location: where tensors go first. Default cpu.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a plain state dict, or its tensors do not fit (e.g. another
            number of feature columns than the config lists).
    """
    path_ = Path(path)
    if not path_.is_file():
        raise FileNotFoundError(f"{what}: checkpoint {path_} not found (train that variant first, or set the path in the config)")
    try:
        state = torch.load(path_, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickles with more than tensors are refused by weights_only
        raise ValueError(f"{what}: {path_} is not a plain state dict loadable with weights_only=True ({exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    target = network.module if hasattr(network, "module") else network
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what}: {path_} does not belong to this network ({len(missing)} missing key(s), e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}): is it a checkpoint of another variant?"
        )
    # the feature statistics first: their shape says how many feature columns the checkpoint was trained with
    for key, value in sorted(state.items(), key=lambda kv: not kv[0].endswith(("feature_mean", "feature_std"))):
        if own[key].shape != value.shape:
            hint = ""
            if key.endswith(("feature_mean", "feature_std")):
                hint = f": it was trained with {value.shape[0]} feature columns, the config lists {own[key].shape[0]}"
            raise ValueError(f"{what}: {path_} has {key} of shape {tuple(value.shape)}, the network {tuple(own[key].shape)}{hint}")
    target.load_state_dict(state)
    return network
