"""X-ray + DRR fusion network: ResNet-50 X-ray encoder, multi-scale supervised attention on the DRR,
fusion ``f * (1 + alpha * a)`` at 1/4, 1/8, 1/16 and 1/32, and a skip-connected decoder with
transposed-convolution upsampling (optionally also fed the DRR path's features, ``drr_skips``).

The network is a plain ``(B, 2, H, W) -> (B, 1 + S, H, W)`` module so that ``verify_net_in_out``,
``ckpt_export`` (TorchScript) and MONAI Label see an ordinary segmentation network:

- input channel 0: the X-ray, scaled to [-1024, 1024] (torchxrayvision's convention);
- input channel 1: the DRR of the patient's CT, scaled to [0, 1];
- input channels 2..: optional DRR slabs (``data_prep drr --drr-slabs``: the DRR's region in depth
  slabs along the beam, anterior first), scaled like the DRR; the attention path sees channels 1..;
- output channel 0: nodule logit at full resolution;
- output channels 1..S: the attention logits of the S fusion scales (1/4, 1/8, 1/16, 1/32 by
  default), each nearest-upsampled to full resolution. Supervising a nearest-upsampled coarse map
  with the full-resolution mask gives the same gradient as supervising the coarse map with the
  area-downsampled (soft) mask, so the attention losses need no second output.

H and W must be multiples of 32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import ResNet

from .checkpoint import CheckpointError, check_fits, read_state_dict
from .flags import as_flag

__all__ = [
    "BACKBONE_GROUPS",
    "CxrDrrFusionNet",
    "load_init_checkpoint",
    "load_xrv_weights",
    "map_torchvision_resnet_keys",
    "param_groups",
    "widen_inputs",
]

# optimizer parameter groups, in the order ``param_groups`` returns them (names are module prefixes)
BACKBONE_GROUPS = ("backbone.stem", "backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")
NEW_GROUPS = ("attention", "fusion", "decoder")


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a (projected) identity shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (2 halves H and W). Default 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels, stride)
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)."""
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class MultiScaleAttention(nn.Module):
    """Residual encoder on the DRR with a top-down pathway and one attention logit per fusion scale.

    Args:
        in_channels: DRR channels. Default 1.
        channels: channels at 1/2 (stem) and at each attention scale 1/4, 1/8, 1/16, 1/32.
            Default (16, 32, 48, 64, 64).
        blocks_per_scale: residual blocks per scale (the first one strided). Default 2.
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 48, 64, 64), blocks_per_scale: int = 2
    ) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, channels[0], stride=2)
        stages = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks = [ResidualBlock(c_in, c_out, stride=2)] + [
                ResidualBlock(c_out, c_out) for _ in range(blocks_per_scale - 1)
            ]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        # top-down: the coarser scale's features, projected and upsampled, refine the finer one
        # stored coarse to fine: lateral[k] maps scale n-1-k onto scale n-2-k (n = number of scales)
        lateral = [nn.Conv2d(c_coarse, c_fine, 1) for c_fine, c_coarse in zip(channels[1:-1], channels[2:])]
        self.lateral = nn.ModuleList(lateral[::-1])
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, 1) for c in channels[1:]])

    def forward(self, drr: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, H, W) -> attention logits [(B, 1, H/4, W/4), (B, 1, H/8, W/8), ...] (fine to coarse)."""
        return self.features(drr)[2]

    def features(self, drr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(B, 1, H, W) -> (stem features at 1/2, refined features at 1/4..1/32, attention logits at 1/4..1/32)."""
        x = self.stem(drr)
        stem = x
        feats: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        n = len(feats)
        refined: list[torch.Tensor] = [feats[n - 1]]
        coarse = feats[n - 1]
        for k, lat in enumerate(self.lateral):
            i = n - 2 - k
            coarse = feats[i] + F.interpolate(lat(coarse), size=feats[i].shape[-2:], mode="nearest")
            refined.insert(0, coarse)
        out: list[torch.Tensor] = []
        for i, head in enumerate(self.heads):
            out.append(head(refined[i]))
        return stem, refined, out


class UpBlock(nn.Module):
    """Transposed-convolution upsampling (x2), concatenation with a skip, two 3x3 convolutions.

    Args:
        in_channels: channels of the coarse input.
        skip_channels: channels of the skip connection (0: none).
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            _conv_bn_relu(out_channels + skip_channels, out_channels), _conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in, h, w) [+ skip (B, skip, 2h, 2w)] -> (B, out, 2h, 2w)."""
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class CxrDrrFusionNet(nn.Module):
    """Nodule segmentation on a chest X-ray guided by a DRR of the patient's CT.

    Args:
        in_channels: input channels: 2 (X-ray, DRR) plus the number of DRR slabs, if any. Default 2.
        backbone_width: channels of the ResNet-50 stem; the bottleneck stages use width x (1, 2, 4, 8)
            and output 4x that. 64 is torchvision's / torchxrayvision's ResNet-50 (needed for
            ``xrv_weights``); smaller widths keep the same [3, 4, 6, 3] bottleneck layout. Default 64.
        attention_channels: channels of the DRR attention path at 1/2, 1/4, 1/8, 1/16, 1/32.
            Default (16, 32, 48, 64, 64).
        decoder_channels: decoder channels at 1/32, 1/16, 1/8, 1/4, 1/2, 1/1. Default (256, 128, 64, 32, 16, 16).
        fusion_alpha: initial value of the learnable per-scale fusion strength alpha. Default 1.0.
        xrv_weights: optional local torchxrayvision ``resnet50-res512-all`` state dict (torchvision key
            names, with or without a ``model.`` prefix); its 'Nodule' classifier row becomes the frozen
            pathology prior head. Default None (backbone randomly initialised, prior head zero).
        pathology_index: row of the classifier used as prior ('Nodule' = 11 in torchxrayvision). Default 11.
        prior_probability: initial foreground probability of the mask and attention heads (their bias is
            set to its log-odds, as in RetinaNet): with nodules on well under 1% of the pixels, a bias of 0
            makes the first iterations spend themselves on pushing everything to background. Default 0.01.
        drr_skips: also feed the DRR path's features to the decoder: its refined features join the
            X-ray skips at 1/4..1/32, its stem features at 1/2, and the two input images at full
            resolution. Without them the DRR reaches the decoder only through the one-channel
            attention gates, which cannot place a nodule that the X-ray features do not show.
            Default False (the layout of model 0.2.0 and earlier).
    """

    def __init__(
        self,
        in_channels: int = 2,
        backbone_width: int = 64,
        attention_channels: Sequence[int] = (16, 32, 48, 64, 64),
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16, 16),
        fusion_alpha: float = 1.0,
        xrv_weights: str | Path | None = None,
        pathology_index: int = 11,
        prior_probability: float = 0.01,
        drr_skips: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 2:
            raise ValueError(
                "CxrDrrFusionNet takes at least 2 input channels (X-ray, DRR[, DRR slabs]), "
                f"got in_channels={in_channels}."
            )
        if len(attention_channels) != 5 or len(decoder_channels) != 6:
            raise ValueError("attention_channels needs 5 entries (1/2..1/32), decoder_channels 6 (1/32..1/1).")
        w = int(backbone_width)
        self.backbone = ResNet(
            "bottleneck",
            [3, 4, 6, 3],
            [w, 2 * w, 4 * w, 8 * w],
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            bias_downsample=False,
            feed_forward=False,
        )
        feat_channels = [4 * w, 8 * w, 16 * w, 32 * w]  # layer1..layer4 at 1/4..1/32
        # frozen pathology prior: torchxrayvision's 'Nodule' row of the classifier as a 1x1 convolution on layer4
        self.prior = nn.Conv2d(feat_channels[-1], 1, kernel_size=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)
        self.prior.requires_grad_(False)
        self.attention = MultiScaleAttention(in_channels - 1, attention_channels)
        self.fusion = nn.ParameterDict({"alpha": nn.Parameter(torch.full((4,), float(fusion_alpha)))})
        d = list(decoder_channels)
        self.drr_skips = as_flag(drr_skips, "drr_skips")
        # extra decoder inputs from the DRR path: refined 1/4..1/32, stem 1/2, the input images at 1/1
        a = list(attention_channels) if self.drr_skips else [0] * 5
        full = in_channels if self.drr_skips else 0
        self.decoder = nn.ModuleDict(
            {
                "bottleneck": nn.Sequential(
                    nn.Conv2d(feat_channels[3] + 1 + a[4], d[0], 1, bias=False),
                    nn.BatchNorm2d(d[0]),
                    nn.ReLU(inplace=True),
                ),
                "up16": UpBlock(d[0], feat_channels[2] + a[3], d[1]),
                "up8": UpBlock(d[1], feat_channels[1] + a[2], d[2]),
                "up4": UpBlock(d[2], feat_channels[0] + a[1], d[3]),
                "up2": UpBlock(d[3], w + a[0], d[4]),
                "up1": UpBlock(d[4], full, d[5]),
                "head": nn.Conv2d(d[5], 1, 1),
            }
        )
        bias = math.log(prior_probability / (1.0 - prior_probability))
        for head in [self.decoder["head"], *self.attention.heads]:
            nn.init.constant_(head.bias, bias)
        if xrv_weights:
            load_xrv_weights(self, xrv_weights, pathology_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 5, H, W).

        Channel 0 is the nodule logit, then the attention logits at 1/4, 1/8, 1/16, 1/32 (upsampled).
        """
        xray = x[:, 0:1]
        drr = x[:, 1:]
        drr_stem, drr_feats, att = self.attention.features(drr)
        alpha = self.fusion["alpha"]
        b = self.backbone
        stem = b.act(b.bn1(b.conv1(xray)))
        f1 = b.layer1(b.maxpool(stem))
        f2 = b.layer2(f1)
        f3 = b.layer3(f2)
        f4 = b.layer4(f3)
        f1 = f1 * (1.0 + alpha[0] * torch.sigmoid(att[0]))
        f2 = f2 * (1.0 + alpha[1] * torch.sigmoid(att[1]))
        f3 = f3 * (1.0 + alpha[2] * torch.sigmoid(att[2]))
        f4 = f4 * (1.0 + alpha[3] * torch.sigmoid(att[3]))
        dec = self.decoder
        # skips fine to coarse (1/2 .. 1/32); with drr_skips the DRR path's features join each one
        skips = [stem, f1, f2, f3, torch.cat([f4, self.prior(f4)], dim=1)]
        full: torch.Tensor | None = None
        if self.drr_skips:
            skips = [torch.cat([s, d], dim=1) for s, d in zip(skips, [drr_stem] + drr_feats)]
            full = x
        y = dec["bottleneck"](skips[4])
        y = dec["up16"](y, skips[3])
        y = dec["up8"](y, skips[2])
        y = dec["up4"](y, skips[1])
        y = dec["up2"](y, skips[0])
        y = dec["up1"](y, full)
        seg = dec["head"](y)
        size = seg.shape[-2:]
        outs = [seg]
        for a in att:
            outs.append(F.interpolate(a, size=size, mode="nearest"))
        return torch.cat(outs, dim=1)


