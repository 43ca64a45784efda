"""MONAI's 3D ``AttentionUnet`` with deep supervision.

Why a subclass and not hooks: ``AttentionUnet`` nests its levels recursively
(``model.1.submodule.1.submodule...``), so the decoder features of the deeper levels are never
returned. Forward hooks could catch them but survive neither ``torch.jit.script`` nor a
``deepcopy`` cleanly. This subclass keeps the parent's modules (and so its state-dict keys) and, in
training mode only, walks the same blocks level by level to read each decoder output and feed it to a
1x1x1 head. In eval mode it calls the parent's ``self.model`` and returns one tensor, so
``verify_net_in_out``, TorchScript and MONAI Label see a plain network. The auxiliary logits are
upsampled (trilinear) to the input size inside the network: a label downsampled by nearest
neighbour to 1/4 loses nodules below ~4 mm, an upsampled logit keeps every label voxel in the loss.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet

__all__ = ["DeepSupervisionAttentionUnet", "load_initial_weights"]


class DeepSupervisionAttentionUnet(AttentionUnet):
    """3D Attention U-Net whose decoder levels each get an auxiliary 1x1x1 segmentation head.

    Training mode returns ``[main, aux_1, ..., aux_n]`` (all ``(B, out_channels, H, W, D)``, logits,
    deepest level last), for ``monai.losses.DeepSupervisionLoss``. Eval mode returns the main logits
    ``(B, out_channels, H, W, D)`` only. The state dict is ``AttentionUnet``'s plus
    ``deep_supervision_heads.*``: ``AttentionUnet(...).load_state_dict(sd, strict=False)`` loads the
    main network alone.

    Args:
        spatial_dims: number of spatial dimensions. Default 3.
        in_channels: input channels. Default 1.
        out_channels: output channels (logits). Default 1.
        channels: channels per level, top first. Default (16, 32, 64, 128).
        strides: down-sampling stride per level. Default (2, 2, 2).
        kernel_size: convolution kernel size. Default 3.
        up_kernel_size: transposed-convolution kernel size. Default 3.
        dropout: dropout ratio. Default 0.0.
        deep_supervision: whether training mode returns the auxiliary outputs. Default True.
        deep_supr_num: number of auxiliary heads (decoder levels below the top one, deepest last),
            at most ``len(channels) - 2``. Default 2.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        kernel_size: Sequence[int] | int = 3,
        up_kernel_size: Sequence[int] | int = 3,
        dropout: float = 0.0,
        deep_supervision: bool = True,
        deep_supr_num: int = 2,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=channels,
            strides=strides, kernel_size=kernel_size, up_kernel_size=up_kernel_size, dropout=dropout,
        )  # fmt: skip
        if not 0 <= deep_supr_num <= len(channels) - 2:
            raise ValueError(
                f"deep_supr_num must be in [0, {len(channels) - 2}] for {len(channels)} levels, got {deep_supr_num}"
            )
        self.deep_supervision = deep_supervision
        self.deep_supr_num = deep_supr_num
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.deep_supervision_heads = nn.ModuleList(
            [conv(int(channels[level]), out_channels, kernel_size=1) for level in range(1, deep_supr_num + 1)]
        )
        self.interp_mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Logits ``(B, out_channels, H, W[, D])`` in eval mode; a list of them in training mode."""
        if not torch.jit.is_scripting() and self.training and self.deep_supervision and self.deep_supr_num > 0:
            return self._forward_deep_supervision(x)  # Python only: TorchScript skips this branch
        return self.model(x)

    def _forward_deep_supervision(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Run the parent's blocks level by level; identical main output to ``self.model(x)``."""
        head, encdec, reduce_channels = self.model[0], self.model[1], self.model[2]
        layers = []  # AttentionLayer per level, top first
        layer = encdec
        while True:
            layers.append(layer)
            if isinstance(layer.submodule, nn.Sequential):  # ConvBlock (down) + next AttentionLayer
                layer = layer.submodule[1]
            else:  # bottom: the submodule is the bottom ConvBlock
                break
        skips = [head(x)]
        for lay in layers[:-1]:
            skips.append(lay.submodule[0](skips[-1]))
        d = layers[-1].submodule(skips[-1])  # bottom features
        decoded: list[torch.Tensor] = [torch.empty(0)] * len(layers)
        for level in range(len(layers) - 1, -1, -1):
            lay = layers[level]
            fromlower = lay.upconv(d)
            att = lay.attention(g=fromlower, x=skips[level])
            d = lay.merge(torch.cat((att, fromlower), dim=1))
            decoded[level] = d
        size = x.shape[2:]
        outputs = [reduce_channels(decoded[0])]
        for i, head_conv in enumerate(self.deep_supervision_heads):
            aux = head_conv(decoded[i + 1])
            outputs.append(F.interpolate(aux, size=size, mode=self.interp_mode, align_corners=False))
        return outputs


def load_initial_weights(network: nn.Module, path: str | None) -> nn.Module:
    """Start training from the weights in ``path`` (fine-tuning) instead of random ones; no-op when empty.

    ``path`` is a plain state dict (``models/model.pt``, ``model_final.pt``) or a checkpoint dict
    holding one under ``"model"``. Loaded with ``weights_only=True``; the network may be wrapped in
    ``DistributedDataParallel``. Every key must match.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a weights-only state dict, or its keys or shapes do not fit.
    """
    if not path:
        return network
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the file's name
        raise ValueError(
            f"init_checkpoint {path}: not a weights-only PyTorch state dict ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    target = getattr(network, "module", network)
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"init_checkpoint {path} does not fit network_def: {exc}") from None
    return network
