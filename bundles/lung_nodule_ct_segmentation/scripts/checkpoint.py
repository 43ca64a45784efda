"""The model checkpoint, checked before anything runs: a bad ``models/model.pt`` is refused in one line.

MONAI's ``CheckpointLoader`` loads at the evaluator's start (``weights_only=True``), and a file that is
not the network's state dict fails deep inside it (``Tensor.__contains__ only supports Tensor`` for a
saved tensor, a bare ``EOFError`` for an empty file, 100-odd lines of traceback that never name the
file). :func:`load_state_dict` reads and checks the file and says what is wrong with it;
:class:`CheckpointLoader` (MONAI's, same arguments) does it when the config makes the handler, so the
run stops before the first input is read. The same checks as the pGGN bundle's ``scripts.checkpoint``
(bundles do not import each other; this is a small copy).
"""

from __future__ import annotations

import os
import re

import torch
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader

__all__ = ["CheckpointError", "CheckpointLoader", "load_state_dict"]


class CheckpointError(SystemExit):
    """A checkpoint that cannot be the network's weights; the message is one line naming the file.

    A ``SystemExit`` with a message (as ``scripts.inputs.InputsFailedError``): ``python -m monai.bundle
    run`` prints the line and exits with status 1, without a traceback.
    """


def _load_problem(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words."""
    text = str(exc)
    if isinstance(exc, EOFError):
        return "truncated (the file ends before the checkpoint does)"
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", text)
    if found:
        return (
            f"a pickle that needs code to load ({found.group(1).rstrip('.')}); weights are loaded with "
            "weights_only=True, which reads tensors only"
        )
    if "central directory" in text or "zip archive" in text:
        return "truncated or corrupt (not a complete PyTorch zip archive)"
    detail = text.split("WeightsUnpickler error:", 1)[-1]  # torch's own advice on weights_only comes first
    first = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    return f"not a PyTorch checkpoint ({type(exc).__name__}{': ' + first if first else ''})"


def load_state_dict(path: str | os.PathLike, network: torch.nn.Module, map_location=None) -> dict:
    """The state dict in ``path`` after checking that it is ``network``'s, loaded with ``weights_only=True``.

    ``path`` holds a plain state dict (as ``models/model.pt``) or a checkpoint dict with one under
    ``"model"`` (as MONAI's ``CheckpointSaver`` writes). Nothing is loaded into ``network``.

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, a pickle that needs code, content
            that is not a state dict (a tensor, a list, ...), or one whose keys or tensor shapes are not
            ``network``'s (another network's weights); one line ``<path>: <problem>``.
    """
    name = os.path.normpath(str(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"{name}: checkpoint not found (train the model, or set --ckpt_dir)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{name}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unpickling failure is reported with the file's name
        raise CheckpointError(f"{name}: {_load_problem(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{name}: holds a {type(state).__name__}, not a plain state dict (parameter names -> tensors)"
        )
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(
            f"{name}: not a plain state dict (entry {odd!r} holds a {type(state[odd]).__name__}, not a tensor)"
        )
    own = getattr(network, "module", network).state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: not the weights of network_def ({len(missing)} of its {len(own)} keys missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): another network's checkpoint?"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{name}: {key} has shape {tuple(value.shape)}, network_def's {tuple(own[key].shape)}: "
                "weights of another configuration (channels, strides)?"
            )
    return state


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` for one network whose file is checked (:func:`load_state_dict`) when it is made.

    Same arguments as MONAI's; ``load_dict`` holds one network. Made when the config builds the
    evaluator, it refuses a bad checkpoint with one line before any input is read (at the evaluator's
    start, ignite would log the error with a traceback), and loads the checked weights at the start.
    """

    def __init__(self, load_path: str, load_dict: dict, *args, **kwargs) -> None:
        super().__init__(load_path, load_dict, *args, **kwargs)
        if len(load_dict) != 1 or not isinstance(next(iter(load_dict.values())), torch.nn.Module):
            raise ValueError(f"scripts.CheckpointLoader loads one network; load_dict has {list(load_dict)}")
        self.network = next(iter(load_dict.values()))
        self.state = load_state_dict(load_path, self.network, self.map_location)

    def __call__(self, engine) -> None:
        """Load the checked weights into the network (strict, as MONAI's default)."""
        getattr(self.network, "module", self.network).load_state_dict(self.state, strict=self.strict)
        self.logger.info(f"Restored all variables from {self.load_path}")