def map_torchvision_resnet_keys(
    state_dict: Mapping[str, torch.Tensor], pathology_index: int = 11
) -> dict[str, torch.Tensor]:
    """Map a torchvision-named ResNet-50 state dict (torchxrayvision's weights file) onto ``CxrDrrFusionNet``.

    ``conv1``, ``bn1``, ``layerN.*`` (with ``downsample.0/1``) keep their names under ``backbone.``;
    MONAI's ``ResNet`` (2D, ``bias_downsample=False``) uses torchvision's names. The classifier row
    ``fc.weight[pathology_index]`` / ``fc.bias[pathology_index]`` becomes ``prior.weight`` (1, C, 1, 1)
    / ``prior.bias`` (1,). A ``model.`` (torchxrayvision's wrapper) or ``module.`` (DDP) prefix is
    stripped. A 3-channel ``conv1`` (ImageNet weights) is summed over its input channels.

    Args:
        state_dict: the source weights.
        pathology_index: classifier row to keep (11 = 'Nodule' in torchxrayvision's 18 outputs). Default 11.

    Returns:
        A state dict with keys ``backbone.*`` and ``prior.*``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = key
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k == "fc.weight":
            if value.shape[0] <= pathology_index:
                raise ValueError(
                    f"fc.weight has {value.shape[0]} rows; no row {pathology_index} for the pathology prior."
                )
            out["prior.weight"] = value[pathology_index].reshape(1, -1, 1, 1).clone()
        elif k == "fc.bias":
            out["prior.bias"] = value[pathology_index : pathology_index + 1].clone()
        elif k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")):
            if k == "conv1.weight" and value.shape[1] == 3:
                value = value.sum(dim=1, keepdim=True)
            out["backbone." + k] = value
        # anything else (op_threshs, upsample buffers of the wrapper) is not part of the network
    return out


def load_xrv_weights(net: CxrDrrFusionNet, path: str | Path, pathology_index: int = 11) -> None:
    """Load a local torchxrayvision ResNet-50 weights file into ``net`` (backbone and frozen prior head).

    Args:
        net: the network (``backbone_width`` must be 64, as torchvision's ResNet-50).
        path: state dict saved with ``torch.save(model.state_dict(), path)``; loaded with ``weights_only=True``.
        pathology_index: classifier row used as the prior. Default 11 ('Nodule').

    Raises:
        ValueError: the file is not a plain state dict, or keys/shapes do not match a ResNet-50.
    """
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled module or something else than tensors
        raise CheckpointError(
            f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}); save the model's "
            "state dict instead: torch.save(xrv_model.state_dict(), path)"
        ) from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    mapped = map_torchvision_resnet_keys(sd, pathology_index)
    own = net.state_dict()
    wanted = [k for k in own if k.startswith(("backbone.", "prior."))]
    missing = [k for k in wanted if k not in mapped]
    if missing:
        raise CheckpointError(
            f"{path}: not a ResNet-50 state dict in torchvision naming; missing {len(missing)} keys, e.g. {missing[:3]}"
        )
    bad = [f"{k} {tuple(mapped[k].shape)} != {tuple(own[k].shape)}" for k in wanted if mapped[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shapes do not match (is backbone_width 64?): {bad[:3]}")
    net.load_state_dict({k: mapped[k] for k in wanted}, strict=False)


def _group_of(name: str) -> str | None:
    if name.startswith("prior."):
        return None  # always frozen
    if name.startswith("backbone."):
        sub = name.split(".")[1]
        return f"backbone.{sub}" if sub.startswith("layer") else "backbone.stem"
    return name.split(".")[0]


def param_groups(net: nn.Module, lr: float, backbone_lr: float, weight_decay: float = 1e-4) -> list[dict]:
    """Optimizer parameter groups: the backbone's stem and stages at ``backbone_lr``, new layers at ``lr``.

    One group per module prefix (``BACKBONE_GROUPS`` + ``NEW_GROUPS``) so that the phase handler can
    freeze whole groups exactly (it sets their learning rate to 0). The frozen prior head is left out.

    Args:
        net: the network (a ``DistributedDataParallel`` wrapper is unwrapped).
        lr: learning rate of the attention path, fusion and decoder.
        backbone_lr: learning rate of the ResNet-50 backbone (pretrained layers move slowly).
        weight_decay: weight decay of every group. Default 1e-4.

    Returns:
        A list of dicts for ``torch.optim`` with ``name``, ``params``, ``lr`` and ``base_lr``.
    """
    net = getattr(net, "module", net)
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in BACKBONE_GROUPS + NEW_GROUPS}
    for name, p in net.named_parameters():
        g = _group_of(name)
        if g is not None:
            groups[g].append(p)
    out = []
    for g, params in groups.items():
        if params:
            rate = backbone_lr if g.startswith("backbone") else lr
            out.append({"name": g, "params": params, "lr": rate, "base_lr": rate, "weight_decay": weight_decay})
    return out


# convolutions whose input grows when ``drr_skips`` is turned on (the decoder's) or DRR slab channels are
# added (the attention path's stem; with ``drr_skips`` also the decoder's full-resolution input)
WIDENABLE_INPUTS = (
    "attention.stem.0.weight",
    "decoder.bottleneck.0.weight",
    "decoder.up16.conv.0.0.weight",
    "decoder.up8.conv.0.0.weight",
    "decoder.up4.conv.0.0.weight",
    "decoder.up2.conv.0.0.weight",
    "decoder.up1.conv.0.0.weight",
)


def widen_inputs(state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to a network with more inputs: ``drr_skips`` turned on, DRR slabs added.

    ``own`` is that network's state dict.

    New inputs are always appended (the DRR path's features after the X-ray skips, the slab channels
    after the DRR), so each convolution of ``WIDENABLE_INPUTS`` gets zero weights for its new, trailing
    input channels: the widened network computes exactly what the checkpoint did, and training then
    learns how much of the new inputs to use. Weights that already fit are returned unchanged.
    """
    out = dict(state_dict)
    for key in WIDENABLE_INPUTS:
        if key not in out or key not in own:
            continue
        w, want = out[key], own[key]
        if w.shape == want.shape:
            continue
        if w.dim() != 4 or w.shape[0] != want.shape[0] or w.shape[1] > want.shape[1] or w.shape[2:] != want.shape[2:]:
            continue  # leave it to load_state_dict to report the mismatch
        pad = torch.zeros(w.shape[0], want.shape[1] - w.shape[1], *w.shape[2:], dtype=w.dtype)
        out[key] = torch.cat([w, pad], dim=1)
    return out


def load_init_checkpoint(net: nn.Module, path: str | None, exclude: Sequence[str] = ()) -> nn.Module:
    """Fine-tuning: start from the weights in ``path`` (e.g. the shipped ``models/model.pt``); no-op when empty.

    A plain state dict or one under ``"model"`` (an ignite checkpoint), loaded weights-only into the
    network (a DDP wrapper is unwrapped); every key and shape must fit ``network_def``, except that
    a checkpoint without ``drr_skips`` or DRR slabs loads into a network with them (:func:`widen_inputs`).

    Args:
        exclude: key prefixes (e.g. ``["attention."]``) whose weights are not loaded: those modules
            keep the network's fresh initialization (train them again, e.g. with new input channels).

    Raises:
        FileNotFoundError: ``path`` does not exist (a :class:`~scripts.checkpoint.MissingCheckpointError`).
        ValueError: not a plain state dict, it does not fit the network (a
            :class:`~scripts.checkpoint.CheckpointError`, one line naming the file), or a prefix of
            ``exclude`` matches none of the network's keys.
    """
    if not path:
        return net
    exclude = (
        (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
    )  # --init_exclude attention. is one prefix
    target = getattr(net, "module", net)
    own = target.state_dict()
    for prefix in exclude:
        if not any(k.startswith(prefix) for k in own):
            raise CheckpointError(
                f"init_exclude {prefix!r} matches no weight of network_def "
                "(keys start e.g. with 'attention.', 'decoder.', 'backbone.')"
            )
    name = f"init_checkpoint {os.path.normpath(str(path))}"
    sd = read_state_dict(path, name)
    sd = widen_inputs(sd, own)
    if exclude:  # the excluded weights come from the network itself, whether the checkpoint has them or not
        sd = {
            **{k: v for k, v in sd.items() if not k.startswith(exclude)},
            **{k: v for k, v in own.items() if k.startswith(exclude)},
        }
    check_fits(sd, target, name)
    target.load_state_dict(sd)
    return net
