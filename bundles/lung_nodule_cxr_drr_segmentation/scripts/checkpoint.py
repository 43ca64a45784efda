"""Loading a plain state dict with ``weights_only=True``, refusing anything else in one line that names the file.

A bundle cannot import another, so this is this bundle's own small copy of the collection's checkpoint
checks (the pGGN bundle's ``scripts/checkpoint.py`` says the same things).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from monai.handlers import CheckpointLoader

__all__ = ["CheckedCheckpointLoader", "CheckpointError", "MissingCheckpointError", "check_fits", "read_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the network, with the file named and what is wrong."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist."""


def _first_sentence(text: object, limit: int = 100) -> str:
    line = str(text).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_state_dict(
    path: str | os.PathLike, name: str | None = None, map_location: str | torch.device | None = "cpu"
) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a plain one, or one under ``"model"`` as ignite saves it), loaded weights-only.

    Args:
        path: the ``.pt`` file.
        name: how messages name it. Default: the path.
        map_location: where tensors go. Default cpu.

    Raises:
        MissingCheckpointError: no such file.
        CheckpointError: empty, truncated or not a torch file; Python objects besides tensors (a pickled
            module), which ``weights_only=True`` refuses; a tensor, a list or other non-mapping; a
            mapping whose values are not all tensors.
    """
    name = name or os.path.normpath(str(path))
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"{name}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{name} is not a plain state dict: the file is empty")
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"{name} is not a plain state dict: it holds Python objects (e.g. a whole pickled module) that a "
                "weights-only load refuses; save network.state_dict()"
            ) from None
        raise CheckpointError(f"{name} is not a plain state dict: not a torch file ({_first_sentence(e)})") from None
    except Exception as e:  # noqa: BLE001 - EOFError, a zip reader error: the file is cut or not a torch file
        why = f"{type(e).__name__}: {_first_sentence(e)}"
        raise CheckpointError(f"{name} is not a plain state dict: truncated or not a torch file ({why})") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name} is not a plain state dict (it holds a {type(state).__name__})")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise CheckpointError(
            f"{name} is not a plain state dict (entry {bad[0]!r} holds a {type(bad[1]).__name__}, not a tensor)"
        )
    return dict(state)


def check_fits(state: Mapping[str, torch.Tensor], network: torch.nn.Module, name: str, hint: str = "") -> None:
    """Refuse ``state`` unless its keys and shapes are exactly those of ``network`` (a DDP wrapper is unwrapped).

    Args:
        state: a state dict (see :func:`read_state_dict`).
        network: the network it should fill.
        name: how messages name the checkpoint.
        hint: what to check when only shapes differ. Default: the widths, ``drr_skips``, ``drr_slab_keys``.

    Raises:
        CheckpointError: keys missing or unexpected (another network's weights), or a shape that differs.
    """
    own = getattr(network, "module", network).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not fit network_def: {len(missing)} of its {len(own)} weights missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); is it another network's checkpoint?"
        )
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape]
    if shapes:
        hint = hint or "check backbone_width, attention_channels, decoder_channels, drr_skips and drr_slab_keys"
        raise CheckpointError(
            f"{name} does not fit network_def: {len(shapes)} weights of another shape (e.g. {shapes[0]}); {hint}"
        )


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that first checks the file, when it is built: a bad checkpoint is refused
    in one line naming it (:func:`read_state_dict`, :func:`check_fits`) before anything runs. A good one is
    then loaded by MONAI's handler, unchanged, when the engine starts.

    Args: as ``monai.handlers.CheckpointLoader``; ``load_dict`` holds the network (and possibly other objects).

    Raises:
        CheckpointError: see :func:`read_state_dict` and :func:`check_fits` (with ``strict`` and ``strict_shape``).
    """

    def __init__(self, load_path: str, load_dict: dict, *args, **kwargs) -> None:
        super().__init__(load_path, load_dict, *args, **kwargs)
        nets = [obj for obj in load_dict.values() if isinstance(obj, torch.nn.Module)]
        if len(load_dict) != 1 or len(nets) != 1:
            return  # several objects (a trainer's state): left to MONAI's loader
        state = read_state_dict(load_path)
        if self.strict and self.strict_shape:
            check_fits(state, nets[0], os.path.normpath(str(load_path)))
